"""Triton matrix-vector products for decode: y = x W^T (+ b) for a few rows of x.

At batch 1-8 a decode step is a stream of weight bytes; cuBLAS inside a CUDA graph reaches
about 79 % of copy bandwidth on these shapes (../shared/ANCHORS.md), a plain row-block
kernel more. Each program owns BLOCK_N output features and walks K in BLOCK_K tiles,
reading its slice of W once and every row of x from cache, accumulating in fp32.
No autotuning: configurations are fixed per batch size (benchmarks/NOTES.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..errors import Mamba2Error

MAX_ROWS = 8  # more rows than this: the product is a matmul, not a matvec

# (BLOCK_N, BLOCK_K, num_warps) by padded row count.
GEMV_CONFIG = {1: (2, 2048, 4), 2: (2, 1024, 4), 4: (4, 512, 4), 8: (4, 256, 4)}


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    m_mask = rm < M
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + rk) < K
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (M <= 8), weight [N, K] row-major -> [M, N] in x.dtype (fp32 accumulation)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise Mamba2Error(f"gemv: shapes {list(x.shape)} and {list(weight.shape)} do not multiply")
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS:
        raise Mamba2Error(f"gemv: {M} rows; use a matmul above {MAX_ROWS}")
    if weight.stride(1) != 1:
        raise Mamba2Error("gemv: weight rows must be contiguous")
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        raise Mamba2Error(f"gemv: bias of shape {list(bias.shape)} for {N} outputs")
    block_m = 1 << (M - 1).bit_length()
    block_n, block_k, warps = GEMV_CONFIG[block_m]
    block_k = min(block_k, triton.next_power_of_2(K))
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else y, y, M, N, K,
        x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return y


# Rows up to which `linear` takes the kernel. Measured on the H200 (benchmarks/NOTES.md): the
# 129 matvecs of a Codestral decode step take 3.88 ms at 1 row (88 % of copy bandwidth, cuBLAS
# 4.04 ms) but 36.5 ms at 8 rows (cuBLAS 4.15 ms): the 8-row configuration is far off, so
# batches use cuBLAS until it is tuned.
KERNEL_ROWS = 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the matvec kernel for the single-row products of batch-1 decode."""
    rows = x.numel() // x.shape[-1]
    if rows > KERNEL_ROWS or weight.stride(-1) != 1 or not x.is_cuda and not _interpreting():
        return F.linear(x, weight, bias)
    return gemv(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
