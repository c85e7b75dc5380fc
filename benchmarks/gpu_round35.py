"""GPU round 35 (session 8): the row matvec's layouts per weight shape, and decode at batch 1 with the
row kernel (the new 1-row default) against round 5's acc kernel, alternated.

    PYTHONPATH=src timeout 570 python3 benchmarks/gpu_round35.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round35.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round35.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402
import gpu_round34 as r34  # noqa: E402

r7.LOG_NAME = "round35.txt"
log = r7.log
CONFIGS = {  # (kind, rows per program, warps, evict_first)
    "acc n2 k1024 w4 (round 5)": ("acc", 2, 4, False), "row n1 w4": ("row", 1, 4, False),
    "row n2 w4": ("row", 2, 4, False), "row n1 w4 evict": ("row", 1, 4, True), "row n2 w4 evict": ("row", 2, 4, True),
    "row n1 w8": ("row", 1, 8, False), "row n2 w8": ("row", 2, 8, False), "row n4 w8": ("row", 4, 8, False),
}


def model_phase(dev, tiny):
    from mamba2_cli.kernels import gemv

    default = gemv.GEMV_CONFIG[1]

    def apply(cfg):
        gemv.GEMV_CONFIG[1] = gemv.GemvConfig("acc", 2, 1024, 4) if cfg.get("acc") else default

    r33.model_variants(dev, tiny, {"row (default)": {}, "acc (round 5)": {"acc": True}}, apply)


def main():
    r7.round_main(35, lambda dev, tiny: [("matvec", lambda: r34.matvec_phase(dev, tiny, CONFIGS)),
                                         ("model", lambda: model_phase(dev, tiny))])


if __name__ == "__main__":
    main()
