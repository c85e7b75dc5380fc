"""GPU round 62 (session 13): the prefill's residual add in out_proj's epilogue.

A prefill layer ends in out_proj (bf16 h, [L, 4096]) and the next layer's add_rmsnorm (reads h
and the fp32 residual, writes the residual and the normed bf16 rows: ~400 MB per 8192-token
piece, ~49 ms of a 65,536-token prefill). cuBLAS can add the product into an fp32 matrix
itself (`torch.addmm(res, y, W^T, out_dtype=torch.float32)`, beta = 1), and then the norm only
reads the residual and writes the normed rows (~200 MB). The bytes move into the matmul's
epilogue, where a compute-bound matmul may hide them. Measured here on one Codestral-shaped
layer's tail at 8192 tokens, with in_proj's matmul in front so the board is as loaded as in a
prefill (events over 20 layers, medians of 7 samples, alternated):

    A  out_proj bf16 + add_rmsnorm                (today's path)
    B  addmm(out_dtype=fp32) into a new residual + the norm alone
    C  the same addmm written over the residual (out=res)

Also checked: B's residual against A's (they differ by h's bf16 rounding only) and the normed
rows. Lines go to stdout and $OUT/round62.txt.

    PYTHONPATH=src timeout 300 python3 benchmarks/gpu_round62.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round62.py --tiny  # CPU: the checks only
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402

r7.LOG_NAME = "round62.txt"
log = r7.log


def norm_only(res, weight, eps):
    """RMSNorm(res) * w in weight's dtype, res (fp32) read only: the add_rmsnorm kernel without a
    residual and without writing one."""
    import triton

    from mamba2_cli.kernels import norm

    M, D = res.shape
    out = torch.empty((M, D), dtype=weight.dtype, device=res.device)
    BLOCK = triton.next_power_of_2(D)
    rows = min(int(norm.NORM_CONFIG["add_rows"]), triton.next_power_of_2(M))
    norm._add_rmsnorm_kernel[(triton.cdiv(M, rows),)](
        res, res, weight, out, res, M, D, float(eps), res.stride(0), res.stride(0), D, D,
        HAS_RES=False, WRITE_RES=False, BLOCK_D=BLOCK, ROWS=rows, W_FIRST=bool(norm.NORM_CONFIG["add_w_first"]),
        PDL=False, num_warps=norm.NORM_CONFIG["add_warps"] or norm._warps(BLOCK * rows))
    return out


def tail_phase(dev, tiny):
    from mamba2_cli.kernels import norm

    L, D, Din, Dproj = (64, 64, 128, 290) if tiny else (8192, 4096, 8192, 18560)
    dtype = torch.float16 if tiny else torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(62)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev)

    u = rnd(L, D).to(dtype)
    y = rnd(L, Din).to(dtype)
    w_in = rnd(Dproj, D, scale=D ** -0.5).to(dtype)
    w_out = rnd(D, Din, scale=Din ** -0.5).to(dtype)
    nw = (1 + 0.1 * rnd(D)).to(dtype)
    res0 = rnd(L, D)
    eps = 1e-5
    cuda = dev.type == "cuda"

    def a():
        F.linear(u, w_in)
        h = F.linear(y, w_out)
        return norm.add_rmsnorm(h, res0, nw, eps, True)

    def b():
        F.linear(u, w_in)
        res = torch.addmm(res0, y, w_out.t(), out_dtype=torch.float32) if cuda else \
            res0 + (y.float() @ w_out.float().t())
        return norm_only(res, nw, eps), res

    res_c = res0.clone()

    def c():
        F.linear(u, w_in)
        if cuda:
            torch.addmm(res_c, y, w_out.t(), out_dtype=torch.float32, out=res_c)
        else:
            res_c.add_(y.float() @ w_out.float().t())
        return norm_only(res_c, nw, eps), res_c

    na, ra = a()
    nb, rb = b()
    log(f"  residual B vs A: rel err {r7.rel_err(rb, ra):.3e}; normed rows {r7.rel_err(nb.float(), na.float()):.3e}")
    ref = res0.double() + y.double() @ w_out.double().t()
    log(f"  residual vs float64: A {r7.rel_err(ra, ref):.3e}, B {r7.rel_err(rb, ref):.3e}")
    try:
        res_c.copy_(res0)
        nc, rc = c()
        log(f"  C (out=res) equal to B: residual {torch.equal(rc, rb)}, normed {torch.equal(nc, nb)}")
    except Exception as e:  # noqa: BLE001 - a GPU round logs what failed and goes on
        r7.err_line("C", e)
        c = None
    if not cuda:
        return
    variants = {"A bf16 + add_rmsnorm": a, "B addmm fp32 + norm": b}
    if c is not None:
        variants["C addmm out=res + norm"] = c
    n = 20
    times = {k: [] for k in variants}
    for fn in variants.values():  # warm
        fn()
    torch.cuda.synchronize(dev)
    for _ in range(7):
        for name, fn in variants.items():
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(n):
                fn()
            e1.record()
            e1.synchronize()
            times[name].append(e0.elapsed_time(e1) * 1000 / n)
    for name, ts in times.items():
        log(f"  summary {name:24s} " + "/".join(f"{t:.1f}" for t in sorted(ts))
            + f" us per layer (median {statistics.median(ts):.1f})")


def main():
    r7.round_main(62, lambda dev, tiny: [("tail", lambda: tail_phase(dev, tiny))])


if __name__ == "__main__":
    main()
