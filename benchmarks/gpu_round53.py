"""GPU round 53 (session 11): the batch-1 step's registers, so out_proj can load early.

At batch 1 the step's first kernel (p16 w4, split, PDL) takes 126 registers per thread on
sm_90: its 512 programs hold ~4 of every SM's register file, so out_proj's programs, launched
early under PDL to stream their weight rows while the step runs, find no room until the step's
programs end. Here STEP_CONFIG["maxnreg"] caps them (64: 8 KB per program, half the file free;
80, 96), at the cost of spills (sm_90 compile: 240 / 152 / 88 bytes of stack). Alternated:
the step alone per layer (graphs of 64 layers, as `mamba2 bench` times it) and batch-1 decode.

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round53.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round53.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round53.txt.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402
import gpu_round46 as r46  # noqa: E402

r7.LOG_NAME = "round53.txt"
log = r7.log

VARIANTS = {"default": {}, "r64": {"maxnreg": 64}, "r80": {"maxnreg": 80}, "r96": {"maxnreg": 96}}


def step_phase(dev, tiny):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import step

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    n = 2 if tiny else 64
    layers = kb.mixer_layers(s, n, 1, dev, dtype, seed=1)
    ref = None
    for name, cfg in VARIANTS.items():
        st = {k: v.clone() for k, v in layers[0].items()}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        out = (kb.call_mixer(functools.partial(step.mixer_decode_step, config=cfg), st, s.ngroups), st["ssm_state"],
               st["conv_state"])
        ref = ref or out
        log(f"  step b1 {name:8s} bit-identical {all(torch.equal(x, y) for x, y in zip(out, ref))}")
    if dev.type != "cuda":
        return
    r33._timed("step b1", VARIANTS,
               lambda name: [functools.partial(kb.call_mixer, functools.partial(step.mixer_decode_step,
                                                                                 config=VARIANTS[name]), st, s.ngroups,
                                               state_settled=True)
                             for st in layers], n, dev, reps=5)


def model_phase(dev, tiny):
    from mamba2_cli.kernels import step

    restore = r46.restorer()

    def apply(cfg):
        restore()
        step.STEP_CONFIG.update(cfg)

    r33.model_variants(dev, tiny, VARIANTS, apply, batch=1)


def main():
    r7.round_main(53, lambda dev, tiny: [("step", lambda: step_phase(dev, tiny)),
                                         ("model", lambda: model_phase(dev, tiny))])


if __name__ == "__main__":
    main()
