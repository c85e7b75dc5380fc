"""GPU round 47 (session 10): round 46's PDL chain with the batch-1 step in its split form.

Round 46 (round46.txt): with add_rmsnorm and the 1-row matvecs under PDL, batch-1 decode ran
241.5 against 237.0 tok/s, bit-identical; the fused batch-1 step under PDL was slower (8.97 against
8.34 µs per layer; decode 230.6), the split step under PDL faster (7.45 µs). Here: the split step
(its norm as a second kernel) with PDL, with and without bc_pre, in the chain. Round 46's step
check launched the PDL step right after the copies that made its inputs: a kernel launched with
PDL may read, before its wait, what the kernel just before it wrote, unflushed (the step reads its
state there). Here the inputs are made, then the device synchronized, then the step runs.

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round47.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round47.py --tiny  # CPU: runs

  step   the batch-1 step as `mamba2 bench` times it (graphs of 64 layers), layouts alternated,
         each checked against the default (relative error of out, states)
  model  decode at batch 1 (bench_model, 128-token prompt), alternated: the defaults; norm and
         matvecs with PDL; that and the split step with PDL; that with bc_pre
The timing graphs pass state_settled (the keyword 1c2f714 added; when this ran, the PDL step always
loaded its state before its wait), as `mamba2 bench` and decode do.
Lines go to stdout and $OUT/round47.txt.
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

r7.LOG_NAME = "round47.txt"
log = r7.log

STEP_VARIANTS = {"default": {}, "split": {"split": True}, "split pdl": {"split": True, "pdl": True},
                 "split pdl tail8": {"split": True, "pdl": True, "tail_warps": 8},
                 "split pdl bc_pre": {"split": True, "pdl": True, "bc_pre": True},
                 "fused pdl": {"pdl": True}}


def step_phase(dev, tiny):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import step

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    n = 2 if tiny else 64
    layers = kb.mixer_layers(s, n, 1, dev, dtype, seed=1)
    ref = None
    for name, cfg in STEP_VARIANTS.items():
        st = {k: v.clone() for k, v in layers[0].items()}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the copies complete before a PDL launch reads them
        out = (kb.call_mixer(functools.partial(step.mixer_decode_step, config=cfg), st, s.ngroups), st["ssm_state"],
               st["conv_state"])
        ref = ref or out
        errs = " ".join(f"{r7.rel_err(x.float(), y.float()):.1e}" for x, y in zip(out, ref))
        log(f"  step b1 {name:18s} bit-identical {all(torch.equal(x, y) for x, y in zip(out, ref))}, rel err {errs}")
    if dev.type != "cuda":
        return {}
    return r33._timed("step b1", {k: None for k in STEP_VARIANTS},
               lambda name: [functools.partial(kb.call_mixer, functools.partial(step.mixer_decode_step,
                                                                                 config=STEP_VARIANTS[name]), st, s.ngroups,
                                               state_settled=True)
                             for st in layers], n, dev)


def model_phase(dev, tiny):
    from mamba2_cli.kernels import step

    base = r46._switches()

    def apply(cfg):
        base(cfg)
        for k in ("split", "bc_pre"):
            if cfg.get(k):
                step.STEP_CONFIG[k] = True

    configs = {"default": {}, "pdl norm+mv": {"norm": True, "mv": [1]},
               "pdl norm+mv+split": {"norm": True, "mv": [1], "step": True, "split": True},
               "pdl norm+mv+split+bc_pre": {"norm": True, "mv": [1], "step": True, "split": True, "bc_pre": True}}
    r33.model_variants(dev, tiny, configs, apply, batch=1)


def main():
    r7.round_main(47, lambda dev, tiny: [("step", lambda: step_phase(dev, tiny)),
                                         ("model b1", lambda: model_phase(dev, tiny))])


if __name__ == "__main__":
    main()
