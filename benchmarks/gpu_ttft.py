"""Time to first token (issue 4): prefill through CUDA graphs against eager prefill,
alone and through the generation loop, on a Codestral-shaped random model (bf16, triton).

    PYTHONPATH=src python3 benchmarks/gpu_ttft.py [--quick]
    PYTHONPATH=src python3 benchmarks/gpu_ttft.py --device cpu --preset tiny --backend torch --quick
        (a dry run of the script's own logic on CPU, graphs replaced by their eager stand-in)

Checks first: the graph prefill (padded to its bucket, captured at the second call) gives
the eager prefill's logits and state, and greedy tokens through stream_generate agree with
and without graphs. Then: TTFT for 128 tokens (eager vs graph; prefill alone vs
stream_generate vs bench_model; gc off; host issue time vs GPU time), prefill of 2048
tokens (eager with both conv forms, an experimental 2048-token graph, through the loop),
one layer's operations at 2048 tokens, the conv kernel's two forms, graph vs eager at other
lengths. Every part runs under its own try/except. The report is printed and, with $OUT
set, written to $OUT/ttft.txt. Figures of the previous round (benchmarks/NOTES.md, G2):
prefill 128 -> first token 24.1 ms, through the loop 37-56 ms; prefill 2048 57.9 ms.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback

import torch

from mamba2_cli import load_preset, stream_generate
from mamba2_cli.bench import _NullTokenizer, bench_model
from mamba2_cli.generate import PrefillGraphs, prefill, prefill_graphs
from mamba2_cli.kernels import conv as conv_mod

LINES: list[str] = []
ROWS: list[tuple[str, str, str]] = []
T_START = time.perf_counter()


def log(*a):
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    LINES.append(line)


def row(name, value, note=""):
    ROWS.append((name, value, note))
    log(f"  {name} | {value} | {note}")


def part(name):
    def wrap(fn):
        log(f"\n=== {name}  (t = {time.perf_counter() - T_START:.0f} s)")
        try:
            fn()
        except Exception:
            log("FAILED:\n" + traceback.format_exc(limit=6))
        return fn
    return wrap


CUDA = True


def sync():
    if CUDA:
        torch.cuda.synchronize()


def ms(seconds):
    return f"{seconds * 1e3:.2f} ms"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def stats(ts):
    return f"median {ms(statistics.median(ts))}, min {ms(min(ts))}, max {ms(max(ts))} (n={len(ts)})"


def time_prefill(model, ids, state, cuda_graph, n):
    """Host clock from the call to the first token on the host (ids start on the host)."""
    ts = []
    for _ in range(n):
        state.reset()
        sync()
        t0 = time.perf_counter()
        prefill(model, ids, state, cuda_graph=cuda_graph).argmax(-1).tolist()
        ts.append(time.perf_counter() - t0)
    return ts


def loop_ttft(model, prompt, cuda_graph, n, max_tokens=8, gc_off=False):
    """stream_generate: its ttft stat, and the wall time from the call to the first event."""
    stat, wall = [], []
    for _ in range(n):
        if gc_off:
            gc.disable()
        try:
            sync()
            t0 = time.perf_counter()
            first = None
            result = None
            for ev in stream_generate(model, _NullTokenizer(), prompt, max_tokens=max_tokens, ignore_eos=True,
                                      cuda_graph=cuda_graph):
                if first is None and ev.token_id is not None:
                    first = time.perf_counter() - t0
                result = ev.result or result
        finally:
            gc.enable()
        stat.append(result.stats["ttft_s"])
        wall.append(first)
    return stat, wall


def event_time(fn, n=20, warmup=3):
    for _ in range(warmup):
        fn()
    if not CUDA:
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    start = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        start[i].record()
        fn()
        end[i].record()
    sync()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end)) / 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no length sweep")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="codestral-7b")
    ap.add_argument("--backend", default="triton")
    args = ap.parse_args()
    global CUDA
    reps = 5 if args.quick else 10
    dev = torch.device(args.device)
    CUDA = dev.type == "cuda"
    log("device:", torch.cuda.get_device_name() if CUDA else "cpu", "| torch", torch.__version__,
        "| python", sys.version.split()[0])
    try:
        import triton

        log("triton", triton.__version__)
    except ImportError:
        pass
    t0 = time.perf_counter()
    model, _ = load_preset(args.preset, dev, "bfloat16" if CUDA else "float32", args.backend)
    cfg = model.cfg
    if not CUDA:
        model._prefill_graphs = PrefillGraphs(model, stand_in=True)
    log(f"{args.preset} built in {time.perf_counter() - t0:.1f} s ({model.backend_name}); weights "
        f"{(torch.cuda.memory_allocated() if CUDA else 0) / 1e9:.2f} GB")
    g = torch.Generator().manual_seed(0)
    ids128 = torch.randint(3, cfg.vocab_size, (1, 128), generator=g)
    ids100 = ids128[:, :100]
    ids2048 = torch.randint(3, cfg.vocab_size, (1, 2048), generator=g)
    checks = {}

    @part("checks: graph prefill vs eager prefill")
    def _():
        for name, ids in (("128 tokens (bucket 128, no padding)", ids128), ("100 tokens (padded to 128)", ids100)):
            ref_state = model.new_state(1)
            ref = prefill(model, ids, ref_state)  # eager, unpadded: the old path
            st = model.new_state(1)
            for call in ("eager padded", "capture + replay", "replay"):
                st.reset()
                got = prefill(model, ids, st, cuda_graph=True)
                checks[f"{name}, {call}: logits rel err"] = rel(got, ref)
                checks[f"{name}, {call}: ssm rel err"] = rel(st.ssm, ref_state.ssm)
                checks[f"{name}, {call}: conv state equal"] = torch.equal(st.conv, ref_state.conv)
                checks[f"{name}, {call}: argmax equal"] = bool(got.argmax(-1).item() == ref.argmax(-1).item())
        runner = prefill_graphs(model)
        checks["graphs captured"] = runner.captures
        for k, v in checks.items():
            log(f"  {k}: {v}")

    @part("checks: greedy tokens, stream_generate with and without graphs")
    def _():
        prompt = ids100[0].tolist()
        runs = {}
        for label, cg in (("no graphs", False), ("graphs #1", True), ("graphs #2", True), ("graphs #3", True)):
            runs[label] = [e.token_id for e in stream_generate(model, _NullTokenizer(), prompt, max_tokens=16,
                                                               ignore_eos=True, cuda_graph=cg) if e.token_id is not None]
        for label, toks in runs.items():
            log(f"  {label}: {toks}")
        same = all(t == runs["no graphs"] for t in runs.values())
        checks["greedy 16 tokens equal with and without graphs"] = same
        log("  equal:", same)

    @part("TTFT, 128-token prompt")
    def _():
        st = model.new_state(1)
        time_prefill(model, ids128, st, False, 2)
        e = time_prefill(model, ids128, st, False, reps)
        row("prefill 128 alone, eager (old path)", ms(statistics.median(e)), stats(e))
        time_prefill(model, ids128, st, True, 3)  # eager, capture, replay
        gr = time_prefill(model, ids128, st, True, reps)
        row("prefill 128 alone, CUDA graph", ms(statistics.median(gr)), stats(gr))
        # Host time to issue the eager forward (no sync) against the graph replay's GPU time.
        st.reset()
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(ids128.to(dev), st, logits_to_keep=1)
        issue = time.perf_counter() - t0
        sync()
        total = time.perf_counter() - t0
        row("eager forward 128: host issue time", ms(issue), f"until the GPU is done {ms(total)}")
        runner = prefill_graphs(model)
        entry = runner.entries[runner.key(st, runner.bucket(128))]
        gpu = event_time(lambda: entry.graph.replay())
        row("graph replay 128: GPU time (events)", ms(gpu), "the floor for this prefill")
        prompt = ids128[0].tolist()
        for cg in (False, True):
            loop_ttft(model, prompt, cg, 2)
            stat, wall = loop_ttft(model, prompt, cg, reps)
            label = "graphs (prefill + decode)" if cg else "no graphs"
            row(f"stream_generate 128, {label}: ttft stat", ms(statistics.median(stat)), stats(stat))
            row(f"stream_generate 128, {label}: call -> first event", ms(statistics.median(wall)), stats(wall))
        stat, wall = loop_ttft(model, prompt, False, reps, gc_off=True)
        row("stream_generate 128, no graphs, gc off: ttft stat", ms(statistics.median(stat)), stats(stat))
        stat, wall = loop_ttft(model, prompt, True, reps, gc_off=True)
        row("stream_generate 128, graphs, gc off: ttft stat", ms(statistics.median(stat)), stats(stat))
        for cg in (True, False):
            r = bench_model(model, 128, 32, repeats=5, cuda_graph=cg)
            row(f"bench_model 128 (graph={cg}): ttft", ms(r["ttft_s"]),
                f"first run {ms(r['first_call_ttft_s'])}; decode {r['decode_tok_s']:.1f} tok/s")

    @part("TTFT, 128 tokens, under a rich progress display (as `mamba2 bench` runs)")
    def _():
        from rich.console import Console
        from rich.progress import Progress

        prompt = ids128[0].tolist()
        with Progress(transient=True, console=Console(stderr=True)) as progress:
            task = progress.add_task("x", total=2 * reps)
            out = {}
            for cg in (False, True):
                stat = []
                for _ in range(reps):
                    s, _w = loop_ttft(model, prompt, cg, 1)
                    stat += s
                    progress.advance(task)
                out[cg] = stat
        for cg, stat in out.items():
            row(f"stream_generate 128 under Progress, graph={cg}: ttft stat", ms(statistics.median(stat)), stats(stat))

    @part("prefill 2048 tokens")
    def _():
        st = model.new_state(1)
        for branch in (True, False):
            conv_mod.CONV_CONFIG["STATE_BRANCH"] = branch
            time_prefill(model, ids2048, st, False, 2)
            ts = time_prefill(model, ids2048, st, False, reps)
            row(f"prefill 2048 alone, eager, conv STATE_BRANCH={branch}", ms(statistics.median(ts)), stats(ts))
        conv_mod.CONV_CONFIG["STATE_BRANCH"] = True
        stat, wall = loop_ttft(model, ids2048[0].tolist(), True, max(3, reps // 2))
        row("stream_generate 2048 (eager prefill: past the largest bucket): ttft", ms(statistics.median(stat)),
            stats(stat))
        def pieces(n):  # the prompt in n graph-replayed pieces carried through the state
            step = 2048 // n
            st.reset()
            for k in range(n):
                logits = prefill(model, ids2048[:, k * step : (k + 1) * step], st, cuda_graph=True)
            return logits

        for n in (2, 4):
            for _ in range(3):
                pieces(n)
            ts = []
            for _ in range(reps):
                sync()
                t0 = time.perf_counter()
                pieces(n).argmax(-1).tolist()
                ts.append(time.perf_counter() - t0)
            row(f"prefill 2048 alone, {n} graph pieces of {2048 // n}", ms(statistics.median(ts)), stats(ts))
        runner = PrefillGraphs(model, buckets=(2048,), stand_in=not CUDA)
        for _ in range(3):
            st.reset()
            runner(ids2048, st)
        ts = []
        for _ in range(reps):
            st.reset()
            sync()
            t0 = time.perf_counter()
            runner(ids2048, st).argmax(-1).tolist()
            ts.append(time.perf_counter() - t0)
        row("prefill 2048 alone, CUDA graph (experimental 2048 bucket)", ms(statistics.median(ts)), stats(ts))
        del runner
        if CUDA:
            torch.cuda.empty_cache()

    @part("one layer's operations at 2048 tokens (CUDA events, median of 20)")
    def _():
        be = model.backend
        mixer = model.backbone.layers[0].mixer
        L, d_inner, G, N, H, P = 2048, cfg.d_inner, cfg.ngroups, cfg.d_state, cfg.nheads, cfg.headdim
        gen = torch.Generator(device=dev).manual_seed(1)
        u = torch.randn(1, L, cfg.d_model, device=dev, dtype=model.dtype, generator=gen)
        res = torch.randn(1, L, cfg.d_model, device=dev, dtype=torch.float32, generator=gen)
        conv_state = torch.zeros(1, cfg.conv_dim, cfg.d_conv - 1, device=dev, dtype=model.dtype)
        ssm = torch.zeros(1, H, P, N, device=dev, dtype=torch.float32)
        with torch.inference_mode():
            zxbcdt = be.linear(u, mixer.in_proj.weight)
            z, xBC, dt = torch.split(zxbcdt, [d_inner, cfg.conv_dim, H], dim=-1)
            xc = be.causal_conv1d(xBC, mixer.conv_weight, mixer.conv1d.bias, conv_state)
            x, B, C = torch.split(xc, [d_inner, G * N, G * N], dim=-1)
            args = (x.reshape(1, L, H, P), dt, mixer.A, B.reshape(1, L, G, N), C.reshape(1, L, G, N), mixer.D,
                    mixer.dt_bias, cfg.dt_limit, 256)
            y, _ = be.ssd_prefill(*args, initial_state=ssm, final_state=ssm)
            yn = be.gated_rmsnorm(y.reshape(1, L, d_inner), z, mixer.norm.weight, d_inner // G, cfg.layer_norm_epsilon)
            ops = {
                "add_rmsnorm": lambda: be.add_rmsnorm(u, res, model.backbone.layers[0].norm.weight, 1e-5, True),
                "in_proj (cuBLAS)": lambda: be.linear(u, mixer.in_proj.weight),
                "causal_conv1d (STATE_BRANCH)": lambda: be.causal_conv1d(xBC, mixer.conv_weight, mixer.conv1d.bias,
                                                                         conv_state),
                "ssd_prefill (C B^T + scan)": lambda: be.ssd_prefill(*args, initial_state=ssm, final_state=ssm),
                "gated_rmsnorm": lambda: be.gated_rmsnorm(y.reshape(1, L, d_inner), z, mixer.norm.weight,
                                                          d_inner // G, cfg.layer_norm_epsilon),
                "out_proj (cuBLAS)": lambda: be.linear(yn, mixer.out_proj.weight),
            }
            total = 0.0
            for name, fn in ops.items():
                t = event_time(fn)
                total += t
                row(f"L2048 one layer: {name}", f"{t * 1e6:.1f} us", f"x64 layers = {ms(64 * t)}")
            row("L2048 one layer: sum", f"{total * 1e6:.1f} us", f"x64 layers = {ms(64 * total)}")
            conv_mod.CONV_CONFIG["STATE_BRANCH"] = False
            t = event_time(ops["causal_conv1d (STATE_BRANCH)"])
            conv_mod.CONV_CONFIG["STATE_BRANCH"] = True
            row("L2048 one layer: causal_conv1d (masked gathers, the old form)", f"{t * 1e6:.1f} us",
                f"x64 layers = {ms(64 * t)}")
            bytes_conv = 2 * L * cfg.conv_dim * 2
            row("L2048 conv bytes (in + out)", f"{bytes_conv / 1e6:.1f} MB", "at 4.25 TB/s: "
                f"{bytes_conv / 4.25e12 * 1e6:.1f} us")

    @part("causal_conv1d at 16384 tokens, both forms (round 3: 0.60 ms)")
    def _():
        be = model.backend
        mixer = model.backbone.layers[0].mixer
        L = 16384
        xBC = torch.randn(1, L, cfg.conv_dim, device=dev, dtype=model.dtype)
        conv_state = torch.zeros(1, cfg.conv_dim, cfg.d_conv - 1, device=dev, dtype=model.dtype)
        with torch.inference_mode():
            outs = {}
            for branch in (False, True):
                conv_mod.CONV_CONFIG["STATE_BRANCH"] = branch
                cs = conv_state.clone()
                outs[branch] = (be.causal_conv1d(xBC, mixer.conv_weight, mixer.conv1d.bias, cs), cs)
                t = event_time(lambda: be.causal_conv1d(xBC, mixer.conv_weight, mixer.conv1d.bias, conv_state.clone()))
                row(f"conv L16384 STATE_BRANCH={branch}", ms(t), f"{2 * L * cfg.conv_dim * 2 / t / 1e12:.2f} TB/s")
            conv_mod.CONV_CONFIG["STATE_BRANCH"] = True
            checks["conv forms equal (out, state)"] = (torch.equal(outs[True][0], outs[False][0])
                                                       and torch.equal(outs[True][1], outs[False][1]))
            log("  conv forms equal:", checks["conv forms equal (out, state)"])

    if not args.quick:
        @part("prefill alone, eager vs graph, by length")
        def _():
            st = model.new_state(1)
            for L in (16, 64, 256, 512, 1000):
                ids = torch.randint(3, cfg.vocab_size, (1, L), generator=g)
                time_prefill(model, ids, st, False, 1)
                e = time_prefill(model, ids, st, False, 5)
                time_prefill(model, ids, st, True, 3)
                gr = time_prefill(model, ids, st, True, 5)
                row(f"prefill {L} alone: eager / graph", f"{ms(statistics.median(e))} / {ms(statistics.median(gr))}",
                    f"bucket {prefill_graphs(model).bucket(L)}")

    @part("memory")
    def _():
        row("peak memory allocated", f"{(torch.cuda.max_memory_allocated() if CUDA else 0) / 1e9:.2f} GB",
            f"graphs captured {prefill_graphs(model).captures}, entries {len(prefill_graphs(model).entries)}")

    log("\n=== checks")
    for k, v in checks.items():
        log(f"  {k}: {v}")
    log("=== figures")
    width = max(len(r[0]) for r in ROWS) if ROWS else 10
    for name, value, note in ROWS:
        log(f"  {name:<{width}} | {value:>12} | {note}")
    log(f"\ntotal {time.perf_counter() - T_START:.0f} s")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "ttft.txt"), "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    sys.exit(main())
