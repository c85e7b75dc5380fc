"""GPU round 56 (session 11): conv_early in decode, timed as replays of the decode graph.

Round 55's step alone: b1 5.98 against 6.31 µs per layer, b2 10.47 against 11.48; its decode
figures (bench_model, medians of 3) spread 232-243 tok/s either way, too wide for 0.3 µs a
layer. Here each variant's decode graph is captured once (own state) and its replays are
timed with events, 100 per sample, 9 samples alternated; `early (2)` is a second graph of
the default, so the A/A spread shows.

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round56.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round56.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round56.txt.

Flawed (found in session 12): `owned_state` hands out one state per batch size and decode graphs
are cached by state, so every variant here replayed the first variant's graph. Round 59
(gpu_round59.py) gives each variant its own state and repeated the batch-1 A/B.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round5 as r5  # noqa: E402
import gpu_round7 as r7  # noqa: E402
import gpu_round46 as r46  # noqa: E402

r7.LOG_NAME = "round56.txt"
log = r7.log


def replay_phase(dev, tiny, b, variants, samples=9, reps=100):
    """variants: name -> STEP_CONFIG overrides; µs per decode step (graph replay), alternated."""
    from mamba2_cli.generate import decode_step_fn, owned_state
    from mamba2_cli.kernels import step

    r5.log = lambda m="": log(m)
    model = r5.load_model(dev, tiny)
    restore = r46.restorer()
    tok = torch.randint(3, model.cfg.vocab_size, (b,), device=dev)
    fns, logits = {}, {}
    try:
        for name, cfg in variants.items():
            restore()
            step.STEP_CONFIG.update(cfg)
            st = owned_state(model, b)
            fns[name] = decode_step_fn(model, st, cuda_graph=dev.type == "cuda")
            logits[name] = fns[name](tok).float().clone()  # captures (on CUDA) with this config
    finally:
        restore()
    first = next(iter(logits))
    for name, lg in logits.items():
        log(f"  b{b} {name:10s} first-step logits equal to {first}'s: {torch.equal(lg, logits[first])}")
    if dev.type != "cuda":
        return
    res: dict = {}
    for _ in range(samples):
        for name, fn in fns.items():
            res.setdefault(name, []).append(r7.graph_ms(lambda: fn(tok), dev, reps=reps) * 1e3)
    for name, v in res.items():
        v = sorted(v)
        med = v[len(v) // 2]
        log(f"  summary b{b} {name:10s} " + "/".join(f"{x:.1f}" for x in v)
            + f" us per step (median {med:.1f}, {b * 1e6 / med:.1f} tok/s)")


V = {"early": {}, "late": {"conv_early": False}, "early (2)": {}}


def main():
    r7.round_main(56, lambda dev, tiny: [("b1", lambda: replay_phase(dev, tiny, 1, V)),
                                         ("b2", lambda: replay_phase(dev, tiny, 2, V))])


if __name__ == "__main__":
    main()
