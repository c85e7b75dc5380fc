"""GPU round 42 (session 9): the TMA-fed dot kernel with deeper pipelines, and stream-K (`dotp`) fed
by TMA, per weight shape at 8 rows; then batch-8 decode with the best, alternated (round 39's phases).

    PYTHONPATH=src timeout 570 python3 benchmarks/gpu_round42.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round42.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round42.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round39 as r39  # noqa: E402

r7.LOG_NAME = "round42.txt"
r39.ROUND = 42
r39.DOTP = []
r39.DOTT = [(64, 256, 4, 4), (64, 256, 5, 4), (128, 128, 6, 4), (128, 128, 5, 4), (64, 128, 8, 4), (32, 512, 4, 4)]
r39.DOTPT = [(64, 256, 4, 4, 1), (64, 256, 5, 4, 1), (128, 128, 6, 4, 1), (64, 128, 4, 4, 2)]

if __name__ == "__main__":
    r39.main()
