"""GPU round 49 (session 10): the PDL chain as the new defaults, against the old ones.

The new defaults (rounds 46-48): add_rmsnorm up to 8 rows, the 1-row `row` matvec and the 2-8-row
`dot` matvec launched with PDL; the batch-1 step split (its norm a second kernel, 8 warps) and
under PDL. Here, alternated: the step per layer at batch 1, 2 and 4 (graphs of 64 layers, as
`mamba2 bench` times it), old layout against new, and the new with the state loaded after the
wait (the form that is safe whatever kernel came just before); decode at batch 1 and 8, old
defaults against new, and batch 1 with the state loaded after the wait. When this ran (before
1c2f714) that was a STEP_CONFIG key, `pdl_state`; the script now passes the `state_settled`
keyword that replaced it (decode passes True).

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round49.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round49.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round49.txt.
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

r7.LOG_NAME = "round49.txt"
log = r7.log

OLD_STEP = {"split": False, "pdl": False, "tail_warps": 4}  # the fused step of sessions 3-9 (1-7 rows)


def step_phase(dev, tiny, b):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import step

    variants = {"old": OLD_STEP, "new": {}, "new, state after wait": {}}
    settled = {"old": False, "new": True, "new, state after wait": False}
    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    n = 2 if tiny else 64
    layers = kb.mixer_layers(s, n, b, dev, dtype, seed=b)
    ref = None
    for name, cfg in variants.items():
        st = {k: v.clone() for k, v in layers[0].items()}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        out = (kb.call_mixer(functools.partial(step.mixer_decode_step, config=cfg), st, s.ngroups,
                             state_settled=settled[name]), st["ssm_state"], st["conv_state"])
        ref = ref or out
        errs = " ".join(f"{r7.rel_err(x.float(), y.float()):.1e}" for x, y in zip(out, ref))
        log(f"  step b{b} {name:22s} rel err against old {errs}")
    if dev.type != "cuda":
        return
    r33._timed(f"step b{b}", variants,
               lambda name: [functools.partial(kb.call_mixer, functools.partial(step.mixer_decode_step,
                                                                                 config=variants[name]), st, s.ngroups,
                                               state_settled=settled[name])
                             for st in layers], n, dev)


def _apply():
    from mamba2_cli.kernels import gemv, norm, step, triton_backend

    restore = r46.restorer()

    def unsettled(*a, **k):  # decode's step without its promise: the state loads after the wait
        return step.mixer_decode_step(*a, **{**k, "state_settled": False})

    def apply(cfg):
        triton_backend.mixer_decode_step = unsettled if cfg.get("unsettled") else step.mixer_decode_step
        restore()
        if cfg.get("old"):
            norm.NORM_CONFIG["add_pdl"] = False
            for rows in (1, 2, 4, 8):
                gemv.GEMV_CONFIG[rows] = gemv.GEMV_CONFIG[rows].with_(pdl=False)
            step.STEP_CONFIG.update(OLD_STEP)
    return apply


def model_phase(dev, tiny, batch):
    configs = {"old": {"old": True}, "new": {}}
    if batch == 1:
        configs["new, state after wait"] = {"unsettled": True}
    r33.model_variants(dev, tiny, configs, _apply(), batch=batch)


def main():
    r7.round_main(49, lambda dev, tiny: [("step b1", lambda: step_phase(dev, tiny, 1)),
                                         ("step b2", lambda: step_phase(dev, tiny, 2)),
                                         ("step b4", lambda: step_phase(dev, tiny, 4)),
                                         ("model b1", lambda: model_phase(dev, tiny, 1)),
                                         ("model b8", lambda: model_phase(dev, tiny, 8))])


if __name__ == "__main__":
    main()
