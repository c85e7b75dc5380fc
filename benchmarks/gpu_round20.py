"""GPU round 20 (session 6): the prefill's matmuls through cuBLASLt, and the gated norm's weight
loaded with y and z.

Round 18 timed the in_proj + out_proj matmuls of a 4096-token piece at 1371 / 1351 µs through
torch's default cuBLAS path and 1341 / 1340 µs with `preferred_blas_library("cublaslt")`, one
after the other. This round alternates them, then runs the model both ways.

    PYTHONPATH=src python3 benchmarks/gpu_round20.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round20.py --tiny  # CPU: runs

  matmul   in_proj + out_proj of 4096 tokens, ~0.5 s back to back per setting, default and
           cublaslt alternated 4 times (nvidia-smi clock and power alongside)
  gated    gated_rmsnorm at 4096 Codestral rows, NORM_CONFIG["gated_w_first"] off and on
  model    prefill of 65536 tokens, of 2048 tokens, and TTFT of 128 tokens (bench_model), with
           the four combinations, alternated 3 times; logits compared with the defaults'
Lines go to stdout and $OUT/round20.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round18 as r18  # noqa: E402
import gpu_round19 as r19  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round20.txt"
log = r7.log


@contextlib.contextmanager
def blas(lib: str):
    if lib == "default" or not torch.cuda.is_available():  # the CPU build has no cuBLASLt
        yield
        return
    torch.backends.cuda.preferred_blas_library(lib)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library("default")


def matmul_phase(dev, tiny):
    import torch.nn.functional as F

    x, w_in, y, w_out = r18._mats(dev, tiny)
    ref = (F.linear(x, w_in), F.linear(y, w_out))
    res: dict = {}
    for rep in range(1 if tiny else 4):
        for lib in ("default", "cublaslt"):
            try:
                with blas(lib):
                    a, b = F.linear(x, w_in), F.linear(y, w_out)
                    err = max(r7.rel_err(a, ref[0]), r7.rel_err(b, ref[1]))
                    smi = r18.Smi(dev)
                    ms = r18._loop_ms(lambda: (F.linear(x, w_in), F.linear(y, w_out)), dev, 0.05 if tiny else 0.5)
                res.setdefault(lib, []).append(ms)
                log(f"  matmul {lib:9s} {ms * 1e3:8.1f} us per in_proj + out_proj  err vs default {err:.1e}{smi.close()}")
            except Exception as e:
                r7.err_line(f"matmul {lib}", e)
    for lib, v in res.items():
        log(f"  summary matmul {lib:9s} " + ", ".join(f"{m * 1e3:.1f}" for m in v) + " us")


def gated_phase(dev, tiny, tbps):
    from mamba2_cli.kernels import norm

    M, DI, GS = (64, 128, 64) if tiny else (4096, 8192, 1024)
    dtype = torch.float16 if tiny else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    y = torch.randn(M, DI, generator=g, device=dev).to(dtype)
    zw = torch.randn(M, 2 * DI, generator=g, device=dev).to(dtype)
    z = zw[:, :DI]
    w = torch.randn(DI, generator=g, device=dev).to(dtype)
    r19._timed_variants("gated_rmsnorm 4096", norm.NORM_CONFIG, [{"gated_w_first": False}, {"gated_w_first": True}],
                        lambda: norm.gated_rmsnorm(y, z, w, GS, 1e-5), M * DI * 6, dev, tbps)


VARIANTS = [("default", False), ("cublaslt", False), ("default", True), ("cublaslt", True)]


def model_phase(model, dev, tiny):
    from mamba2_cli.bench import bench_model
    from mamba2_cli.generate import owned_state, prefill
    from mamba2_cli.kernels import norm

    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, cfg.vocab_size, (1, 300 if tiny else 8192), generator=g).to(dev)
    ref = None
    for lib, wf in VARIANTS:
        norm.NORM_CONFIG["gated_w_first"] = wf
        with blas(lib):
            st = owned_state(model, 1)
            lg = prefill(model, ids, st, chunk_tokens=64 if tiny else 4096)
        got = (lg, st.ssm.clone())
        if ref is None:
            ref = got
        log(f"  check {lib:9s} gated_w_first={wf!s:5s}: logits {r7.rel_err(got[0], ref[0]):.1e}, ssm "
            f"{r7.rel_err(got[1], ref[1]):.1e}, bit-identical {all(torch.equal(a, b) for a, b in zip(got, ref))}")
    norm.NORM_CONFIG["gated_w_first"] = False
    if dev.type != "cuda":
        return
    L = 65536
    long_ids = torch.randint(3, cfg.vocab_size, (1, L), generator=g)
    state = owned_state(model, 1)
    res: dict = {}
    for rep in range(3):
        for lib, wf in VARIANTS:
            name = f"{lib} gated_w_first={wf}"
            norm.NORM_CONFIG["gated_w_first"] = wf
            try:
                with blas(lib):
                    r7.drop_graphs(model)
                    smi = r18.Smi(dev)
                    p = r7.timed_prefill(model, long_ids, state, dev)
                    extra = smi.close()
                    r1 = bench_model(model, prompt_len=128, gen_len=16, batch_size=1, repeats=3)
                    r2 = bench_model(model, prompt_len=2048, gen_len=1, batch_size=1, repeats=3)
                res.setdefault(name, []).append((p, r1["ttft_s"], r2["ttft_s"]))
                log(f"  model {name:32s} prefill {L} {p:.4f} s, TTFT128 {r1['ttft_s'] * 1e3:5.2f} ms, "
                    f"prefill 2048 {r2['ttft_s'] * 1e3:6.2f} ms{extra}")
            except Exception as e:
                r7.err_line(f"model {name}", e)
    norm.NORM_CONFIG["gated_w_first"] = False
    for name, v in res.items():
        cols = list(zip(*v))
        med = [sorted(c)[len(c) // 2] for c in cols]
        log(f"  summary model {name:32s} prefill " + "/".join(f"{x:.4f}" for x in cols[0]) + f" (median {med[0]:.4f} s)"
            + ", TTFT128 " + "/".join(f"{x * 1e3:.2f}" for x in cols[1])
            + ", p2048 " + "/".join(f"{x * 1e3:.2f}" for x in cols[2]) + f" (median {med[2] * 1e3:.2f} ms)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    dev, model = r7.setup(20, args.tiny, load="model" not in skip)
    r7.T0 = T0
    from mamba2_cli import kernel_bench as kb

    tbps = kb.copy_bandwidth(dev) / 1e12 if dev.type == "cuda" else float("nan")
    phases = [("matmul", lambda: matmul_phase(dev, args.tiny)), ("gated", lambda: gated_phase(dev, args.tiny, tbps)),
              ("model", lambda: model_phase(model, dev, args.tiny))]
    r7.run_phases([(n, f) for n, f in phases if n not in skip])


if __name__ == "__main__":
    main()
