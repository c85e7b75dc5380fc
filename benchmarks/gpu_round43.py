"""GPU round 43 (session 9): layouts of the batch-8 decode step now that it launches with PDL, per
layer in graphs of 64 layers as `mamba2 bench` times it (checked bit for bit against the default),
then Codestral batch-8 decode with the fastest against the default, alternated.

    PYTHONPATH=src timeout 570 python3 benchmarks/gpu_round43.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round43.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round43.txt.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402

r7.LOG_NAME = "round43.txt"
log = r7.log
B = 8
VARIANTS = {  # overrides of the batch-8 step configuration (STEP_BATCH_CONFIG: bc_pre p32 w1 split pdl)
    "default": {},
    "no pdl": {"pdl": False},
    "p64 w2": {"BLOCK_P": 64, "num_warps": 2},
    "p16 w1": {"BLOCK_P": 16, "num_warps": 1},
    "p32 w2": {"BLOCK_P": 32, "num_warps": 2},
    "tail w2": {"tail_warps": 2},
    "tail w8": {"tail_warps": 8},
    "no bc_pre": {"bc_pre": False},
    "no split": {"split": False},
}


def step_phase(dev, tiny):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import step

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    G = s.ngroups
    n = 2 if tiny else 64
    layers = kb.mixer_layers(s, n, B, dev, dtype, seed=B)
    ref = None
    for name, cfg in VARIANTS.items():
        st = {k: v.clone() for k, v in layers[0].items()}
        out = (kb.call_mixer(functools.partial(step.mixer_decode_step, config=cfg), st, G), st["ssm_state"], st["conv_state"])
        ref = ref or out
        log(f"  step b{B} {name:10s} same as default (one call, same inputs): {all(torch.equal(x, y) for x, y in zip(out, ref))}")
    if dev.type != "cuda":
        return {}
    res: dict = {}
    for _ in range(3):
        for name, cfg in VARIANTS.items():
            try:
                graph = kb.graph_of(functools.partial(step.mixer_decode_step, config=cfg), layers, G)
                res.setdefault(name, []).append(kb.time_ms(graph.replay, dev) / n * 1e3)
                del graph
            except Exception as e:
                r7.err_line(f"step {name}", e)
    med = {}
    for name, v in res.items():
        med[name] = sorted(v)[len(v) // 2]
        log(f"  summary step b{B} {name:10s} " + "/".join(f"{u:.2f}" for u in v) + f" us per layer (median {med[name]:.2f})")
    return med


def model_phase(dev, tiny, med):
    from mamba2_cli.kernels import step

    fastest = min(med, key=med.get) if med else "no split"
    log(f"  model phase: fastest step layout {fastest}")
    saved = list(step.STEP_BATCH_CONFIG)

    def apply(cfg):
        step.STEP_BATCH_CONFIG[:] = saved
        if cfg.get("over"):
            step.STEP_BATCH_CONFIG.append((B, dict(VARIANTS[fastest])))

    configs = {"default": {}}
    if fastest != "default":
        configs[fastest] = {"over": True}
    if "no pdl" not in configs:
        configs["no pdl (previous)"] = {"nopdl": True}

    def apply2(cfg):
        apply(cfg)
        if cfg.get("nopdl"):
            step.STEP_BATCH_CONFIG.append((B, {"pdl": False}))

    r33.model_variants(dev, tiny, configs, apply2, batch=B)


def main():
    got = {}

    def sp(dev, tiny):
        got["med"] = step_phase(dev, tiny)

    r7.round_main(43, lambda dev, tiny: [("step", lambda: sp(dev, tiny)),
                                         ("model", lambda: model_phase(dev, tiny, got.get("med") or {}))])


if __name__ == "__main__":
    main()
