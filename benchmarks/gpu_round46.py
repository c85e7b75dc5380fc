"""GPU round 46 (session 10): programmatic dependent launch along the whole batch-1 decode chain.

Sessions 2-3 tried PDL at batch 1 with the `acc` matvec (only its first weight tile fetched before
the wait) and with add_rmsnorm launched plainly, so in_proj could not start before the norm had
ended; it measured noise. Now every decode kernel can take part: add_rmsnorm (NORM_CONFIG add_pdl,
up to 8 rows) lets the next kernel launch at once and loads its weight before it waits; the `row`
matvec (GemvConfig.pdl) loads its whole weight rows before it waits, so in_proj's first programs
stream their rows while the norm runs, and out_proj's while the step finishes; the step's own PDL
form (STEP_CONFIG pdl) loads its state before it waits. The `dot` matvec of 2-8 rows only waits
first (its pipeline takes x with the weights).

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round46.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round46.py --tiny  # CPU: runs

  step   the batch-1 step as `mamba2 bench` times it (graphs of 64 layers), PDL off and on,
         alternated, checked bit for bit
  model  decode at batch 1 (bench_model, 128-token prompt), alternated: the defaults; the whole
         chain with PDL; the norm and matvecs only; the step only; then batch 8: the defaults
         against add_rmsnorm and the dot matvec with PDL
The timing graphs pass state_settled (the keyword 1c2f714 added; when this ran, the PDL step always
loaded its state before its wait), as `mamba2 bench` and decode do.
Lines go to stdout and $OUT/round46.txt.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402

r7.LOG_NAME = "round46.txt"
log = r7.log


def step_phase(dev, tiny):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import step

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    n = 2 if tiny else 64
    layers = kb.mixer_layers(s, n, 1, dev, dtype, seed=1)
    variants = {"default": {}, "pdl": {"pdl": True}, "split pdl": {"pdl": True, "split": True}}
    ref = None
    for name, cfg in variants.items():
        st = {k: v.clone() for k, v in layers[0].items()}
        out = (kb.call_mixer(functools.partial(step.mixer_decode_step, config=cfg), st, s.ngroups), st["ssm_state"],
               st["conv_state"])
        ref = ref or out
        log(f"  step b1 {name:10s} same as default: {all(torch.equal(x, y) for x, y in zip(out, ref))}")
    if dev.type != "cuda":
        return
    r33._timed("step b1", {k: None for k in variants},
               lambda name: [functools.partial(kb.call_mixer, functools.partial(step.mixer_decode_step,
                                                                                 config=variants[name]), st, s.ngroups,
                                               state_settled=True)
                             for st in layers], n, dev)


def restorer():
    """A function that puts the decode switches (GEMV_CONFIG, NORM_CONFIG, STEP_CONFIG and
    STEP_BATCH_CONFIG) back as they are now; rounds 47-49 use it too."""
    from mamba2_cli.kernels import gemv, norm, step

    saved = [(d, dict(d)) for d in (gemv.GEMV_CONFIG, norm.NORM_CONFIG, step.STEP_CONFIG)]
    batch = list(step.STEP_BATCH_CONFIG)

    def restore():
        for d, copy in saved:
            d.clear()
            d.update(copy)
        step.STEP_BATCH_CONFIG[:] = batch
    return restore


def _switches():
    from mamba2_cli.kernels import gemv, norm, step

    restore = restorer()

    def apply(cfg):
        restore()
        if cfg.get("norm"):
            norm.NORM_CONFIG["add_pdl"] = True
        if cfg.get("mv"):
            for rows in cfg["mv"]:
                gemv.GEMV_CONFIG[rows] = gemv.GEMV_CONFIG[rows].with_(pdl=True)
        if cfg.get("step"):
            step.STEP_CONFIG["pdl"] = True
    return apply


def model_phase(dev, tiny, batch):
    configs = {1: {"default": {}, "pdl chain": {"norm": True, "mv": [1], "step": True},
                   "pdl norm+mv": {"norm": True, "mv": [1]}, "pdl step": {"step": True}},
               8: {"default": {}, "pdl norm+dot": {"norm": True, "mv": [2, 4, 8]}}}[batch]
    r33.model_variants(dev, tiny, configs, _switches(), batch=batch)


def main():
    r7.round_main(46, lambda dev, tiny: [("step", lambda: step_phase(dev, tiny)),
                                         ("model b1", lambda: model_phase(dev, tiny, 1)),
                                         ("model b8", lambda: model_phase(dev, tiny, 8))])


if __name__ == "__main__":
    main()
