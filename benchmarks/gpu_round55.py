"""GPU round 55 (session 11): the step's conv loads before the wait (STEP_CONFIG["conv_early"]).

Under PDL with a settled state the step's first kernel loaded the SSM state, D and A before its
wait for in_proj; the conv's state inputs, taps and bias (all settled or constant) came after
it with in_proj's output: 71 of its 77 global loads after the wait on sm_90 (Triton 3.9), 14
with conv_early. Same sums, same bits. Alternated: the step per layer at batch 1, 2 and 4
(graphs of 64 layers, as `mamba2 bench` times it) and batch-1 decode.

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round55.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round55.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round55.txt.
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

r7.LOG_NAME = "round55.txt"
log = r7.log

VARIANTS = {"conv late": {"conv_early": False}, "conv early": {"conv_early": True}}


def step_phase(dev, tiny, b, variants=None):
    """The step per layer at batch b under each of `variants` (name -> STEP_CONFIG overrides;
    default VARIANTS), bit-compared with the first; round 61 uses it too."""
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import step

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    n = 2 if tiny else 64
    layers = kb.mixer_layers(s, n, b, dev, dtype, seed=b)
    variants = variants or VARIANTS
    ref = None
    for name, cfg in variants.items():
        st = {k: v.clone() for k, v in layers[0].items()}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        out = (kb.call_mixer(functools.partial(step.mixer_decode_step, config=cfg), st, s.ngroups, state_settled=True),
               st["ssm_state"], st["conv_state"])
        ref = ref or out
        log(f"  step b{b} {name:10s} bit-identical {all(torch.equal(x, y) for x, y in zip(out, ref))}")
    if dev.type != "cuda":
        return
    r33._timed(f"step b{b}", variants,
               lambda name: [functools.partial(kb.call_mixer, functools.partial(step.mixer_decode_step,
                                                                                 config=variants[name]), st, s.ngroups,
                                               state_settled=True)
                             for st in layers], n, dev, reps=5)


def model_phase(dev, tiny):
    from mamba2_cli.kernels import step

    restore = r46.restorer()

    def apply(cfg):
        restore()
        step.STEP_CONFIG.update(cfg)

    r33.model_variants(dev, tiny, {"conv early": {}, "conv late": {"conv_early": False}}, apply, batch=1)
    r33.model_variants(dev, tiny, {"conv early": {}, "conv late": {"conv_early": False}}, apply, batch=1)


def main():
    r7.round_main(55, lambda dev, tiny: [("step b1", lambda: step_phase(dev, tiny, 1)),
                                         ("step b2", lambda: step_phase(dev, tiny, 2)),
                                         ("step b4", lambda: step_phase(dev, tiny, 4)),
                                         ("model", lambda: model_phase(dev, tiny))])


if __name__ == "__main__":
    main()
