"""GPU round 48 (session 10): the batch-1 split step under PDL, its layouts, then in the decode chain.

Round 47 (round47.txt): the split step under PDL took 7.39 µs per layer, with its norm kernel at 8
warps 6.31, against 8.32 for the fused default; batch-1 decode with add_rmsnorm, the 1-row
matvecs and the split step under PDL (norm kernel at 4 warps) 246.3 against 236.8 tok/s. Here:
the norm kernel's warps and the first kernel's P blocks and warps, then decode with the norm
kernel at 8 warps and with the fastest layout.

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round48.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round48.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round48.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402
import gpu_round46 as r46  # noqa: E402
import gpu_round47 as r47  # noqa: E402

r7.LOG_NAME = "round48.txt"
log = r7.log

SPLIT = {"split": True, "pdl": True}
r47.STEP_VARIANTS.clear()
r47.STEP_VARIANTS.update({
    "default": {},
    "split pdl tail4": {**SPLIT, "tail_warps": 4},
    "split pdl tail8": {**SPLIT, "tail_warps": 8},
    "split pdl tail16": {**SPLIT, "tail_warps": 16},
    "split pdl tail8 p16 w2": {**SPLIT, "tail_warps": 8, "BLOCK_P": 16, "num_warps": 2},
    "split pdl tail8 p32 w4": {**SPLIT, "tail_warps": 8, "BLOCK_P": 32, "num_warps": 4},
    "split pdl tail8 p32 w2": {**SPLIT, "tail_warps": 8, "BLOCK_P": 32, "num_warps": 2},
    "split pdl tail8 p8 w2": {**SPLIT, "tail_warps": 8, "BLOCK_P": 8, "num_warps": 2},
    "split pdl tail8 p64 w4": {**SPLIT, "tail_warps": 8, "BLOCK_P": 64, "num_warps": 4},
})


def model_phase(dev, tiny, med):
    from mamba2_cli.kernels import step

    base = r46._switches()
    chain = {"norm": True, "mv": [1], "step": True}

    def apply(cfg):
        base(cfg)
        step.STEP_CONFIG.update(cfg.get("over", {}))

    configs = {"default": {}, "chain tail4": {**chain, "over": {**SPLIT, "tail_warps": 4}},
               "chain tail8": {**chain, "over": {**SPLIT, "tail_warps": 8}}}
    if med:
        fastest = min(med, key=med.get)
        log(f"  model phase: fastest step layout {fastest}")
        if fastest not in ("default", "split pdl tail4", "split pdl tail8"):
            configs["chain " + fastest] = {**chain, "over": r47.STEP_VARIANTS[fastest]}
    r33.model_variants(dev, tiny, configs, apply, batch=1)


def main():
    got = {}

    def sp(dev, tiny):
        got["med"] = r47.step_phase(dev, tiny)

    r7.round_main(48, lambda dev, tiny: [("step", lambda: sp(dev, tiny)),
                                         ("model b1", lambda: model_phase(dev, tiny, got.get("med") or {}))])


if __name__ == "__main__":
    main()
