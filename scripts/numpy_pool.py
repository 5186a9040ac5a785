#!/usr/bin/env python3
"""Time the reference's way of drawing the weight pool with numpy, for benches/pool.rs.

The stream is seeded like the reference's seeded generator: the entropy is SHA-256 of
"{block_hash}_{i}" for i in 0..num_hashes, each digest read as eight little-endian u32
words, fed to SeedSequence -> PCG64 -> Generator. The pool is
normal(0, 0.02, n) rounded to float32 and then to float16.

Usage: numpy_pool.py N [BLOCK_HASH] [NUM_HASHES]
Prints one JSON object: {"n", "seconds", "sha256"} (sha256 of the float16 values,
little-endian; hashing is not timed).
"""

import hashlib
import json
import sys
import time

import numpy as np


def entropy(seed_string, num_hashes):
    words = []
    for i in range(num_hashes):
        digest = hashlib.sha256(f"{seed_string}_{i}".encode("utf-8")).digest()
        words.extend(int.from_bytes(digest[j:j + 4], "little") for j in range(0, 32, 4))
    return words


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 888_156_147
    block_hash = (sys.argv[2] if len(sys.argv) > 2 else
                  "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    num_hashes = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    start = time.perf_counter()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy(block_hash, num_hashes))))
    pool = rng.normal(0.0, 0.02, n).astype(np.float32).astype(np.float16)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256(pool.astype("<f2").tobytes()).hexdigest()
    print(json.dumps({"n": n, "seconds": seconds, "sha256": digest}))


if __name__ == "__main__":
    main()
