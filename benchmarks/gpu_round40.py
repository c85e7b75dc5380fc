"""GPU round 40 (session 9): round 39 again with `dotp` as stream-K (each program an equal share of
the (tile, K tile) units, a cut tile summed through scratch), and the batch-8 step with PDL.

    PYTHONPATH=src timeout 570 python3 benchmarks/gpu_round40.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round40.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round40.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round39 as r39  # noqa: E402

r7.LOG_NAME = "round40.txt"
r39.ROUND = 40
r39.DOTP = [(64, 256, 4, 4, 1), (64, 128, 6, 4, 1), (64, 128, 4, 4, 2), (64, 128, 4, 4, 3), (32, 256, 4, 4, 2),
            (32, 256, 4, 4, 3), (128, 128, 4, 8, 1), (64, 256, 4, 8, 1), (32, 128, 4, 4, 4)]

if __name__ == "__main__":
    r39.main()
