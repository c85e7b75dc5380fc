"""GPU round 37 (session 8): the row matvec's last knobs (evict_first at K 4096, 16 warps, 4 rows at
K 8192) and add_rmsnorm's warps for one row, in decode at batch 1.

    PYTHONPATH=src timeout 400 python3 benchmarks/gpu_round37.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round37.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round37.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402
import gpu_round34 as r34  # noqa: E402

r7.LOG_NAME = "round37.txt"
log = r7.log
CONFIGS = {  # (kind, rows per program, warps, evict_first)
    "row n1 w8": ("row", 1, 8, False), "row n1 w8 evict": ("row", 1, 8, True), "row n1 w16": ("row", 1, 16, False),
    "row n2 w4 evict": ("row", 2, 4, True), "row n2 w2 evict": ("row", 2, 2, True), "row n4 w4 evict": ("row", 4, 4, True),
}


def model_phase(dev, tiny):
    from mamba2_cli.kernels import norm


    def apply(cfg):
        norm.NORM_CONFIG["add_warps"] = cfg.get("add_warps")

    configs = {"default (8 warps)": {}, "add_rmsnorm 4 warps": {"add_warps": 4}, "add_rmsnorm 16 warps": {"add_warps": 16}}
    r33.model_variants(dev, tiny, configs, apply)


def main():
    r7.round_main(37, lambda dev, tiny: [("matvec", lambda: r34.matvec_phase(dev, tiny, CONFIGS)),
                                         ("model", lambda: model_phase(dev, tiny))])


if __name__ == "__main__":
    main()
