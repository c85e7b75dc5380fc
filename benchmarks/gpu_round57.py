"""GPU round 57 (session 11): what the decode loop adds to the graph replay, batch 1.

Round 56 timed batch-1 decode graph replays back to back at 3917 µs per step (255 tok/s),
where `mamba2 bench` has given 4.0-4.26 ms per token on other calls. Here, on one machine and
alternated: (a) replays back to back; (b) per step, replay + argmax + the token read by the
host (`tolist`), as bench's batched loop; (c) bench_model at batch 1 (stream_generate, the
loop `mamba2 run` uses); (d) a graph that also takes the argmax, feeds it back as the next
input and copies it to pinned host memory, the host waiting on an event; (e) as (d) with one
step issued ahead (the upper bound of hiding the host: not state-safe as written).

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round57.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round57.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round57.txt.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round5 as r5  # noqa: E402
import gpu_round7 as r7  # noqa: E402

r7.LOG_NAME = "round57.txt"
log = r7.log


def loop_phase(dev, tiny):
    from mamba2_cli.bench import bench_model
    from mamba2_cli.generate import decode_one_token, decode_step_fn, owned_state

    r5.log = lambda m="": log(m)
    model = r5.load_model(dev, tiny)
    if dev.type != "cuda":
        log("  (needs CUDA)")
        return
    n = 128
    tok = torch.randint(3, model.cfg.vocab_size, (1,), device=dev)
    st_a = owned_state(model, 1)
    fn = decode_step_fn(model, st_a, True)
    fn(tok)

    # (d): argmax in the graph, fed back, copied to pinned memory.
    st_d = model.new_state(1)
    tokens = tok.clone()
    pinned = [torch.empty(1, dtype=torch.long, pin_memory=True) for _ in range(2)]
    graphs = []
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(2):
            decode_one_token(model, tokens, st_d)
    torch.cuda.current_stream(dev).wait_stream(side)
    for k in range(2):
        g = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(g):
            nxt = decode_one_token(model, tokens, st_d).argmax(-1)
            tokens.copy_(nxt)
            pinned[k].copy_(nxt, non_blocking=True)
        graphs.append(g)
    events = [torch.cuda.Event() for _ in range(2)]

    def run_a():
        r7.sync(dev)
        t = time.perf_counter()
        for _ in range(n):
            fn(tok)
        r7.sync(dev)
        return (time.perf_counter() - t) / n

    def run_b():
        token = tok
        r7.sync(dev)
        t = time.perf_counter()
        for _ in range(n):
            token = fn(token).argmax(-1)
            token.tolist()
        return (time.perf_counter() - t) / n

    def run_c():
        r = bench_model(model, prompt_len=128, gen_len=n, batch_size=1, repeats=1)
        return 1.0 / r["decode_tok_s"]

    def run_d():
        r7.sync(dev)
        t = time.perf_counter()
        for _ in range(n):
            graphs[0].replay()
            events[0].record()
            events[0].synchronize()
            pinned[0].item()
        return (time.perf_counter() - t) / n

    def run_e():
        r7.sync(dev)
        t = time.perf_counter()
        graphs[0].replay()
        events[0].record()
        for i in range(1, n + 1):
            k = i % 2
            graphs[k].replay()
            events[k].record()
            events[1 - k].synchronize()
            pinned[1 - k].item()
        events[n % 2].synchronize()
        return (time.perf_counter() - t) / (n + 1)

    runs = {"a replay": run_a, "b +argmax+tolist": run_b, "c bench_model": run_c, "d graph argmax": run_d,
            "e d, one ahead": run_e}
    res: dict = {}
    for rep in range(6):
        for name, f in runs.items():
            s = f()
            if rep:
                res.setdefault(name, []).append(s * 1e6)
    for name, v in res.items():
        v = sorted(v)
        med = v[len(v) // 2]
        log(f"  summary {name:18s} " + "/".join(f"{x:.1f}" for x in v) + f" us per step (median {med:.1f}, "
            f"{1e6 / med:.1f} tok/s)")


def main():
    r7.round_main(57, lambda dev, tiny: [("loop", lambda: loop_phase(dev, tiny))])


if __name__ == "__main__":
    main()
