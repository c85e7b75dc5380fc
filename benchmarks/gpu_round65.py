"""GPU round 65 (session 13): the batch-1 greedy loop one step ahead (`generate.AHEAD`).

Where the caller leaves the state to the loop (`mamba2 run` without --save-state, `mamba2
bench`), DecodeGraph's greedy form is captured a second time with its own pinned slot, and the
loop launches the step after next before it waits for the next token, so the GPU is never idle
while the host waits, reads and hands out a token. Round 57 timed a sketch of it at 4054
against 4089 µs per step. Alternated: bench_model at batch 1 (stream_generate) with the switch
on and off, and the graph's replays back to back for reference; greedy tokens compared (on,
off, and with a state the caller keeps).

    PYTHONPATH=src timeout 300 python3 benchmarks/gpu_round65.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round65.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round65.txt.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round5 as r5  # noqa: E402
import gpu_round7 as r7  # noqa: E402

r7.LOG_NAME = "round65.txt"
log = r7.log


def loop_phase(dev, tiny):
    import importlib

    from mamba2_cli.bench import _NullTokenizer, bench_model
    from mamba2_cli.generate import decode_step_fn, owned_state

    g = importlib.import_module("mamba2_cli.generate")
    r5.log = lambda m="": log(m)
    model = r5.load_model(dev, tiny)
    ids = torch.randint(3, model.cfg.vocab_size, (40 if tiny else 128,), generator=torch.Generator().manual_seed(5))
    toks = {}
    for on in (True, False):
        g.AHEAD = on
        toks[on] = g.generate(model, _NullTokenizer(), ids.tolist(), max_tokens=33, ignore_eos=True).token_ids
    g.AHEAD = True
    kept = g.generate(model, _NullTokenizer(), ids.tolist(), max_tokens=33, ignore_eos=True,
                      state=model.new_state(1)).token_ids
    log(f"  greedy tokens equal with the switch on and off: {toks[True] == toks[False]}; "
        f"with a kept state: {kept == toks[True]}")
    if dev.type != "cuda":
        return
    tok = torch.randint(3, model.cfg.vocab_size, (1,), device=dev)
    fn = decode_step_fn(model, owned_state(model, 1), True)
    fn(tok)
    res: dict = {}
    try:
        for _ in range(5):
            res.setdefault("replays", []).append(r7.graph_ms(lambda: fn(tok), dev, reps=100) * 1e3)
            for on in (True, False):
                g.AHEAD = on
                r = bench_model(model, prompt_len=128, gen_len=128, batch_size=1, repeats=2)
                res.setdefault(f"bench, ahead {'on' if on else 'off'}", []).append(1e6 / r["decode_tok_s"])
    finally:
        g.AHEAD = True
    for name, v in res.items():
        v = sorted(v)
        med = v[len(v) // 2]
        log(f"  summary {name:26s} " + "/".join(f"{x:.1f}" for x in v) + f" us per step (median {med:.1f}, "
            f"{1e6 / med:.1f} tok/s)")


def main():
    r7.round_main(65, lambda dev, tiny: [("loop", lambda: loop_phase(dev, tiny))])


if __name__ == "__main__":
    main()
