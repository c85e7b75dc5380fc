"""GPU round 59 (session 12): the dot matvec's weight rows asked into L2 before its wait (b8),
and round 56's conv_early A/B in decode done again with one graph per variant.

The `dot` kernel (2-8 rows) waited for the kernel before it as its first act, so nothing of its
weights moved while that kernel finished (the `row` kernel at batch 1 loads its rows before the
wait). `GemvConfig.prefetch_l2`: the first N bytes of each program's 64 weight rows are asked
into L2 (`cp.async.bulk.prefetch.L2`) before the wait.

Round 56 timed every variant on one graph: `owned_state` hands out one state per batch size,
and decode graphs are cached by state, so its "early" and "late" were the same capture. Here
each variant decodes its own `new_state`, so each captures its own graph.

Each variant's decode graph is timed as replays with events, 100 per sample, 9 samples
alternated; "(2)" is a second graph of the default, so the A/A spread shows.

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round59.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round59.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round59.txt.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round5 as r5  # noqa: E402
import gpu_round7 as r7  # noqa: E402
import gpu_round46 as r46  # noqa: E402

r7.LOG_NAME = "round59.txt"
log = r7.log


def replay_phase(dev, tiny, b, variants, samples=9, reps=100):
    """variants: name -> fn() that sets the switches (after they are restored); µs per decode
    step (graph replays), alternated. Each variant captures its own graph on its own state."""
    from mamba2_cli.generate import decode_step_fn
    from mamba2_cli.kernels import gemv

    r5.log = lambda m="": log(m)
    model = r5.load_model(dev, tiny)
    restore = r46.restorer()
    by_k = dict(gemv.MULTI_BY_K)
    tok = torch.randint(3, model.cfg.vocab_size, (b,), device=dev)
    fns, logits, graphs = {}, {}, set()
    try:
        for name, apply in variants.items():
            restore()
            gemv.MULTI_BY_K.clear()
            gemv.MULTI_BY_K.update(by_k)
            apply()
            fns[name] = decode_step_fn(model, model.new_state(b), cuda_graph=dev.type == "cuda")
            graphs.add(id(fns[name]))
            logits[name] = fns[name](tok).float().clone()  # captures (on CUDA) with these switches
    finally:
        restore()
        gemv.MULTI_BY_K.clear()
        gemv.MULTI_BY_K.update(by_k)
    log(f"  b{b}: {len(graphs)} graphs for {len(variants)} variants")
    first = next(iter(logits))
    for name, lg in logits.items():
        log(f"  b{b} {name:14s} first-step logits equal to {first}'s: {torch.equal(lg, logits[first])}")
    if dev.type != "cuda":
        return
    res: dict = {}
    for _ in range(samples):
        for name, fn in fns.items():
            res.setdefault(name, []).append(r7.graph_ms(lambda: fn(tok), dev, reps=reps) * 1e3)
    for name, v in res.items():
        v = sorted(v)
        med = v[len(v) // 2]
        log(f"  summary b{b} {name:14s} " + "/".join(f"{x:.1f}" for x in v)
            + f" us per step (median {med:.1f}, {1e6 / med:.1f} tok/s per sequence)")


def _dot(**kw):
    """Every 2-8-row product with these GemvConfig fields."""
    from mamba2_cli.kernels import gemv

    def apply():
        for rows in (2, 4, 8):
            gemv.GEMV_CONFIG[rows] = gemv.GEMV_CONFIG[rows].with_(**kw)
    return apply


def _dot_k(k, **kw):
    """Only the products over K = k (4096: in_proj and lm_head; 8192: out_proj)."""
    from mamba2_cli.kernels import gemv

    def apply():
        gemv.MULTI_BY_K[k] = gemv.GEMV_CONFIG[8].with_(**kw)
    return apply


def _step(**kw):
    from mamba2_cli.kernels import step

    return lambda: step.STEP_CONFIG.update(kw)


def b8_variants():
    return {"default": lambda: None, "pf 1024": _dot(prefetch_l2=1024), "pf 2048": _dot(prefetch_l2=2048),
            "pf 4096": _dot(prefetch_l2=4096), "pf 8192": _dot(prefetch_l2=8192),
            "pf 2048 K4096": _dot_k(4096, prefetch_l2=2048), "pf 4096 K8192": _dot_k(8192, prefetch_l2=4096),
            "default (2)": lambda: None}


def b1_variants():
    return {"early": lambda: None, "late": _step(conv_early=False), "early (2)": lambda: None}


def main():
    r7.round_main(59, lambda dev, tiny: [("b8 prefetch", lambda: replay_phase(dev, tiny, 8, b8_variants())),
                                         ("b1 conv_early", lambda: replay_phase(dev, tiny, 1, b1_variants()))])


if __name__ == "__main__":
    main()
