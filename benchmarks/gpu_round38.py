"""GPU round 38 (session 8): decode at batch 1 with the row kernel's evict_first at K 4096 on and off,
alternated (the closing bench at 7d994e1 gave 227.5 tok/s where a9f6582's gave 236.1); with
--out-proj, the same for out_proj's layout (K 8192).

    PYTHONPATH=src timeout 250 python3 benchmarks/gpu_round38.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round38.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round38.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round38.txt"
log = r7.log


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out-proj", action="store_true", help="toggle ROW_BY_K's evict_first for K 8192 instead")
    args = ap.parse_args()
    dev, _ = r7.setup(38, args.tiny, load=False)
    r7.T0 = T0
    r33.log = log
    from mamba2_cli.kernels import gemv

    default, by_k = gemv.GEMV_CONFIG[1], dict(gemv.ROW_BY_K)

    def apply(cfg):
        if args.out_proj:
            bn, warps, evict = by_k[8192]
            gemv.ROW_BY_K[8192] = (bn, warps, cfg.get("evict", evict))
        else:
            gemv.GEMV_CONFIG[1] = default.with_(evict_first=cfg.get("evict", default.evict_first))

    configs = {"evict on": {"evict": True}, "evict off": {"evict": False}}
    r7.run_phases([("model", lambda: r33.model_variants(dev, args.tiny, configs, apply))])


if __name__ == "__main__":
    main()
