"""Quantized weights on the GPU: correctness, kernel bandwidth, model decode/prefill, memory, gemlite.

    PYTHONPATH=src python3 benchmarks/bench_quant.py [--skip-model] [--skip-memory]

1. correctness: quant_matvec (1, 2, 8 rows) and the prompt path (dequantize + cuBLAS) against
   the torch reference (dequantize, matmul in fp32), bf16 activations, at Codestral's shapes
   and at shapes that are not multiples of the blocks or groups.
2. kernels: bf16 matvec vs int8 vs int4 at Codestral's in_proj / out_proj / lm_head, 1 and 8
   rows, CUDA-graph timing; GB/s over the bytes each reads and its share of copy bandwidth.
   gemlite's A16W8 / A16W4 (group 128) beside them when it imports.
3. model: codestral-7b-shaped random weights, bf16 / int8 / int4, decode tok/s at batch 1 and
   8, prefill of 2,048 tokens (bench.bench_model, CUDA graphs).
4. memory: a random int4 (and int8) Codestral written as a quantized checkpoint, then loaded
   and run (64 tokens, CUDA graphs) in a fresh process: total - free from mem_get_info.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

from mamba2_cli.kernel_bench import copy_bandwidth  # noqa: E402
from mamba2_cli.kernels.triton import matvec as mv  # noqa: E402
from mamba2_cli.kernels.triton import quant_matvec as qm  # noqa: E402
from mamba2_cli.linear import Int4Linear, Int8Linear, Linear  # noqa: E402

DEV = torch.device("cuda")
BF16 = torch.bfloat16
SHAPES = {"in_proj": (18560, 4096), "out_proj": (4096, 8192), "lm_head": (32768, 4096)}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(x, proj):
    y = x.float() @ proj.dequantize(torch.float32).t()
    return y if proj.bias is None else y + proj.bias.float()


def correctness():
    print("== correctness (bf16 activations, rel. error vs dequantize + fp32 matmul)")
    worst = 0.0
    cases = [(n, k) for n, k in SHAPES.values()] + [(1037, 1088), (333, 4160), (97, 96)]
    for N, K in cases:
        w = torch.randn(N, K, device=DEV) / K ** 0.5
        b = torch.randn(N, device=DEV).to(BF16)
        for cls, g in ((Int8Linear, 0), (Int4Linear, 128 if K % 128 == 0 else 32)):
            p = cls.from_weight(w, b, g, BF16)
            for rows in (1, 2, 8, 64):
                x = torch.randn(rows, K, device=DEV).to(BF16)
                e = rel(qm.quant_linear(x, p), reference(x, p))
                worst = max(worst, e)
                if e > 1e-2:
                    print(f"  FAIL {cls.scheme} N={N} K={K} rows={rows}: {e:.2e}")
    print(f"  worst relative error {worst:.2e} ({'ok' if worst < 1e-2 else 'FAIL'})")


def gemlite_layers(w, scheme):
    """gemlite's layer for the same weights, or None with the reason printed once."""
    try:
        import gemlite  # noqa: F401
        from gemlite.helper import A16W8, A16Wn
    except Exception as e:  # noqa: BLE001
        return None, f"gemlite does not import: {e}"
    try:
        if scheme == "int8":
            return A16W8(device=str(DEV), dtype=BF16).from_weights(w.clone()), ""
        p = Int4Linear.from_weight(w, None, 128, BF16)
        from mamba2_cli.quant import unpack_int4

        u = (unpack_int4(p.qweight).to(torch.int16) + 8).to(torch.uint8)
        zeros = torch.full_like(p.scales, 8)
        return A16Wn(device=str(DEV), dtype=BF16).from_weights(u, p.scales, zeros, 4, 128), ""
    except Exception as e:  # noqa: BLE001
        return None, f"gemlite {scheme}: {type(e).__name__}: {e}"


def kernels(bw):
    print(f"== kernels (copy bandwidth {bw / 1e9:,.0f} GB/s read + written; share = bytes read / time / that)")
    rows_out = []
    note = set()
    for name, (N, K) in SHAPES.items():
        w = (torch.randn(N, K, device=DEV) / K ** 0.5).to(BF16)
        plain = Linear.from_tensors(w)
        variants = {"bf16": (plain, N * K * 2), "int8": (Int8Linear.from_weight(w, None, 0, BF16), N * K + N * 2),
                    "int4": (Int4Linear.from_weight(w, None, 128, BF16), N * K // 2 + N * (K // 128) * 2)}
        for rows in (1, 8):
            x = torch.randn(rows, K, device=DEV).to(BF16)
            for v, (proj, nbytes) in variants.items():
                fn = (lambda: mv.linear(x, proj)) if v == "bf16" else (lambda: qm.quant_linear(x, proj))
                ms = do_bench_cudagraph(fn, rep=200)
                rows_out.append((name, rows, v, ms, nbytes))
            for v in ("int8", "int4"):
                layer, why = gemlite_layers(w, v)
                if layer is None:
                    note.add(why)
                    continue
                try:
                    ms = do_bench_cudagraph(lambda: layer(x), rep=200)
                    rows_out.append((name, rows, f"gemlite-{v}", ms, variants[v][1]))
                except Exception as e:  # noqa: BLE001
                    note.add(f"gemlite {v}: {type(e).__name__}: {str(e)[:200]}")
    for name, rows, v, ms, nbytes in rows_out:
        gbs = nbytes / (ms / 1e3)
        print(f"  {name:8s} rows {rows}  {v:12s} {ms * 1e3:8.1f} us  {gbs / 1e9:7.0f} GB/s  {2 * gbs / bw:6.1%} of copy")
    for n in sorted(note):
        print(f"  note: {n}")


def model_figures():
    from mamba2_cli.bench import bench_model, bytes_per_decode_step
    from mamba2_cli.loader import load_preset

    print("== model: codestral-7b shape, random weights, triton backend, CUDA graphs")
    for q in (None, "int8", "int4"):
        m, _ = load_preset("codestral-7b", "cuda", "bfloat16", "triton", quant=q)
        out = {"weights": q or "bf16"}
        for batch in (1, 8):
            r = bench_model(m, 16, 128, batch, 3)
            out[f"decode_b{batch}_tok_s_per_seq"] = round(r["decode_tok_s"], 1)
        r = bench_model(m, 2048, 4, 1, 3)
        out["prefill2048_tok_s"] = round(r["prefill_tok_s"])
        out["bytes_per_token_b1"] = bytes_per_decode_step(m, 1)
        print("  " + json.dumps(out))
        del m
        torch.cuda.empty_cache()


MEM_CHILD = r"""
import sys, json, torch
sys.path.insert(0, "src")
free0, total = torch.cuda.mem_get_info()
from mamba2_cli.loader import load_model
from mamba2_cli.generation import Request, stream_batch
m, tok = load_model(sys.argv[1], "cuda")
for _ in stream_batch(m, tok, [Request("def main():", max_tokens=64, temperature=0.0, ignore_eos=True)], cuda_graph=True):
    pass
torch.cuda.synchronize()
free, total = torch.cuda.mem_get_info()
print(json.dumps({"used_gb": (total - free) / 1e9, "others_before_gb": (total - free0) / 1e9,
                  "allocator_peak_gb": torch.cuda.max_memory_allocated() / 1e9}))
"""


def memory():
    from mamba2_cli.loader import load_preset
    from mamba2_cli.quant import write_checkpoint

    print("== memory: a quantized Codestral-shaped checkpoint loaded and run in a fresh process")
    tok_dir = Path(__file__).resolve().parents[1] / "tests" / "data" / "mistral-v3-tokenizer"
    for q in ("int4", "int8"):
        with tempfile.TemporaryDirectory() as tmp:
            m, _ = load_preset("codestral-7b", "cuda", "bfloat16", "torch", quant=q)
            t = time.perf_counter()
            out = write_checkpoint(m, tok_dir, tok_dir, Path(tmp) / q)
            del m
            torch.cuda.empty_cache()
            size = (out / "model.safetensors").stat().st_size
            p = subprocess.run([sys.executable, "-c", MEM_CHILD, str(out)], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": "src"})
            res = p.stdout.strip().splitlines()[-1] if p.returncode == 0 else p.stderr.strip()[-500:]
            print(f"  {q}: checkpoint {size / 1e9:.2f} GB (written in {time.perf_counter() - t:.0f} s); run: {res}")
            print(f"  {q}: target under {'5.5' if q == 'int4' else '9.5'} GB used (whole process, as the GPU sees it)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    correctness()
    kernels(copy_bandwidth(DEV))
    if not a.skip_model:
        model_figures()
    if not a.skip_memory:
        memory()


if __name__ == "__main__":
    main()
