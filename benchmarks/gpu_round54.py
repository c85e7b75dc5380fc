"""GPU round 54 (session 11): can the prefill's scan run beside in_proj's z product?

In a prompt piece (8192 tokens, Codestral's layer) in_proj is one matmul [z | xBC | dt]; z
(8192 of its 18560 rows) is read only by the gated norm after the scan. The conv and the scan
(~0.5 ms, latency-bound) could run on one stream while z's product (~0.75 ms, at the board's
power limit) runs on another. Timed here, per layer piece (ms, alternated, medians):
  whole      in_proj as one matmul, then conv, then scan (as prefill runs now)
  split      z's product and xBCdt's apart, one after the other (what splitting costs)
  z first    z's product forked onto a second stream first, then xBCdt, conv, scan; joined
  z after    xBCdt, conv, scan launched, then z forked; joined
and the parts alone. Also the conv at other row-walking layouts (ROWS, BLOCK_C, warps).

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round54.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round54.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round54.txt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402

r7.LOG_NAME = "round54.txt"
log = r7.log


def phase_overlap(dev, tiny):
    from mamba2_cli.kernels import conv, ssd

    M, D, H, P, G, N = (128, 64, 4, 16, 2, 16) if tiny else (8192, 4096, 128, 64, 8, 128)
    DI = H * P
    CD = DI + 2 * G * N
    dtype = torch.float16 if tiny else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    u = rn(1, M, D)
    W = rn(DI + CD + H, D, scale=D ** -0.5)
    Wz, Wx = W[:DI], W[DI:]
    cw, cb = rn(CD, 4, scale=0.5), rn(CD, scale=0.1)
    cs = torch.zeros(1, CD, 3, device=dev, dtype=dtype)
    A = -torch.rand(H, device=dev) - 0.5
    Dh, dtb = torch.randn(H, device=dev), torch.zeros(H, device=dev) - 3.0
    ssm = torch.zeros(1, H, P, N, device=dev)
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    def conv_scan(xBCdt):
        xBC, dt = xBCdt[..., :CD], xBCdt[..., CD:]
        xc = conv.causal_conv1d(xBC, cw, cb, cs)
        x, B, C = torch.split(xc, [DI, G * N, G * N], dim=-1)
        return ssd.ssd_prefill(x.unflatten(-1, (H, P)), dt, A, B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)), Dh,
                               dtb, (0.0, float("inf")), 256, ssm, None, ssm)[0]

    def whole():
        zxbcdt = F.linear(u, W)
        return zxbcdt[..., :DI], conv_scan(zxbcdt[..., DI:])

    def split():
        z = F.linear(u, Wz)
        return z, conv_scan(F.linear(u, Wx))

    def forked(z_first):
        def fn():
            main = torch.cuda.current_stream(dev)
            if z_first:
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    z = F.linear(u, Wz)
                y = conv_scan(F.linear(u, Wx))
            else:
                y = conv_scan(F.linear(u, Wx))
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    z = F.linear(u, Wz)
            main.wait_stream(side)
            z.record_stream(main)
            return z, y
        return fn

    xBCdt0 = F.linear(u, Wx)
    variants = {"whole": whole, "split": split, "z alone": lambda: F.linear(u, Wz),
                "xBCdt alone": lambda: F.linear(u, Wx), "conv+scan alone": lambda: conv_scan(xBCdt0)}
    if dev.type == "cuda":
        variants["z first"] = forked(True)
        variants["z after"] = forked(False)
    res: dict = {}
    for rep in range(2 if tiny else 6):
        for name, fn in variants.items():
            ms = r7.graph_ms(fn, dev, reps=10) if dev.type == "cuda" else (fn(), 0.0)[1]
            if rep:
                res.setdefault(name, []).append(ms)
    for name, v in res.items():
        v = sorted(v)
        log(f"  summary {name:16s} " + "/".join(f"{x:.4f}" for x in v) + f" median {v[len(v) // 2]:.4f} ms")


def phase_conv(dev, tiny):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import conv

    M, DI, CD = (128, 64, 128) if tiny else (8192, 8192, 10240)
    dtype = torch.float16 if tiny else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(1)
    zx = torch.randn(1, M, 2 * DI + (CD - DI) + 128, generator=g, device=dev).to(dtype)
    xBC = zx[..., DI:DI + CD]
    cw = torch.randn(CD, 4, generator=g, device=dev).to(dtype)
    cb = torch.randn(CD, generator=g, device=dev).to(dtype)
    cs0 = torch.randn(1, CD, 3, generator=g, device=dev).to(dtype)
    cs = cs0.clone()
    nbytes = M * CD * 2 * 2
    tbps = kb.copy_bandwidth(dev) / 1e12 if dev.type == "cuda" else float("nan")
    base = dict(conv.CONV_CONFIG)
    knobs = [{}, {"ROWS": 32}, {"ROWS_BLOCK_C": 512}, {"ROWS_BLOCK_C": 512, "ROWS_WARPS": 4},
             {"ROWS": 32, "ROWS_BLOCK_C": 512, "ROWS_WARPS": 4}, {"ROWS_BLOCK_C": 128, "ROWS_WARPS": 1},
             {"ROWS": 32, "ROWS_BLOCK_C": 128, "ROWS_WARPS": 1}, {"ROWS_BLOCK_C": 1024, "ROWS_WARPS": 4},
             {"ROWS": 8, "ROWS_AHEAD": 8}]
    ref = None
    res: dict = {}
    try:
        for rep in range(1 if tiny else 3):
            for kw in knobs:
                conv.CONV_CONFIG.clear()
                conv.CONV_CONFIG.update({**base, **kw})

                def call():
                    cs.copy_(cs0)
                    return conv.causal_conv1d(xBC, cw, cb, cs)
                out = call()
                if ref is None:
                    ref = (out.clone(), cs.clone())
                same = torch.equal(out, ref[0]) and torch.equal(cs, ref[1])
                ms = kb.time_ms(call, dev) if dev.type == "cuda" else 0.0
                res.setdefault(str(kw), []).append(ms)
                if rep == 0:
                    log(f"  conv {str(kw):60s} same as default {same}")
    finally:
        conv.CONV_CONFIG.clear()
        conv.CONV_CONFIG.update(base)
    for name, v in res.items():
        m = sorted(v)[len(v) // 2]
        log(f"  summary conv {name:60s} {m * 1e3:7.1f} us {nbytes / max(m * 1e-3, 1e-12) / 1e12:5.2f} TB/s "
            f"({nbytes / max(m * 1e-3, 1e-12) / 1e12 / tbps:.0%} of copy)")


def main():
    r7.round_main(54, lambda dev, tiny: [("overlap", lambda: phase_overlap(dev, tiny)),
                                         ("conv", lambda: phase_conv(dev, tiny))])


if __name__ == "__main__":
    main()
