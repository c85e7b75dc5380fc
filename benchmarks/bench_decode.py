"""End-to-end GPU check: correctness checks, then decode/prefill timings on Codestral shapes.

    PYTHONPATH=src python3 benchmarks/bench_decode.py [--preset codestral-7b] [--quick]

Prints a table last; with $OUT set, writes the numbers to $OUT/bench_decode.json.
Checks first: triton vs torch logits on one prompt, CUDA-graph greedy tokens equal eager
for 64 steps, the triton matvec against F.linear.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mamba2_cli import load_preset, stream_generate
from mamba2_cli.generation import prefill, runner_for
from mamba2_cli.kernel_bench import copy_bandwidth


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sync():
    torch.cuda.synchronize()


def timed(fn, repeats=5, warmup=2):
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def decode_tok_s(model, tok, prompt_len, gen_len, cuda_graph=True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.cfg.vocab_size, (prompt_len,), generator=g).tolist()
    res = None
    for _ in range(2):
        for ev in stream_generate(model, tok, ids, max_tokens=gen_len, ignore_eos=True, cuda_graph=cuda_graph):
            res = ev.result or res
    return res.stats


def batched_decode(model, batch, prompt_len, gen_len):
    state = model.new_state(batch)
    ids = torch.randint(3, model.cfg.vocab_size, (batch, prompt_len), device="cuda")
    step = runner_for(model).decode_step(state)
    logits = prefill(model, ids, state)
    tok = logits.argmax(-1)
    for _ in range(8):
        tok = step(tok).argmax(-1)
    sync()
    t0 = time.perf_counter()
    for _ in range(gen_len):
        tok = step(tok).argmax(-1)
        tok.tolist()
    sync()
    return gen_len / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="codestral-7b")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--million", action="store_true", help="also prefill 1,000,000 tokens")
    args = ap.parse_args()
    rows, checks = [], {}
    dev = torch.device("cuda")
    print("GPU:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)

    t0 = time.perf_counter()
    model, tok = load_preset(args.preset, dev, "bfloat16", "triton")
    print(f"model built in {time.perf_counter() - t0:.1f}s", flush=True)
    cfg = model.cfg
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embeddings" not in n)
    if cfg.tie_embeddings:
        weight_bytes += cfg.padded_vocab_size * cfg.d_model * 2
    state_bytes = cfg.n_layer * cfg.nheads * cfg.headdim * cfg.d_state * 4

    # --- checks
    ids = torch.randint(3, cfg.vocab_size, (1, 300), device=dev)
    with torch.inference_mode():
        s1 = model.new_state(1)
        lt = model(ids, s1)
        model.set_backend("torch")
        s2 = model.new_state(1)
        lr = model(ids, s2)
        model.set_backend("triton")
    checks["logits triton vs torch (bf16)"] = rel(lt, lr)
    checks["ssm state triton vs torch"] = rel(s1.ssm, s2.ssm)
    print(checks, flush=True)
    prompt = ids[0, :64].tolist()
    eager = [e.token_id for e in stream_generate(model, tok, prompt, max_tokens=64, ignore_eos=True, cuda_graph=False) if e.token_id is not None]
    graph = [e.token_id for e in stream_generate(model, tok, prompt, max_tokens=64, ignore_eos=True, cuda_graph=True) if e.token_id is not None]
    checks["graph == eager greedy (64 steps)"] = eager == graph
    from mamba2_cli.kernels.triton.matvec import matvec

    x = torch.randn(1, cfg.d_model, device=dev, dtype=torch.bfloat16)
    W = model.backbone.layers[0].mixer.in_proj.weight
    checks["matvec vs F.linear"] = rel(matvec(x, W), F.linear(x.float(), W.float()))
    print(checks, flush=True)

    # --- matvec speed: cuBLAS vs triton, the 129 products of one decode step
    mats = [l.mixer.in_proj.weight for l in model.backbone.layers] + [l.mixer.out_proj.weight for l in model.backbone.layers] + [model.lm_head.weight]
    xs = {m.shape[1]: torch.randn(1, m.shape[1], device=dev, dtype=torch.bfloat16) for m in mats}
    nbytes = sum(m.numel() * 2 for m in mats)
    for bs in (1, 8):
        xb = {k: v.expand(bs, k).contiguous() for k, v in xs.items()}
        for name, fn in (("cublas", lambda: [F.linear(xb[m.shape[1]], m) for m in mats]),
                         ("triton", lambda: [matvec(xb[m.shape[1]], m) for m in mats])):
            g = torch.cuda.CUDAGraph()
            fn()
            sync()
            with torch.cuda.graph(g):
                fn()
            t = timed(g.replay, repeats=20)
            rows.append((f"129 matvecs b{bs} {name} (graph)", f"{t * 1e3:.2f} ms", f"{nbytes / t / bw * 100:.0f} % of copy bw"))
            print(rows[-1], flush=True)

    # --- end to end
    gen = 64 if args.quick else 128
    for backend in ("triton", "torch"):
        model.set_backend(backend)
        for cg in (True, False):
            st = decode_tok_s(model, tok, 128, gen, cuda_graph=cg)
            step_bytes = weight_bytes + 2 * state_bytes
            rows.append((f"{backend} decode b1 p128 graph={cg}", f"{st['decode_tok_s']:.1f} tok/s",
                         f"{step_bytes * st['decode_tok_s'] / bw * 100:.0f} % of copy bw; ttft {st['ttft_s'] * 1e3:.1f} ms"))
            print(rows[-1], flush=True)
            if backend == "torch" and args.quick:
                break
    model.set_backend("triton")
    tps = batched_decode(model, 8, 128, gen)
    rows.append(("triton decode b8 graph", f"{tps:.1f} tok/s per seq", ""))
    print(rows[-1], flush=True)
    for L in ([128, 2048] if args.quick else [128, 2048, 16384, 65536]):
        idsL = torch.randint(3, cfg.vocab_size, (1, L), device=dev)

        def run():
            st = model.new_state(1)
            prefill(model, idsL, st).argmax(-1).tolist()

        torch.cuda.reset_peak_memory_stats()
        t = timed(run, repeats=3 if L > 10000 else 5, warmup=1)
        rows.append((f"triton prefill {L} -> first token", f"{t * 1e3:.1f} ms",
                     f"{L / t:,.0f} tok/s; peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB"))
        print(rows[-1], flush=True)
    if not args.quick:
        st = decode_tok_s(model, tok, 65536, gen)
        rows.append(("triton decode b1 after 65536", f"{st['decode_tok_s']:.1f} tok/s", ""))
        print(rows[-1], flush=True)
    if args.million:
        L = 1_000_000
        idsL = torch.randint(3, cfg.vocab_size, (1, L), device=dev)
        weights = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        st = model.new_state(1)
        prefill(model, idsL, st).argmax(-1).tolist()
        t = time.perf_counter() - t0
        extra = torch.cuda.max_memory_allocated() - weights
        rows.append((f"triton prefill {L:,} tokens", f"{t:.1f} s", f"{L / t:,.0f} tok/s; peak {extra / 1e9:.2f} GB above the weights"))
        print(rows[-1], flush=True)

    print("\n=== checks")
    for k, v in checks.items():
        print(f"  {k}: {v}")
    print("=== figures")
    for r in rows:
        print("  " + " | ".join(r))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_decode.json"), "w") as f:
            json.dump({"checks": checks, "rows": rows, "copy_bw": bw, "gpu": torch.cuda.get_device_name()}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
