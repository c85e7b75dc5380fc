"""Triton products with quantized weights (quant.py's int8 and int4 schemes).

Decode's 1-8 rows read the packed weights once and dequantize them in registers; the
launch discipline is matvec.py's (PDL where the table's entry asks and pdl.usable allows,
every launch capturable in the decode CUDA graph). Two kernels per scheme, by rows of x:

    fma   one row: each program owns BLOCK_N output channels and walks K in BLOCK_K tiles,
          the next weight tile in flight while the current one is multiplied (a register
          double buffer; under PDL the first tile is loaded before the wait for x).
          int8: the per-channel scale multiplies the finished sum. int4: each tile's
          products are summed per group and scaled in fp32.
    dot   2-8 rows: x padded to 16 rows, tl.dot of the dequantized weight tile with x^T.
          int8: integer weights in x's dtype (exact), scaled at the end. int4: one group per
          step, its two nibbles as two dots against x's even and odd columns, the group's
          scale applied to the fp32 partial sum.

More rows (prompts): the weight is dequantized into x's dtype by one kernel and the product
is the plain one (cuBLAS), `dequantize`.

Launch configurations: configs.py's "quant_matvec" kernel, entries "<scheme>_rows1",
"<scheme>_rows2-8" and "dequantize".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ...errors import Mamba2Error
from .configs import config_for
from .pdl import gdc_launch_dependents, gdc_wait, interpreting, usable

__all__ = ["quant_matvec", "quant_linear", "dequantize"]

MAX_ROWS = 8


@triton.jit
def _int8_tile(q_ptrs, k0, K, n_mask, rk, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(q_ptrs + k0, mask=n_mask[:, None], other=0)
    return tl.load(q_ptrs + k0, mask=n_mask[:, None] & ((k0 + rk) < K)[None, :], other=0)


@triton.jit
def _int8_fma_kernel(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_qn,
                     HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """One row of x: y[n] = scales[n] * sum_k q[n, k] x[k] (+ bias[n])."""
    if PDL:
        gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    q_ptrs = q_ptr + rn.to(tl.int64)[:, None] * stride_qn + rk[None, :]
    scale = tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    w = _int8_tile(q_ptrs, 0, K, n_mask, rk, EVEN_K)
    if PDL:
        gdc_wait()
    k_last = ((K - 1) // BLOCK_K) * BLOCK_K
    for k0 in range(0, k_last, BLOCK_K):
        w_next = _int8_tile(q_ptrs, k0 + BLOCK_K, K, n_mask, rk, EVEN_K)
        x = tl.load(x_ptr + k0 + rk, mask=(k0 + rk) < K, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        w = w_next
    x = tl.load(x_ptr + k_last + rk, mask=(k_last + rk) < K, other=0.0).to(tl.float32)
    acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1) * scale
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _int8_dot_kernel(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_ym,
                     HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """2-8 rows: y^T [BLOCK_N, BLOCK_M] = scales * (q x^T), q taken in x's dtype (exact)."""
    if PDL:
        gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    m_mask = rm < M
    q_ptrs = q_ptr + rn.to(tl.int64)[:, None] * stride_qn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    scale = tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _int8_tile(q_ptrs, k0, K, n_mask, rk, EVEN_K)
        if EVEN_K:
            x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        acc = tl.dot(w.to(x.dtype), tl.trans(x), acc, input_precision=DOT_PRECISION)
    acc = acc * scale[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _int4_tile(q_ptrs, j0, K, n_mask, rj):
    """Packed bytes j0 .. j0 + HALF of the rows (byte j holds inputs 2j and 2j+1), as the
    signed values of the low and high nibbles in fp32 (zeros past K)."""
    b = tl.load(q_ptrs + j0, mask=n_mask[:, None] & (2 * (j0 + rj) < K)[None, :], other=0x88)
    lo = (b & 0xF).to(tl.float32) - 8.0
    hi = (b >> 4).to(tl.float32) - 8.0
    return lo, hi


@triton.jit
def _int4_fma_kernel(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_qn, stride_sn,
                     HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """One row of x: y[n] = sum_g scales[n, g] * sum_{k in g} (u[n, k] - 8) x[k] (+ bias[n]).
    BLOCK_K (inputs per step) is a multiple of GROUP; K is a multiple of GROUP."""
    HALF: tl.constexpr = BLOCK_K // 2
    NG: tl.constexpr = BLOCK_K // GROUP
    if PDL:
        gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    rg = tl.arange(0, NG)
    n_mask = rn < N
    q_ptrs = q_ptr + rn.to(tl.int64)[:, None] * stride_qn + rj[None, :]
    s_ptrs = s_ptr + rn.to(tl.int64)[:, None] * stride_sn + rg[None, :]
    n_groups = K // GROUP
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    lo, hi = _int4_tile(q_ptrs, 0, K, n_mask, rj)
    if PDL:
        gdc_wait()
    k_last = ((K - 1) // BLOCK_K) * BLOCK_K
    for k0 in range(0, k_last, BLOCK_K):
        lo_next, hi_next = _int4_tile(q_ptrs, (k0 + BLOCK_K) // 2, K, n_mask, rj)
        x_even = tl.load(x_ptr + k0 + 2 * rj).to(tl.float32)
        x_odd = tl.load(x_ptr + k0 + 2 * rj + 1).to(tl.float32)
        p = tl.sum(tl.reshape(lo * x_even[None, :] + hi * x_odd[None, :], (BLOCK_N, NG, GROUP // 2)), axis=2)
        s = tl.load(s_ptrs + k0 // GROUP, mask=n_mask[:, None], other=0.0).to(tl.float32)
        acc += p * s
        lo = lo_next
        hi = hi_next
    k_mask = (k_last + 2 * rj) < K
    x_even = tl.load(x_ptr + k_last + 2 * rj, mask=k_mask, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + k_last + 2 * rj + 1, mask=k_mask, other=0.0).to(tl.float32)
    p = tl.sum(tl.reshape(lo * x_even[None, :] + hi * x_odd[None, :], (BLOCK_N, NG, GROUP // 2)), axis=2)
    s = tl.load(s_ptrs + k_last // GROUP, mask=n_mask[:, None] & ((k_last // GROUP + rg) < n_groups)[None, :],
                other=0.0).to(tl.float32)
    acc += p * s
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _int4_dot_kernel(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
                     HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """2-8 rows, one group per step: acc += scales[:, g] * (lo x_even^T + hi x_odd^T)."""
    HALF: tl.constexpr = GROUP // 2
    if PDL:
        gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rj = tl.arange(0, HALF)
    n_mask = rn < N
    m_mask = rm < M
    q_ptrs = q_ptr + rn.to(tl.int64)[:, None] * stride_qn + rj[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + 2 * rj[None, :]
    s_ptrs = s_ptr + rn.to(tl.int64) * stride_sn
    if PDL:
        gdc_wait()
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g in range(0, K // GROUP):
        b = tl.load(q_ptrs + g * HALF, mask=n_mask[:, None], other=0x88)
        x_even = tl.load(x_ptrs + g * GROUP, mask=m_mask[:, None], other=0.0)
        x_odd = tl.load(x_ptrs + g * GROUP + 1, mask=m_mask[:, None], other=0.0)
        lo = ((b & 0xF).to(tl.int8) - 8).to(x_even.dtype)
        hi = ((b >> 4).to(tl.int8) - 8).to(x_even.dtype)
        part = tl.dot(lo, tl.trans(x_even), input_precision=DOT_PRECISION)
        part = tl.dot(hi, tl.trans(x_odd), part, input_precision=DOT_PRECISION)
        s = tl.load(s_ptrs + g, mask=n_mask, other=0.0).to(tl.float32)
        acc += part * s[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn,
                       INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w [N, K] in w's dtype from qweight and scales; one [BLOCK_N, BLOCK_K] tile per program."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    if INT4:
        rj = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        mask = n_mask[:, None] & (2 * rj < K)[None, :]
        b = tl.load(q_ptr + rn64[:, None] * stride_qn + rj[None, :], mask=mask, other=0x88)
        s = tl.load(s_ptr + rn64[:, None] * stride_sn + (2 * rj // GROUP)[None, :], mask=mask, other=0.0).to(tl.float32)
        lo = ((b & 0xF).to(tl.float32) - 8.0) * s
        hi = ((b >> 4).to(tl.float32) - 8.0) * s
        w_ptrs = w_ptr + rn64[:, None] * stride_wn + 2 * rj[None, :]
        tl.store(w_ptrs, lo.to(w_ptr.dtype.element_ty), mask=mask)
        tl.store(w_ptrs + 1, hi.to(w_ptr.dtype.element_ty), mask=mask)
    else:
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (rk < K)[None, :]
        q = tl.load(q_ptr + rn64[:, None] * stride_qn + rk[None, :], mask=mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(w_ptr + rn64[:, None] * stride_wn + rk[None, :], (q * s[:, None]).to(w_ptr.dtype.element_ty),
                 mask=mask)


def _entry(scheme: str, rows: int) -> str:
    return f"{scheme}_rows1" if rows == 1 else f"{scheme}_rows2-8"


def quant_matvec(x: torch.Tensor, proj, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (M <= 8) times a quantized projection's weight^T (+ bias) -> [M, N] in x.dtype.

    `config` replaces the table's entry (tests and benchmarks use it)."""
    M, K = x.shape
    N = proj.out_features
    if K != proj.in_features:
        raise Mamba2Error(f"quant_matvec: x of width {K} for a weight of input width {proj.in_features}")
    if not 1 <= M <= MAX_ROWS:
        raise Mamba2Error(f"quant_matvec: {M} rows; use a matmul above {MAX_ROWS}")
    q, s, bias = proj.qweight, proj.scales, proj.bias
    if q.stride(1) != 1 or s.stride(-1) != 1:
        raise Mamba2Error("quant_matvec: qweight and scales rows must be contiguous")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or config_for(x.device, "quant_matvec", _entry(proj.scheme, M))
    pdl = usable(cfg["pdl"], x.device)
    opts = {"num_warps": cfg["num_warps"], **({"launch_pdl": True} if pdl else {})}
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    b_arg = bias if bias is not None else y
    block_n = cfg["block_n"]
    grid = (triton.cdiv(N, block_n),)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    block_m = max(16, 1 << (M - 1).bit_length())
    if proj.scheme == "int8":
        if cfg["kind"] == "fma":
            if M != 1:
                raise Mamba2Error(f"quant_matvec: the fma kernel takes one row, got {M}")
            block_k = min(cfg["block_k"], triton.next_power_of_2(K))
            _int8_fma_kernel[grid](x, q, s, b_arg, y, N, K, q.stride(0), HAS_BIAS=bias is not None,
                                   EVEN_K=K % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, **opts)
        else:
            block_k = min(cfg["block_k"], triton.next_power_of_2(K))
            _int8_dot_kernel[grid](x, q, s, b_arg, y, M, N, K, x.stride(0), q.stride(0), y.stride(0),
                                   HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0, BLOCK_M=block_m,
                                   BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=precision, PDL=pdl,
                                   num_stages=cfg["num_stages"], **opts)
    else:
        group = proj.group_size
        if cfg["kind"] == "fma":
            if M != 1:
                raise Mamba2Error(f"quant_matvec: the fma kernel takes one row, got {M}")
            block_k = max(group, min(cfg["block_k"], triton.next_power_of_2(K)))
            _int4_fma_kernel[grid](x, q, s, b_arg, y, N, K, q.stride(0), s.stride(0), HAS_BIAS=bias is not None,
                                   GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, **opts)
        else:
            _int4_dot_kernel[grid](x, q, s, b_arg, y, M, N, K, x.stride(0), q.stride(0), s.stride(0), y.stride(0),
                                   HAS_BIAS=bias is not None, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n,
                                   DOT_PRECISION=precision, PDL=pdl, num_stages=cfg["num_stages"], **opts)
    return y


def dequantize(proj, dtype: torch.dtype) -> torch.Tensor:
    """The projection's weight [N, K] in `dtype`, by one kernel."""
    N, K = proj.out_features, proj.in_features
    q, s = proj.qweight, proj.scales
    w = torch.empty(N, K, device=q.device, dtype=dtype)
    cfg = config_for(q.device, "quant_matvec", "dequantize")
    grid = (triton.cdiv(N, cfg["block_n"]), triton.cdiv(K, cfg["block_k"]))
    _dequantize_kernel[grid](q, s, w, N, K, q.stride(0), s.stride(0), w.stride(0), INT4=proj.scheme == "int4",
                             GROUP=max(proj.group_size, 2), BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                             num_warps=cfg["num_warps"])
    return w


def quant_linear(x: torch.Tensor, proj) -> torch.Tensor:
    """A quantized projection: the matvec kernels for 1 to MAX_ROWS rows, otherwise the weight
    dequantized in one kernel, then F.linear (cuBLAS)."""
    rows = x.numel() // x.shape[-1]
    if not (x.is_cuda or interpreting()):
        return F.linear(x, proj.dequantize(x.dtype), proj.bias)
    if rows > MAX_ROWS or rows == 0:
        return F.linear(x, dequantize(proj, x.dtype), proj.bias)
    return quant_matvec(x.reshape(rows, x.shape[-1]), proj).view(*x.shape[:-1], proj.out_features)
