#!/usr/bin/env python3
"""Compare two runs' distances nonce by nonce: ours (`llama-pow compute` output) against
another implementation's (the Python reference run on the same GPU, or another device).

Each file is a JSON object with "nonces" and "dist" (one distance per nonce; `llama-pow
compute` prints exactly that) or a list of {"nonce", "dist"} objects. Nonces present in both
are compared. Prints one JSON object: how many nonces, max and p99 |dist difference|, and the
validity flips at r_target (a nonce valid in one run and not in the other), with the goals of
the CUDA backend: no flips and max <= 1e-5. Exit status 0 when the goals are met, 1 when not,
2 on bad input.

    scripts/compare_distances.py ours.json theirs.json --r-target 1.3931
"""

import argparse
import json
import math
import sys


def load(path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and "nonces" in data and "dist" in data:
        if len(data["nonces"]) != len(data["dist"]):
            raise ValueError(f"{path}: nonces and dist differ in length (filtered output?)")
        pairs = zip(data["nonces"], data["dist"])
    elif isinstance(data, list):
        pairs = ((d["nonce"], d["dist"]) for d in data)
    else:
        raise ValueError(f"{path}: expected {{nonces, dist}} or a list of {{nonce, dist}}")
    out = {}
    for n, d in pairs:
        out[int(n)] = float(d)
    return out


def percentile(sorted_values, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def compare(ours, theirs, r_target, max_goal=1e-5):
    common = sorted(set(ours) & set(theirs))
    diffs = sorted(abs(ours[n] - theirs[n]) for n in common)
    flips = [
        {"nonce": n, "ours": ours[n], "theirs": theirs[n]}
        for n in common
        if (ours[n] < r_target) != (theirs[n] < r_target)
    ]
    result = {
        "nonces_compared": len(common),
        "only_ours": len(set(ours) - set(theirs)),
        "only_theirs": len(set(theirs) - set(ours)),
        "max_abs_diff": diffs[-1] if diffs else 0.0,
        "p99_abs_diff": percentile(diffs, 0.99),
        "mean_abs_diff": sum(diffs) / len(diffs) if diffs else 0.0,
        "r_target": r_target,
        "valid_ours": sum(1 for n in common if ours[n] < r_target),
        "valid_theirs": sum(1 for n in common if theirs[n] < r_target),
        "flips": flips,
        "goal_max_abs_diff": max_goal,
    }
    result["goals_met"] = bool(common) and not flips and result["max_abs_diff"] <= max_goal
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours")
    ap.add_argument("theirs")
    ap.add_argument("--r-target", type=float, required=True)
    ap.add_argument("--max-goal", type=float, default=1e-5)
    args = ap.parse_args(argv)
    try:
        result = compare(load(args.ours), load(args.theirs), args.r_target, args.max_goal)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"compare_distances: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0 if result["goals_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
