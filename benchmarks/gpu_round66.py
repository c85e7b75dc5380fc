"""GPU round 66 (session 13): batch 8's out_proj in tiles of 32 rows.

Codestral's out_proj (4096 x 8192) is 64 tiles of 64 rows for the `dot` kernel: at one program
per SM, 68 of the H200's 132 SMs have no tile. Tiles of 32 rows give 128 programs (the MMA is
then Ampere's m16n8k16, not wgmma; shared memory per program halves, so two fit an SM). Batch-8
decode graph replays, each variant its own graph (round 59's phase), MULTI_BY_K[8192] replaced.

    PYTHONPATH=src timeout 300 python3 benchmarks/gpu_round66.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round66.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round66.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round59 as r59  # noqa: E402

r7.LOG_NAME = "round66.txt"  # after the imports above, which set their own


def b8_variants():
    k = r59._dot_k
    return {"default": lambda: None,
            "n32 k256 s4 early": k(8192, block_n=32, early_tile=True),
            "n32 k256 s4": k(8192, block_n=32, early_tile=False),
            "n32 k512 s3 early": k(8192, block_n=32, block_k=512, num_stages=3, early_tile=True),
            "n32 k256 s4 w2 early": k(8192, block_n=32, num_warps=2, early_tile=True),
            "default (2)": lambda: None}


def main():
    r7.round_main(66, lambda dev, tiny: [("b8 out_proj n32", lambda: r59.replay_phase(dev, tiny, 8, b8_variants()))])


if __name__ == "__main__":
    main()
