#!/usr/bin/env python3
"""Write tests/fixtures/binomtest.json: scipy's one-sided binomial test p-values, the
validators' fraud test, for the Rust implementation to be checked against, each beside the
exact value.

Each case is (k, n) with p = 5e-4 (the reference's PROBABILITY_MISMATCH, as the f64 nearest to
it), `pvalue` = scipy.stats.binomtest(k, n, p, alternative='greater').pvalue, and `exact` =
P(X >= k) summed term by term in 60-digit decimal arithmetic (each term's binomial
coefficient an exact integer), rounded to f64 once. scipy is not exact in the far tail (about
1e-10 relative near 1e-300 at small n), so the exact value is what an implementation is held
to; scipy's is kept to show how the two compare. The cases cover k = 0, k = n, the
neighbourhood of the mean, the far tail down to about 1e-300, and values that underflow to 0,
for n from 1 to 10^6.

Usage: python3 scripts/binomtest_fixtures.py   (needs numpy and scipy)
"""
import json
import os
from decimal import Decimal, getcontext
from math import comb

import scipy
from scipy.stats import binomtest

P = 5e-4
getcontext().prec = 60
P_EXACT = Decimal(P)  # the f64's exact binary value
Q_EXACT = 1 - P_EXACT


def term(i, n):
    return Decimal(comb(n, i)) * P_EXACT**i * Q_EXACT ** (n - i)


def exact_sf(k, n):
    """P(X >= k): the upper tail summed from k up, or one minus the lower tail, whichever
    side of the mean k is on, each sum stopped once its terms no longer count."""
    if k == 0:
        return 1.0
    if k > n:
        return 0.0
    if k > n * P:
        s, i = Decimal(0), k
        while i <= n:
            t = term(i, n)
            if t == 0 or (s > 0 and t < s * Decimal("1e-40")):
                break
            s += t
            i += 1
        return float(s)
    s = sum((term(i, n) for i in range(k)), Decimal(0))
    return float(1 - s)


def cases():
    ns = [1, 2, 3, 7, 10, 37, 100, 1000, 2000, 10_000, 100_000, 123_457, 1_000_000]
    for n in ns:
        mean = n * P
        ks = {0, 1, 2, 3, n, n - 1, max(n // 2, 0)}
        for d in range(-3, 4):
            ks.add(int(mean) + d)
        for m in (1.5, 2, 3, 5, 10):
            ks.add(int(mean * m) + 1)
        # Walk out into the tail: the k where the p-value crosses 1e-10, 1e-50, 1e-100,
        # 1e-200, 1e-300, and past underflow.
        k = max(int(mean) + 1, 1)
        targets = [1e-10, 1e-50, 1e-100, 1e-200, 1e-300]
        step = 1
        while k <= n and targets:
            v = binomtest(k, n, P, alternative="greater").pvalue
            if v < targets[0]:
                ks.update({k - 1, k})
                targets.pop(0)
            k += step
            step = max(1, step * 2 if v > 1e-320 and not targets else step)
        ks.update({k, k + 1})
        for k in sorted(x for x in ks if 0 <= x <= n):
            v = binomtest(k, n, P, alternative="greater").pvalue
            # Subnormal results carry too few digits to compare: keep normal numbers and
            # exact zeros only.
            if v != 0.0 and v < 2.2250738585072014e-308:
                continue
            yield {"k": k, "n": n, "pvalue": v, "exact": exact_sf(k, n)}


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(root, "tests", "fixtures", "binomtest.json")
    data = {
        "what": "scipy.stats.binomtest(k, n, p, alternative='greater').pvalue, and the exact "
        "P(X >= k) in 60-digit decimal arithmetic",
        "scipy_version": scipy.__version__,
        "p": P,
        "cases": list(cases()),
    }
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=0)
        fh.write("\n")
    print(f"{out}: {len(data['cases'])} cases")


if __name__ == "__main__":
    main()
