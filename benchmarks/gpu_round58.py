"""GPU round 58 (session 11): the greedy decode graph in `mamba2 bench`'s batch-1 loop.

`generate.GREEDY_GRAPH`: one greedy sequence on a GPU decodes through DecodeGraph's greedy form
(argmax, feedback and the pinned copy inside the graph; one launch and one event wait per step)
instead of a replay, an argmax launch and a blocking read. Alternated: bench_model at batch 1
(stream_generate, the loop `mamba2 run` uses) with the switch on and off, and the replays back
to back for reference; greedy tokens compared.

    PYTHONPATH=src timeout 300 python3 benchmarks/gpu_round58.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round58.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round58.txt.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round5 as r5  # noqa: E402
import gpu_round7 as r7  # noqa: E402

r7.LOG_NAME = "round58.txt"
log = r7.log


def loop_phase(dev, tiny, switch="GREEDY_GRAPH", label="greedy graph"):
    """bench_model b1 with generate's `switch` on and off, alternated, and the replays; round 65
    times generate.AHEAD with it (and also compares the tokens of a state the caller keeps)."""
    import importlib

    from mamba2_cli.bench import _NullTokenizer, bench_model
    from mamba2_cli.generate import decode_step_fn, owned_state

    g = importlib.import_module("mamba2_cli.generate")
    r5.log = lambda m="": log(m)
    model = r5.load_model(dev, tiny)
    ids = torch.randint(3, model.cfg.vocab_size, (40 if tiny else 128,), generator=torch.Generator().manual_seed(5))
    toks = {}
    for on in (True, False):
        setattr(g, switch, on)
        toks[on] = g.generate(model, _NullTokenizer(), ids.tolist(), max_tokens=33, ignore_eos=True).token_ids
    setattr(g, switch, True)
    line = f"  greedy tokens equal with the switch on and off: {toks[True] == toks[False]}"
    if switch != "GREEDY_GRAPH":
        kept = g.generate(model, _NullTokenizer(), ids.tolist(), max_tokens=33, ignore_eos=True,
                          state=model.new_state(1)).token_ids
        line += f"; with a kept state: {kept == toks[True]}"
    log(line)
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
                setattr(g, switch, on)
                r = bench_model(model, prompt_len=128, gen_len=128, batch_size=1, repeats=2)
                res.setdefault(f"bench, {label} {'on' if on else 'off'}", []).append(1e6 / r["decode_tok_s"])
    finally:
        setattr(g, switch, True)
    for name, v in res.items():
        v = sorted(v)
        med = v[len(v) // 2]
        log(f"  summary {name:26s} " + "/".join(f"{x:.1f}" for x in v) + f" us per step (median {med:.1f}, "
            f"{1e6 / med:.1f} tok/s)")


def main():
    r7.round_main(58, lambda dev, tiny: [("loop", lambda: loop_phase(dev, tiny))])


if __name__ == "__main__":
    main()
