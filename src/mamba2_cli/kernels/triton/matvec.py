"""Triton matrix-vector products for decode: y = x W^T (+ b) for 1 to 8 rows of x.

At batch 1-8 a decode step is a stream of weight bytes, and a plain kernel that reads each
weight once streams them faster than cuBLAS does on these shapes (the 129 products of a
Codestral decode step: 3.63 ms against 4.13 at 1 row, 4.02 against 4.27 at 8 rows). Each
program owns BLOCK_N output features, reads its slice of W once and every row of x from
cache, and accumulates in fp32. Three kernels, by what they do (configs.MATVEC picks):

    whole_rows    one row of x: each program loads its BLOCK_N weight rows whole (K up to
                  WHOLE_ROW_MAX_K) in one tile, every load issued at once, then x, one sum.
    k_tiles       one row of x, K walked in BLOCK_K tiles into a [BLOCK_N, BLOCK_K] fp32
                  accumulator, summed once at the end (rows too long for whole_rows).
    tensor_cores  2-8 rows: x padded to 16 rows, tl.dot(W tile, x^T); Triton's pipeliner
                  streams the weight tiles through shared memory (num_stages), through
                  tensor descriptors (one bulk copy per tile, sm_90) where the strides
                  allow, else as 16-byte copies per thread.

On Hopper all three launch with programmatic dependent launch (pdl.py): the weights, which
no kernel writes, are loaded before the wait for the kernel that produces x. Other
architectures' tables (configs.py) turn PDL and tensor descriptors off and size the
pipeline for their shared memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ...errors import Mamba2Error
from ...linear import QuantizedLinear
from .configs import GPU, capability, config_for
from .norm import add_rmsnorm
from .pdl import gdc_launch_dependents, gdc_wait, interpreting, usable
from .quant_matvec import quant_linear

__all__ = ["matvec", "linear", "norm_linear"]

MAX_ROWS = 8  # more rows than this: the product is a matmul (cuBLAS), not a matvec
# The whole-row tile: 16384 16-bit weights are 128 registers per thread at 4 warps.
WHOLE_ROW_MAX_K = 16384
# Shared memory the tensor-core pipeline may fill on Hopper (and under the interpreter);
# each architecture's is its table's "gpu" entry.
DOT_SMEM_BYTES = GPU["dot_smem_bytes"]


@triton.jit
def _w_tile(w_ptrs, k0, K, n_mask, rk, EVEN_K: tl.constexpr, EVICT: tl.constexpr):
    """The weight tile at column k0 < K (masked at the end of K unless K is a multiple of the tile)."""
    if EVEN_K:
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0, eviction_policy=EVICT)
    else:
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & ((k0 + rk) < K)[None, :], other=0.0, eviction_policy=EVICT)
    return w


@triton.jit
def _x_tile(x_ptrs, k0, K, m_mask, rk, EVEN_K: tl.constexpr):
    if EVEN_K:
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
    else:
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
    return x


@triton.jit
def _matvec_whole_rows_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn,
                              HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              EVICT: tl.constexpr, PDL: tl.constexpr = False):
    """PDL: the next kernel may launch at once, and this one's weight rows (and bias) are
    loaded before it waits for the kernel that writes x."""
    if PDL:
        gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    k_mask = rk < K
    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                other=0.0, eviction_policy=EVICT)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    x = tl.load(x_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)
    y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if HAS_BIAS:
        y += bias
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _matvec_k_tiles_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """One row of x. PDL: the first weight tile is fetched before the wait for the kernel
    that writes x, and each next tile is in flight while the current one is multiplied
    (a register double buffer)."""
    pid = tl.program_id(0)
    if PDL:
        gdc_launch_dependents()  # the next kernel may start; it waits for us before reading
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, 1)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    m_mask = rm < 1
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * 0 + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PDL:
        w = _w_tile(w_ptrs, 0, K, n_mask, rk, EVEN_K, "")
        gdc_wait()
        k_last = ((K - 1) // BLOCK_K) * BLOCK_K
        for k0 in range(0, k_last, BLOCK_K):
            w_next = _w_tile(w_ptrs, k0 + BLOCK_K, K, n_mask, rk, EVEN_K, "")
            acc = acc + w.to(tl.float32) * _x_tile(x_ptrs, k0, K, m_mask, rk, EVEN_K).to(tl.float32)
            w = w_next
        acc = acc + w.to(tl.float32) * _x_tile(x_ptrs, k_last, K, m_mask, rk, EVEN_K).to(tl.float32)
    else:
        for k0 in range(0, K, BLOCK_K):
            w = _w_tile(w_ptrs, k0, K, n_mask, rk, EVEN_K, "")
            acc = acc + w.to(tl.float32) * _x_tile(x_ptrs, k0, K, m_mask, rk, EVEN_K).to(tl.float32)
    y = tl.sum(acc, axis=1)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * 0 + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dot_tile(acc, x_src, w_src, x_ptrs, w_ptrs, n0, k0, K, n_mask, m_mask, rk, EVEN_K: tl.constexpr,
              TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] += W[n0:, k0:] x[:, k0:]^T for one tile. TMA: x_src and w_src are
    tensor descriptors (one bulk copy per tile, zeros past M, N and K); otherwise x_ptrs and
    w_ptrs point at column 0 of the tile's rows. The weights are read once: evicted first."""
    if TMA:
        w = w_src.load([n0, k0])
        x = x_src.load([0, k0])
    else:
        w = _w_tile(w_ptrs, k0, K, n_mask, rk, EVEN_K, "evict_first")
        x = _x_tile(x_ptrs, k0, K, m_mask, rk, EVEN_K)
    return tl.dot(w, tl.trans(x.to(w.dtype)), acc, input_precision=DOT_PRECISION)


@triton.jit
def _matvec_tensor_core_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_ym, xp_ptr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr = False, PDL: tl.constexpr = False,
    EARLY_TILE: tl.constexpr = False,
):
    """One BLOCK_N-row tile per program. TMA: x_ptr and w_ptr are tensor descriptors. PDL: the
    next kernel may launch at once; this one waits for the kernel that writes x before its
    first load (the pipeline's first copies take x with the weights). EARLY_TILE: the first
    weight tile is loaded on its own (under PDL before the wait) and multiplied last: the
    pipelined loop runs from the second tile, its first copies issued at once after the wait,
    and the first tile's x (`xp_ptr`, x as a plain pointer) is loaded by plain loads that
    nothing waits for until the end."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    m_mask = rm < M
    if TMA:
        w_ptrs = rk  # unused
        x_ptrs = rk
    else:
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    if PDL:
        gdc_launch_dependents()
    if EARLY_TILE:
        if TMA:
            w_first = w_ptr.load([pid * BLOCK_N, 0])
        else:
            w_first = _w_tile(w_ptrs, 0, K, n_mask, rk, EVEN_K, "evict_first")
    if PDL:
        gdc_wait()
    k_first = 0
    if EARLY_TILE:
        x_first = _x_tile(xp_ptr + rm[:, None] * stride_xm + rk[None, :], 0, K, m_mask, rk, EVEN_K)
        k_first = BLOCK_K
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T: the weight rows fill the MMA's M
    for k0 in range(k_first, K, BLOCK_K):
        acc = _dot_tile(acc, x_ptr, w_ptr, x_ptrs, w_ptrs, pid * BLOCK_N, k0, K, n_mask, m_mask, rk, EVEN_K,
                        TMA, DOT_PRECISION)
    if EARLY_TILE:
        acc = tl.dot(w_first, tl.trans(x_first.to(w_first.dtype)), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def dot_stages(cfg: dict, block_n: int, block_k: int, block_m: int, itemsize: int,
               smem_bytes: int = DOT_SMEM_BYTES) -> int:
    """cfg's num_stages, lowered until the staged weight and x tiles fit smem_bytes (fp32
    tiles take twice the bytes of the 16-bit ones the configurations were tuned with); an early
    tile takes one weight tile besides the stages."""
    stages = cfg["num_stages"]
    per_stage = (block_n + block_m) * block_k * itemsize
    early = block_n * block_k * itemsize if cfg["early_tile"] else 0
    while stages > 1 and stages * per_stage + early > smem_bytes:
        stages -= 1
    return stages


try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton without host-side tensor descriptors
    TensorDescriptor = None


def _tma_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Tensor descriptors (where the entry asks for them): a Triton that has them, a
    Hopper-or-later GPU (or the interpreter),
    16-byte aligned bases and row strides and a unit inner stride. Otherwise the 16-byte copies."""
    if TensorDescriptor is None:
        return False
    if x.is_cuda:
        if capability(x.device)[0] < 9:
            return False
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(1) == 1
               for t in (x, weight))


def entry_for(rows: int, K: int) -> str:
    """The configs.MATVEC entry for `rows` rows of width K."""
    if rows == 1:
        return "rows1_k8192" if K == 8192 else "rows1_long" if K > WHOLE_ROW_MAX_K else "rows1"
    return "rows2-8_k8192" if K == 8192 else "rows2-8"


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: dict | None = None) -> torch.Tensor:
    """x [M, K] (M <= 8), weight [N, K] row-major -> [M, N] in x.dtype (fp32 accumulation).

    `config` replaces the configs.MATVEC entry for M rows (tests and benchmarks use it).
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise Mamba2Error(f"matvec: shapes {list(x.shape)} and {list(weight.shape)} do not multiply")
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS or M < 1:
        raise Mamba2Error(f"matvec: {M} rows; use a matmul above {MAX_ROWS}")
    if weight.stride(1) != 1:
        raise Mamba2Error("matvec: weight rows must be contiguous")
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        raise Mamba2Error(f"matvec: bias of shape {list(bias.shape)} for {N} outputs")
    cfg = config or config_for(x.device, "matvec", entry_for(M, K))
    kind = cfg["kind"]
    if kind == "whole_rows" and K > WHOLE_ROW_MAX_K:
        raise Mamba2Error(f"matvec: whole rows of {K} do not fit; at most {WHOLE_ROW_MAX_K}")
    if kind in ("whole_rows", "k_tiles") and M != 1:
        raise Mamba2Error(f"matvec: the {kind} kernel takes one row, got {M}")
    block_n = cfg["block_n"]
    pdl = usable(cfg["pdl"], x.device)
    opts = {"num_warps": cfg["num_warps"], **({"launch_pdl": True} if pdl else {})}
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    b_arg = bias if bias is not None else y
    grid = (triton.cdiv(N, block_n),)
    if kind == "whole_rows":
        _matvec_whole_rows_kernel[grid](x, weight, b_arg, y, N, K, weight.stride(0), HAS_BIAS=bias is not None,
                                        BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(K),
                                        EVICT="evict_first" if cfg["evict_first"] else "", PDL=pdl, **opts)
    elif kind == "k_tiles":
        block_k = min(cfg["block_k"], triton.next_power_of_2(K))
        _matvec_k_tiles_kernel[grid](x, weight, b_arg, y, N, K, weight.stride(0), HAS_BIAS=bias is not None,
                                     EVEN_K=K % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, **opts)
    elif kind == "tensor_cores":
        if weight.dtype != x.dtype:
            raise Mamba2Error(f"matvec: tensor cores need one dtype, got {x.dtype} and {weight.dtype}")
        block_k = min(cfg["block_k"], triton.next_power_of_2(K))
        block_m = max(16, 1 << (M - 1).bit_length())
        args = (x, weight, b_arg, y)
        tma = cfg["tma"] and _tma_ok(x, weight)
        if tma:
            args = (TensorDescriptor.from_tensor(x, [block_m, block_k]),
                    TensorDescriptor.from_tensor(weight, [block_n, block_k]), b_arg, y)
        _matvec_tensor_core_kernel[grid](
            *args, M, N, K, x.stride(0), weight.stride(0), y.stride(0), x,
            HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", TMA=tma,
            PDL=pdl, EARLY_TILE=cfg["early_tile"],
            num_stages=dot_stages(cfg, block_n, block_k, block_m, x.element_size(),
                                  config_for(x.device, "gpu", "dot_smem_bytes")), **opts,
        )
    else:
        raise Mamba2Error(f"matvec: unknown kernel kind {kind!r}")
    return y


def _kernel_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return weight.stride(-1) == 1 and (x.is_cuda or interpreting())


def linear(x: torch.Tensor, proj) -> torch.Tensor:
    """x @ proj.weight^T + proj.bias: the matvec kernels for decode's 1 to MAX_ROWS rows,
    F.linear (cuBLAS) for more; quantized weights go to quant_matvec.py."""
    if isinstance(proj, QuantizedLinear):
        return quant_linear(x, proj)
    weight, bias = proj.weight, proj.bias
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS or rows == 0 or not _kernel_ok(x, weight):
        return F.linear(x, weight, bias)
    return matvec(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def norm_linear(x, residual, norm_weight, eps, residual_in_fp32, proj):
    """(linear(add_rmsnorm(x, residual, norm_weight, eps)[0], proj), new residual)."""
    normed, residual = add_rmsnorm(x, residual, norm_weight, eps, residual_in_fp32)
    return linear(normed, proj), residual
