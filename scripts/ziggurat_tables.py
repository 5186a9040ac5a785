#!/usr/bin/env python3
"""Generate the 256-layer ziggurat tables of numpy's `standard_normal`
for src/pow/ziggurat_tables.rs.

The tables follow from two constants, the right edge R of the base strip and the common
area V of every layer, by the usual downward recursion (all in IEEE double arithmetic):

    x[255] = R
    x[i]   = sqrt(-2 * log(V / x[i+1] + f[i+1]))        for i = 254 .. 1
    f[i]   = exp(-0.5 * x[i] * x[i]),  f[0] = 1
    w[i]   = x[i] / 2^52,              w[0] = V / f[255] / 2^52
    k[i]   = round(x[i-1] / x[i] * 2^52) (ties to even) for i >= 2, k[1] = 0,
    k[0]   = floor(R * f[255] / V * 2^52)

With Python's math module (the platform's C library) this reproduces numpy's tables bit for
bit except one entry: numpy's f[38] is exp(-0.5 * x[38]^2) rounded up, although the exact
value lies 0.498 ulp above the lower neighbour (the tables were evidently produced with a
C library whose exp rounded that argument the other way). The script pins that one value
and, because f[38] feeds the recursion, computes every entry below it from the pinned one.

When numpy is importable, the script also checks that the three tables occur byte for byte
in numpy's compiled random module, so the constants written out are numpy's own.

Usage: python3 scripts/ziggurat_tables.py [--check]
  rewrites the block between the GENERATED markers in src/pow/ziggurat_tables.rs, or with
  --check only
  verifies that the block is up to date (exit status 1 if not).
"""

import glob
import math
import os
import struct
import sys

R = 3.6541528853610088
V = 0.004928673233974652
SCALE = 2.0**52
# The one entry the reference tables round differently from a correctly rounded exp.
PINNED_F = {38: 0.6773880362187735}

BEGIN = "// BEGIN GENERATED ZIGGURAT TABLES (scripts/ziggurat_tables.py)"
END = "// END GENERATED ZIGGURAT TABLES"


def tables():
    k = [0] * 256
    w = [0.0] * 256
    f = [0.0] * 256
    x_hi = R
    w[255] = x_hi / SCALE
    f[255] = math.exp(-0.5 * x_hi * x_hi)
    k[0] = int(x_hi * f[255] / V * SCALE)
    w[0] = V / f[255] / SCALE
    f[0] = 1.0
    for i in range(254, 0, -1):
        x = math.sqrt(-2.0 * math.log(V / x_hi + f[i + 1]))
        k[i + 1] = int(round(x / x_hi * SCALE))  # ties to even
        w[i] = x / SCALE
        f[i] = PINNED_F.get(i, math.exp(-0.5 * x * x))
        x_hi = x
    k[1] = 0
    return k, w, f


def check_against_numpy(k, w, f):
    try:
        import numpy
    except ImportError:
        print("numpy not importable: skipped the comparison with numpy's tables", file=sys.stderr)
        return True
    blobs = {
        "ki": struct.pack("<256Q", *k),
        "wi": struct.pack("<256d", *w),
        "fi": struct.pack("<256d", *f),
    }
    found = {name: False for name in blobs}
    pattern = os.path.join(os.path.dirname(numpy.__file__), "random", "*.so")
    for path in glob.glob(pattern):
        with open(path, "rb") as fh:
            data = fh.read()
        for name, blob in blobs.items():
            if blob in data:
                found[name] = True
    for name, ok in found.items():
        print(f"{name}: {'found verbatim' if ok else 'NOT FOUND'} in numpy {numpy.__version__}",
              file=sys.stderr)
    return all(found.values())


def render(k, w, f):
    def rows(values, fmt, per_line):
        out = []
        for i in range(0, len(values), per_line):
            out.append("    " + " ".join(fmt(v) + "," for v in values[i:i + per_line]))
        return "\n".join(out)

    lines = [
        BEGIN,
        "// Do not edit by hand: regenerate with the script, which also checks them against numpy.",
        "#[rustfmt::skip]",
        "pub(super) static KI: [u64; 256] = [",
        rows(k, lambda v: f"0x{v:016x}", 4),
        "];",
        "#[rustfmt::skip]",
        "pub(super) static WI: [f64; 256] = [",
        rows(w, repr, 3),
        "];",
        "#[rustfmt::skip]",
        "pub(super) static FI: [f64; 256] = [",
        rows(f, repr, 3),
        "];",
        END,
    ]
    return "\n".join(lines)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.path.join(root, "src", "pow", "ziggurat_tables.rs")
    k, w, f = tables()
    ok = check_against_numpy(k, w, f)
    if not ok:
        print("the computed tables differ from numpy's", file=sys.stderr)
        return 1
    block = render(k, w, f)
    with open(target, encoding="utf-8") as fh:
        text = fh.read()
    start = text.index(BEGIN)
    stop = text.index(END) + len(END)
    new_text = text[:start] + block + text[stop:]
    if "--check" in sys.argv[1:]:
        if new_text != text:
            print("src/pow/ziggurat_tables.rs: the ziggurat tables are out of date", file=sys.stderr)
            return 1
        print("src/pow/ziggurat_tables.rs: ziggurat tables up to date", file=sys.stderr)
        return 0
    if new_text != text:
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(new_text)
        print("src/pow/ziggurat_tables.rs: ziggurat tables written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
