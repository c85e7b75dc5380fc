"""GPU round 50 (session 10): the 1-row matvec's layout under PDL, in batch-1 decode.

Under PDL (rounds 46-49) in_proj's and out_proj's programs load their weight rows before waiting
for their input, so a layout with more rows per resident program holds more bytes in flight
while the norm or the step still runs. Decode at batch 1 (bench_model, 128-token prompt),
alternated: the defaults (K 4096: 1 row, 8 warps; K 8192: 2 rows, 4 warps, evict_first)
against 2 rows at K 4096 and 1, 2 or 4 rows at 8 warps for K 8192.

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round50.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round50.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round50.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402

r7.LOG_NAME = "round50.txt"
log = r7.log

CONFIGS = {  # K -> (rows per program, warps, evict_first) overrides of ROW_BY_K
    "default": {},
    "in n2 w8": {4096: (2, 8, False)},
    "out n1 w8": {8192: (1, 8, True)},
    "out n2 w8": {8192: (2, 8, True)},
    "out n4 w8": {8192: (4, 8, True)},
}


def model_phase(dev, tiny):
    from mamba2_cli.kernels import gemv

    saved = dict(gemv.ROW_BY_K)

    def apply(cfg):
        gemv.ROW_BY_K.clear()
        gemv.ROW_BY_K.update(saved)
        gemv.ROW_BY_K.update(cfg)

    r33.model_variants(dev, tiny, CONFIGS, apply, batch=1)


def main():
    r7.round_main(50, lambda dev, tiny: [("model b1", lambda: model_phase(dev, tiny))])


if __name__ == "__main__":
    main()
