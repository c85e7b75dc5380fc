"""GPU round 41 (session 9): round 39's phases with `dott`, the 2-8-row dot kernel fed by tensor
descriptors (TMA), and the batch-8 step with PDL again. It ran at 56c26f7, where `dott` was a kernel of
its own; it is now the dot kernel with `tma=True`.

    PYTHONPATH=src timeout 570 python3 benchmarks/gpu_round41.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round41.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round41.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round39 as r39  # noqa: E402

r7.LOG_NAME = "round41.txt"
r39.ROUND = 41
r39.DOTP = [(64, 256, 4, 4, 1)]
r39.DOTT = [(64, 256, 4, 4), (64, 256, 3, 4), (64, 128, 6, 4), (64, 128, 4, 4), (128, 128, 4, 4), (128, 128, 4, 8),
            (64, 512, 2, 4), (32, 256, 4, 4), (128, 64, 6, 4), (256, 64, 4, 8)]

if __name__ == "__main__":
    r39.main()
