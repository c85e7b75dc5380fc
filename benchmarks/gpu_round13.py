"""GPU round 13 (session 4): what a decode step costs around its CUDA graph.

    PYTHONPATH=src python3 benchmarks/gpu_round13.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round13.py --tiny  # CPU: runs

Per token at batch 1 and 8, from the bare graph replay to the loop `mamba2 run` uses:
  replay           graph replays back to back (device time, CUDA events)
  +argmax          each replay followed by the argmax and the copy of the token into the graph input
  +sync            the same, reading the token on the host every step (.tolist())
  pinned           the token read through a pinned buffer and an event instead
  bench            bench_model (stream_generate at batch 1, the batch loop at 8)
Lines go to stdout and $OUT/round13.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round13.txt"
log = r7.log


def per_token(model, dev, b, n):
    from mamba2_cli.bench import bench_model
    from mamba2_cli.generate import decode_step_fn, owned_state

    st = owned_state(model, b)
    step = decode_step_fn(model, st, cuda_graph=dev.type == "cuda")
    tok = torch.randint(3, model.cfg.vocab_size, (b,), device=dev)
    res = {}

    def timed(fn):
        fn()
        r7.sync(dev)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        r7.sync(dev)
        return (time.perf_counter() - t) / n * 1e3

    graph = getattr(step, "graph", None)
    if graph is not None:
        res["replay"] = timed(graph.replay)
    state = {"t": tok}

    def with_argmax():
        state["t"] = step(state["t"]).argmax(-1)

    res["+argmax"] = timed(with_argmax)

    def with_sync():
        state["t"] = step(state["t"]).argmax(-1)
        state["t"].tolist()

    res["+sync"] = timed(with_sync)
    if dev.type == "cuda":
        buf = torch.empty(b, dtype=torch.long, pin_memory=True)
        ev = torch.cuda.Event()

        def pinned():
            state["t"] = step(state["t"]).argmax(-1)
            buf.copy_(state["t"], non_blocking=True)
            ev.record()
            ev.synchronize()
            buf.tolist()

        res["pinned"] = timed(pinned)
    r = bench_model(model, prompt_len=64, gen_len=n, batch_size=b, repeats=2)
    res["bench"] = r["decode_ms_per_step"]
    for k, v in res.items():
        log(f"  b{b} {k:10s} {v:8.4f} ms per token  ({1e3 / v:7.1f} tok/s per sequence)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, model = r7.setup(13, args.tiny)
    with torch.inference_mode():
        for rep in range(1 if args.tiny else 2):
            for b in (1, 8):
                try:
                    per_token(model, dev, b, 4 if args.tiny else 200)
                except Exception as e:
                    r7.err_line(f"b{b}", e)
    log(f"## done in {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
