"""GPU round 64 (session 13): the batch-8 matvec's first weight tile loaded before its wait.

The `dot` kernel (2-8 rows) waits for the kernel that writes x as its first act under PDL, so
its weight stream starts only once that kernel has completed. Round 59's L2 prefetch before the
wait paid 7 µs per step at 1 KB per row and lost beyond. `GemvConfig.early_tile` instead loads
the program's first weight tile (64 x 256, 32 KB) into shared memory before the wait and
multiplies it last: read off the sm_90 compile here, PREEXIT, the tile's bulk copy and its
barrier wait, ACQBULK, the first tile's x as plain loads, then the pipelined loop's first copies
(at once; had the first tile been multiplied first, the loop's copies would have waited for its
x and its MMA). Batch-8 decode graph replays, each variant its own graph (round 59's phase):
every product, only K 4096 (in_proj, lm_head), only K 8192 (out_proj).

    PYTHONPATH=src timeout 300 python3 benchmarks/gpu_round64.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round64.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round64.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round59 as r59  # noqa: E402

r7.LOG_NAME = "round64.txt"  # after the imports above, which set their own


def b8_variants():
    return {"default": lambda: None, "early": r59._dot(early_tile=True),
            "early K4096": r59._dot_k(4096, early_tile=True), "early K8192": r59._dot_k(8192, early_tile=True),
            "early + pf 1024": r59._dot(early_tile=True, prefetch_l2=1024), "default (2)": lambda: None}


def main():
    r7.round_main(64, lambda dev, tiny: [("b8 early tile", lambda: r59.replay_phase(dev, tiny, 8, b8_variants()))])


if __name__ == "__main__":
    main()
