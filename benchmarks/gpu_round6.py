"""Round 6 (issue 4): programmatic dependent launch and the split decode step in the whole model,
without the fused norm (round 5 found the fused norm wrong in the model: see NOTES.md).

    PYTHONPATH=src python3 benchmarks/gpu_round6.py

Whole Codestral-shaped random model, batch 1, CUDA-graph decode: the defaults against the
split step, the split step with PDL, the fused step with PDL, and PDL on the matvecs too.
Each variant is checked against the defaults' logits and greedy tokens before it is timed.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import gpu_round5 as r5  # noqa: E402

from mamba2_cli.kernels import gemv  # noqa: E402


def main():
    import torch

    dev = torch.device("cuda")
    acc = gemv.GEMV_CONFIG[1]
    variants = [
        ("defaults", {}),
        ("split", dict(step_cfg={"split": True, "BLOCK_P": 16, "num_warps": 2, "tail_warps": 4})),
        ("split + pdl", dict(step_cfg={"split": True, "pdl": True, "BLOCK_P": 16, "num_warps": 2, "tail_warps": 4})),
        ("fused + pdl", dict(step_cfg={"pdl": True})),
        ("split + pdl, matvec pdl", dict(gemv1=dataclasses.replace(acc, pdl=True),
                                         step_cfg={"split": True, "pdl": True, "BLOCK_P": 16, "num_warps": 2,
                                                   "tail_warps": 4})),
    ]
    r5.bench_model_variants(None, dev, False, variants, 1, 128, 200, 4.25, "b1")


if __name__ == "__main__":
    main()
