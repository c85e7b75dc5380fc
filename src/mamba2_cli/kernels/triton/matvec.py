"""Triton matrix-vector products for decode: y = x W^T (+ b) for a few rows of x.

At batch 1-8 a decode step is a stream of weight bytes; cuBLAS inside a CUDA graph reaches
about 79 % of copy bandwidth on these shapes (../shared/ANCHORS.md), a plain row-block
kernel more. Each program owns BLOCK_N output features and walks K in BLOCK_K tiles,
reading its slice of W once and every row of x from cache, accumulating in fp32.
No autotuning: configurations are fixed per batch size (benchmarks/NOTES.md).

Kernel bodies (`GemvConfig.kind`), all selectable so one GPU run can compare them:

    reduce  the first kernel: the product of each K tile is summed over K at once
            (a cross-thread reduction per tile).
    acc     a [BLOCK_N, BLOCK_K] fp32 accumulator per row of x, summed once at the end;
            options: evict_first on the weight loads (they are read once), a register
            double buffer of the next weight tile (prefetch), programmatic dependent
            launch (pdl: the first weight tile is fetched before waiting for the kernel
            that produces x).
    dot     tensor cores: the rows of x padded to 16, tl.dot(W tile, x^T), Triton's
            pipeliner streams the weight tiles through shared memory (num_stages); with
            `tma` the tiles come through tensor descriptors (one bulk copy per tile on
            Hopper) where the strides allow, else as 16-byte copies per thread.
    row     one row of x: each program loads its BLOCK_N weight rows whole (K up to
            ROW_MAX_K) in one tile, every load issued at once, then x, then one sum.
    dotp    the dot body in persistent programs (per_sm per SM), each over an equal share of
            the (tile, K tile) units in one flattened loop: no SM gets a last, lone wave of
            tiles, the pipeline does not drain between tiles, and a tile cut between two
            programs is summed through a small scratch buffer (stream-K).

`norm_gemv` fuses the residual add + RMSNorm in front of a single-row product (the
in_proj of every layer and lm_head): every program recomputes the norm of the 4096-wide
row from cache and program 0 writes the new residual, which removes one launch per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..errors import Mamba2Error
from .norm import add_rmsnorm
from .pdl import HAS_PDL, gdc_launch_dependents, gdc_wait, interpreting as _interpreting, usable

# HAS_PDL is re-exported: benchmarks read gemv.HAS_PDL.
__all__ = ["HAS_PDL", "GemvConfig", "gemv", "norm_gemv", "linear", "norm_linear"]

MAX_ROWS = 8  # more rows than this: the product is a matmul, not a matvec
ROW_MAX_K = 16384  # the row kernel's whole-row tile: 16384 16-bit weights are 128 registers at 4 warps
# The row kernel's layout by K where not the 1-row configuration's: (rows per program, warps,
# evict_first). Round 35, per layer in graphs: out_proj (K 8192) 16.85 µs at 2 rows, 4 warps,
# evict_first, against 17.08 without evict, 17.64 at 1 row, 17.11 at 8 warps (and in decode,
# round 38: 236.9 tok/s with its evict_first against 235.8 without). The default serves K 4096:
# in_proj 35.23 µs at 1 row and 8 warps (35.61 at 4, 38.12 at 2 rows), lm_head 60.71 (61.62).
ROW_BY_K = {8192: (2, 4, True)}
# 2-8 rows: configurations by K that replace GEMV_CONFIG's when no config is given.
MULTI_BY_K: dict[int, "GemvConfig"] = {}


@dataclass(frozen=True)
class GemvConfig:
    """How one matvec launch is laid out (see the module docstring for the kinds)."""

    kind: str = "reduce"  # "reduce" | "acc" | "dot" | "dotp" | "row"
    block_n: int = 2
    block_k: int = 2048
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default
    evict_first: bool = False  # acc, dot: weights are read once; keep x in cache instead
    prefetch: bool = False  # acc: load the next weight tile before this tile's products
    pdl: bool = False  # acc, row, dot: programmatic dependent launch (CUDA only)
    one_pass: bool = False  # norm_gemv: scale by 1/rms after the product (x not rounded first)
    per_sm: int = 1  # dotp: programs per SM
    tma: bool = False  # dot, dotp: tiles fetched through tensor descriptors (where strides allow)
    # dot with pdl and tma: bytes of each weight row asked into L2 before the wait. Off: H200,
    # session 12, round 59 (batch-8 decode graph replays, medians of 9, alternated): 1024 bytes
    # 5808.6 µs per step against 5815.5, 2048 5936.3, 4096 6321.2, 8192 7218.4.
    prefetch_l2: int = 0
    early_tile: bool = False  # dot: the first weight tile loaded on its own (under pdl before the wait), used last

    @property
    def name(self) -> str:
        s = f"{self.kind} n{self.block_n} k{self.block_k} w{self.num_warps}"
        if self.num_stages is not None:
            s += f" s{self.num_stages}"
        if self.kind == "dotp":
            s += f" p{self.per_sm}"
        if self.prefetch_l2:
            s += f" l2pf{self.prefetch_l2}"
        for flag in ("evict_first", "prefetch", "pdl", "one_pass", "tma", "early_tile"):
            if getattr(self, flag):
                s += " " + flag.replace("_first", "")
        return s

    def with_(self, **kw) -> "GemvConfig":
        return replace(self, **kw)


# Configuration by padded row count, measured on the H200 (benchmarks/NOTES.md).
_DOT_ROWS = GemvConfig("dot", 64, 256, 4, num_stages=4, evict_first=True, tma=True, pdl=True)
GEMV_CONFIG = {
    # 1 row: each program's weight rows loaded whole, all at once (H200, session 8, rounds 34-35,
    # per layer in graphs of 64 layers' own weights): in_proj 35.23 µs against 37.11 for round
    # 5's `acc n2 k1024 w4` (3.63 ms for the 129 products, where cuBLAS took 4.13), out_proj
    # 16.85 (ROW_BY_K) against 18.30, lm_head 60.71 against 63.19; Codestral decode at 4 warps
    # and 2 rows for out_proj: 235.1 against 225.5 tok/s (medians of 3, alternated). Round 37:
    # evict_first alone faster (in_proj 35.05 against 35.22 µs, lm_head 60.42 against 60.68) but
    # in the model slower (round 38: 231.4 against 237.4 tok/s), so off; 16 warps slower.
    # Launched with PDL (the weight rows loaded before the wait for x) since session 10: see
    # norm.NORM_CONFIG["add_pdl"] and step.STEP_CONFIG for the decode figures.
    1: GemvConfig("row", 1, 1024, 8, pdl=True),
    # 2-8 rows: tensor cores, rows padded to 16 in the kernel, so one configuration serves them
    # all. Measured at 8 rows (round 5 and the recheck): 129 products 4.02 ms (cuBLAS 4.27),
    # Codestral batch-8 decode 154.9 vs 147.8 tok/s per sequence; 2 and 4 rows are not timed.
    # Tiles through tensor descriptors (tma; session 9, rounds 41-42, per layer in graphs of 64
    # layers' own weights): in_proj 39.19 µs against 40.58 with the 16-byte copies, out_proj 18.57
    # against 19.21, lm_head 63.73 against 64.46; batch-8 decode 166.1 against 162.5 tok/s per
    # sequence (medians of 3, alternated). 5 stages the same; stream-K (`dotp`) slower at every
    # layout tried (in_proj 40.84, lm_head 66.80). With PDL (session 10, round 46, with
    # add_rmsnorm under PDL too): batch-8 decode 167.8 against 164.8 tok/s.
    2: _DOT_ROWS,
    4: _DOT_ROWS,
    8: _DOT_ROWS,
}
# K 8192 (Codestral's out_proj, which follows the step's short norm kernel): the first weight
# tile loaded before the wait (early_tile). H200, session 13, round 64 (batch-8 decode graph
# replays, medians of 9, alternated): 5683.3 µs per step against 5696.0 and 5697.3; the early
# tile on every product 5710.7, on K 4096 only (in_proj, lm_head) 5719.4.
MULTI_BY_K[8192] = _DOT_ROWS.with_(early_tile=True)

# The fused add + RMSNorm + matvec; used by `norm_linear` only when FUSE_NORM is set.
NORM_GEMV_CONFIG = GemvConfig("acc", 4, 1024, 4)
FUSE_NORM = False


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


@triton.jit
def _tile_ptrs(pid, x_ptr, w_ptr, M, N, stride_xm, stride_wn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's output columns rn, rows rm, tile columns rk, their masks, and the first
    K tile's pointers into W (64-bit row offsets) and x."""
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    return rn, rm, rk, rn < N, rm < M, w_ptrs, x_ptrs


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
def _fma(acc, w, x, ONE_ROW: tl.constexpr):
    """acc [BLOCK_N, BLOCK_K] (one row) or [BLOCK_M, BLOCK_N, BLOCK_K] += x * w, in fp32."""
    if ONE_ROW:
        out = acc + w.to(tl.float32) * x.to(tl.float32)
    else:
        out = acc + x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return out


@triton.jit
def _gemv_acc_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVICT: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    if PDL:
        gdc_launch_dependents()  # the next kernel may start; it waits for us before reading
    rn, rm, rk, n_mask, m_mask, w_ptrs, x_ptrs = _tile_ptrs(pid, x_ptr, w_ptr, M, N, stride_xm, stride_wn,
                                                             BLOCK_M, BLOCK_N, BLOCK_K)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PREFETCH:
        # Register double buffer: tile k+1's weights are in flight while tile k is multiplied.
        # The first tile is fetched before waiting on the kernel that writes x (PDL).
        w = _w_tile(w_ptrs, 0, K, n_mask, rk, EVEN_K, EVICT)
        if PDL:
            gdc_wait()
        k_last = ((K - 1) // BLOCK_K) * BLOCK_K
        for k0 in range(0, k_last, BLOCK_K):
            w_next = _w_tile(w_ptrs, k0 + BLOCK_K, K, n_mask, rk, EVEN_K, EVICT)
            acc = _fma(acc, w, _x_tile(x_ptrs, k0, K, m_mask, rk, EVEN_K), BLOCK_M == 1)
            w = w_next
        acc = _fma(acc, w, _x_tile(x_ptrs, k_last, K, m_mask, rk, EVEN_K), BLOCK_M == 1)
    else:
        if PDL:
            gdc_wait()
        for k0 in range(0, K, BLOCK_K):
            w = _w_tile(w_ptrs, k0, K, n_mask, rk, EVEN_K, EVICT)
            acc = _fma(acc, w, _x_tile(x_ptrs, k0, K, m_mask, rk, EVEN_K), BLOCK_M == 1)
    if BLOCK_M == 1:
        y = tl.sum(acc, axis=1)[None, :]
    else:
        y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemv_row_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVICT: tl.constexpr,
                     PDL: tl.constexpr = False):
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
def _dot_tile(acc, x_src, w_src, x_ptrs, w_ptrs, n0, k0, K, n_mask, m_mask, rk, EVEN_K: tl.constexpr,
              EVICT: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] += W[n0:, k0:] x[:, k0:]^T for one tile. TMA: x_src and w_src are
    tensor descriptors (one bulk copy per tile, zeros past M, N and K); otherwise x_ptrs and
    w_ptrs point at column 0 of the tile's rows."""
    if TMA:
        w = w_src.load([n0, k0])
        x = x_src.load([0, k0])
    else:
        w = _w_tile(w_ptrs, k0, K, n_mask, rk, EVEN_K, EVICT)
        x = _x_tile(x_ptrs, k0, K, m_mask, rk, EVEN_K)
    return tl.dot(w, tl.trans(x.to(w.dtype)), acc, input_precision=DOT_PRECISION)


@triton.jit
def _store_rows(y_ptr, acc, b_ptr, rn, n_mask, rm, m_mask, stride_ym, HAS_BIAS: tl.constexpr):
    """y[rm, rn] = acc^T (+ bias)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _l2_prefetch_rows(wp_ptr, rn, N, stride_wn, nbytes):
    """Ask L2 for the first `nbytes` of weight rows rn (clamped to N - 1): one bulk prefetch
    per row (sm_90 and later; rows 16-byte aligned, nbytes a multiple of 16). A hint only:
    nothing waits for it and nothing it fetches is read from registers."""
    rows = wp_ptr + tl.minimum(rn, N - 1).to(tl.int64) * stride_wn
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tcp.async.bulk.prefetch.L2.global [$1], $2;", "=r,l,r",
                              [rows, tl.full(rn.shape, nbytes, tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemv_dot_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_ym, wp_ptr, xp_ptr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVICT: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr = False, PDL: tl.constexpr = False,
    PREFETCH_L2: tl.constexpr = 0, EARLY_TILE: tl.constexpr = False,
):
    """One BLOCK_N-row tile per program. TMA: x_ptr and w_ptr are tensor descriptors. PDL: the
    next kernel may launch at once; this one waits for the kernel that writes x before its
    first load (the pipeline's first copies take x with the weights). PREFETCH_L2 (bytes, under
    PDL on sm_90): before that wait, the first PREFETCH_L2 bytes of the program's weight rows
    (`wp_ptr`, the weight as a plain pointer) are requested into L2, so the pipeline's first
    copies after the wait find them there. EARLY_TILE: the first weight tile is loaded on its
    own (under PDL before the wait) and multiplied last: the pipelined loop runs from the second
    tile, its first copies issued at once after the wait, and the first tile's x (`xp_ptr`, x as
    a plain pointer) is loaded by plain loads that nothing waits for until the end."""
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
        if PREFETCH_L2 > 0:
            _l2_prefetch_rows(wp_ptr, rn, N, stride_wn, PREFETCH_L2)
    if EARLY_TILE:
        if TMA:
            w_first = w_ptr.load([pid * BLOCK_N, 0])
        else:
            w_first = _w_tile(w_ptrs, 0, K, n_mask, rk, EVEN_K, EVICT)
    if PDL:
        gdc_wait()
    k_first = 0
    if EARLY_TILE:
        x_first = _x_tile(xp_ptr + rm[:, None] * stride_xm + rk[None, :], 0, K, m_mask, rk, EVEN_K)
        k_first = BLOCK_K
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T: the weight rows fill the MMA's M
    for k0 in range(k_first, K, BLOCK_K):
        acc = _dot_tile(acc, x_ptr, w_ptr, x_ptrs, w_ptrs, pid * BLOCK_N, k0, K, n_mask, m_mask, rk, EVEN_K, EVICT,
                        TMA, DOT_PRECISION)
    if EARLY_TILE:
        acc = tl.dot(w_first, tl.trans(x_first.to(w_first.dtype)), acc, input_precision=DOT_PRECISION)
    _store_rows(y_ptr, acc, b_ptr, rn, n_mask, rm, m_mask, stride_ym, HAS_BIAS)


@triton.jit
def _gemv_dotp_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVICT: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr = False,
):
    """The dot body over an equal share of (tile, K tile) units, in one flattened loop.

    A tile cut between programs p and p + 1 is summed through part[p] (p's head of the tile
    on side 0, p + 1's tail on side 1) and count[p]: inside the loop each program only stores
    its side (so the loop stays a plain pipelined stream); after it, each arrives at its cut
    tiles' counts, and the second to arrive adds side 0 and side 1, stores the outputs and
    resets the count for the next launch. The launch has at most as many programs as tiles,
    so every program holds at least one whole tile's units and a tile is cut at most once.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    units = tl.cdiv(N, BLOCK_N).to(tl.int64) * k_tiles
    u0 = ((pid * units) // nprog).to(tl.int32)
    u1 = (((pid + 1) * units) // nprog).to(tl.int32)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_N)
    m_mask = rm < M
    if TMA:
        x_ptrs = rk  # unused
    else:
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    part_off = rb[:, None] * BLOCK_M + rm[None, :]
    TILE: tl.constexpr = BLOCK_N * BLOCK_M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for u in range(u0, u1):
        tile = u // k_tiles
        ki = u - tile * k_tiles
        rn = tile * BLOCK_N + rb
        n_mask = rn < N
        if TMA:
            w_ptrs = rk
        else:
            w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
        acc = _dot_tile(acc, x_ptr, w_ptr, x_ptrs, w_ptrs, tile * BLOCK_N, ki * BLOCK_K, K, n_mask, m_mask, rk, EVEN_K,
                        EVICT, TMA, DOT_PRECISION)
        last_k = ki == k_tiles - 1
        if last_k | (u == u1 - 1):
            if last_k & (tile * k_tiles >= u0):  # a whole tile
                _store_rows(y_ptr, acc, b_ptr, rn, n_mask, rm, m_mask, stride_ym, HAS_BIAS)
            else:  # a cut tile: the tail of the previous program's (side 1) or the head of the next's (side 0)
                side = last_k.to(tl.int32)
                tl.store(part_ptr + ((pid - side) * 2 + side) * TILE + part_off, acc)
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # Arrivals: the boundary with the previous program (if u0 cuts a tile), then the next's.
    for side in tl.static_range(2):
        bnd = pid - 1 + side
        if ((u0 if side == 0 else u1) % k_tiles) != 0:
            tl.debug_barrier()  # every thread's part stores before the release
            arrived = tl.atomic_add(count_ptr + bnd, 1, sem="acq_rel")
            if arrived == 1:
                y = tl.load(part_ptr + (bnd * 2) * TILE + part_off, cache_modifier=".cg")
                y += tl.load(part_ptr + (bnd * 2 + 1) * TILE + part_off, cache_modifier=".cg")
                rn = ((bnd + 1) * units // nprog // k_tiles).to(tl.int32) * BLOCK_N + rb
                _store_rows(y_ptr, y, b_ptr, rn, rn < N, rm, m_mask, stride_ym, HAS_BIAS)
                tl.atomic_xchg(count_ptr + bnd, 0, sem="relaxed")


@triton.jit
def _norm_vec(x_ptr, res_ptr, res_out_ptr, nw_ptr, k0, rk, K, pid, rstd, HAS_RES: tl.constexpr,
              WRITE_RES: tl.constexpr, EVEN_K: tl.constexpr, STORE: tl.constexpr, SCALE: tl.constexpr):
    """Columns k0 + rk of the residual r = x (+ res) as stored (program 0 stores it when STORE)
    and of the product's input: r * nw, or with SCALE the normed row r * rstd * nw rounded to
    x's dtype, as add_rmsnorm would store it. Returns (input, r) in fp32."""
    if EVEN_K:
        r = tl.load(x_ptr + k0 + rk).to(tl.float32)
        if HAS_RES:
            r += tl.load(res_ptr + k0 + rk).to(tl.float32)
        nw = tl.load(nw_ptr + k0 + rk).to(tl.float32)
    else:
        kmask = (k0 + rk) < K
        r = tl.load(x_ptr + k0 + rk, mask=kmask, other=0.0).to(tl.float32)
        if HAS_RES:
            r += tl.load(res_ptr + k0 + rk, mask=kmask, other=0.0).to(tl.float32)
        nw = tl.load(nw_ptr + k0 + rk, mask=kmask, other=0.0).to(tl.float32)
    if WRITE_RES:
        r = r.to(res_out_ptr.dtype.element_ty)
        if STORE:
            tl.store(res_out_ptr + k0 + rk, r, mask=(k0 + rk) < tl.where(pid == 0, K, 0))
        r = r.to(tl.float32)
    if SCALE:
        v = (r * rstd * nw).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        v = r * nw
    return v, r


@triton.jit
def _norm_gemv_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, res_out_ptr, N, K, eps, stride_wn,
    HAS_RES: tl.constexpr, WRITE_RES: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVICT: tl.constexpr,
    ONE_PASS: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
):
    """ONE_PASS: sum_k W[n,k] r[k] nw[k], times 1/rms at the end (one pass over the row);
    else as the unfused pair: a first pass for 1/rms, then the product of the rounded normed row."""
    pid = tl.program_id(0)
    if PDL:
        gdc_launch_dependents()
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    if PREFETCH:
        w = _w_tile(w_ptrs, 0, K, n_mask, rk, EVEN_K, EVICT)  # weights are constant: ahead of the wait
    if PDL:
        gdc_wait()
    rstd = 1.0
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if not ONE_PASS:
        for k0 in range(0, K, BLOCK_K):
            _, r = _norm_vec(x_ptr, res_ptr, res_out_ptr, nw_ptr, k0, rk, K, pid, rstd,
                             HAS_RES, WRITE_RES, EVEN_K, True, False)
            ss += r * r
        rstd = tl.math.rsqrt(tl.sum(ss, axis=0) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PREFETCH:
        k_last = ((K - 1) // BLOCK_K) * BLOCK_K
        for k0 in range(0, k_last, BLOCK_K):
            w_next = _w_tile(w_ptrs, k0 + BLOCK_K, K, n_mask, rk, EVEN_K, EVICT)
            v, r = _norm_vec(x_ptr, res_ptr, res_out_ptr, nw_ptr, k0, rk, K, pid, rstd,
                             HAS_RES, WRITE_RES, EVEN_K, ONE_PASS, not ONE_PASS)
            ss += r * r
            acc += w.to(tl.float32) * v[None, :]
            w = w_next
        v, r = _norm_vec(x_ptr, res_ptr, res_out_ptr, nw_ptr, k_last, rk, K, pid, rstd,
                         HAS_RES, WRITE_RES, EVEN_K, ONE_PASS, not ONE_PASS)
        ss += r * r
        acc += w.to(tl.float32) * v[None, :]
    else:
        for k0 in range(0, K, BLOCK_K):
            w = _w_tile(w_ptrs, k0, K, n_mask, rk, EVEN_K, EVICT)
            v, r = _norm_vec(x_ptr, res_ptr, res_out_ptr, nw_ptr, k0, rk, K, pid, rstd,
                             HAS_RES, WRITE_RES, EVEN_K, ONE_PASS, not ONE_PASS)
            ss += r * r
            acc += w.to(tl.float32) * v[None, :]
    y = tl.sum(acc, axis=1)
    if ONE_PASS:
        y = y * tl.math.rsqrt(tl.sum(ss, axis=0) / K + eps)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


def _launch_opts(cfg: GemvConfig, device: torch.device) -> dict:
    opts = {"num_warps": cfg.num_warps}
    if cfg.num_stages is not None:
        opts["num_stages"] = cfg.num_stages
    if _pdl(cfg, device):
        opts["launch_pdl"] = True
    return opts


def _pdl(cfg: GemvConfig, device: torch.device) -> bool:
    return usable(cfg.pdl, device)


# Shared memory the dot kernel's pipeline may fill: an H100/H200 block gets at most 227 KB.
DOT_SMEM_BYTES = 192 * 1024


def dot_stages(cfg: GemvConfig, block_n: int, block_k: int, block_m: int, itemsize: int) -> int | None:
    """cfg.num_stages, lowered until the staged weight and x tiles fit DOT_SMEM_BYTES (fp32
    tiles take twice the bytes of the 16-bit ones the configurations were tuned with); an early
    tile takes one weight tile besides the stages."""
    stages = cfg.num_stages
    if stages is None:
        return None
    per_stage = (block_n + block_m) * block_k * itemsize
    early = block_n * block_k * itemsize if cfg.early_tile else 0
    while stages > 1 and stages * per_stage + early > DOT_SMEM_BYTES:
        stages -= 1
    return stages


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter's stand-in)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton without host-side tensor descriptors
    TensorDescriptor = None

_CAPABILITY: dict = {}


def _tma_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Tensor descriptors: a Triton that has them, a Hopper-or-later GPU (or the interpreter),
    16-byte aligned bases and row strides and a unit inner stride. Otherwise the 16-byte copies."""
    if TensorDescriptor is None:
        return False
    if x.is_cuda:
        idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
        if idx not in _CAPABILITY:
            _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
        if _CAPABILITY[idx][0] < 9:
            return False
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(1) == 1
               for t in (x, weight))


_DOTP_SCRATCH: dict = {}


def _dotp_scratch(device: torch.device, nprog: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dotp kernel's cut-tile sums (2 sides of `tile` fp32 per boundary) and arrival counts,
    allocated once per device and layout and never freed, so launches can be captured in a
    graph. The counts are back at zero after every launch; launches that share them must not
    run concurrently on different streams."""
    key = (device.type, device.index, nprog, tile)
    if key not in _DOTP_SCRATCH:
        _DOTP_SCRATCH[key] = (torch.empty(nprog * 2 * tile, dtype=torch.float32, device=device),
                              torch.zeros(nprog, dtype=torch.int32, device=device))
    return _DOTP_SCRATCH[key]


def config_for(rows: int) -> GemvConfig:
    return GEMV_CONFIG[1 << (rows - 1).bit_length()]


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] (M <= 8), weight [N, K] row-major -> [M, N] in x.dtype (fp32 accumulation).

    `config` overrides the configuration GEMV_CONFIG gives for M rows.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise Mamba2Error(f"gemv: shapes {list(x.shape)} and {list(weight.shape)} do not multiply")
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS or M < 1:
        raise Mamba2Error(f"gemv: {M} rows; use a matmul above {MAX_ROWS}")
    if weight.stride(1) != 1:
        raise Mamba2Error("gemv: weight rows must be contiguous")
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        raise Mamba2Error(f"gemv: bias of shape {list(bias.shape)} for {N} outputs")
    cfg = config or config_for(M)
    if config is None and M > 1 and K in MULTI_BY_K:
        cfg = MULTI_BY_K[K]
    if config is None and cfg.kind == "row" and K in ROW_BY_K:
        bn, warps, evict = ROW_BY_K[K]
        cfg = cfg.with_(block_n=bn, num_warps=warps, evict_first=evict)
    block_m = 1 << (M - 1).bit_length()
    block_n, block_k = cfg.block_n, min(cfg.block_k, triton.next_power_of_2(K))
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    args = (x, weight, bias if bias is not None else y, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0))
    common = dict(HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k)
    evict = "evict_first" if cfg.evict_first else ""
    grid = (triton.cdiv(N, block_n),)
    if cfg.kind == "reduce":
        _gemv_kernel[grid](*args, BLOCK_M=block_m, **common, **_launch_opts(cfg.with_(pdl=False), x.device))
    elif cfg.kind == "acc":
        pdl = _pdl(cfg, x.device)
        _gemv_acc_kernel[grid](*args, BLOCK_M=block_m, **common, EVICT=evict, PREFETCH=cfg.prefetch or pdl, PDL=pdl,
                               **_launch_opts(cfg, x.device))
    elif cfg.kind == "row" and M == 1 and K <= ROW_MAX_K:
        _gemv_row_kernel[grid](x, weight, bias if bias is not None else y, y, N, K, weight.stride(0),
                               HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(K), EVICT=evict,
                               PDL=_pdl(cfg, x.device), **_launch_opts(cfg, x.device))
    elif cfg.kind == "row":  # more rows or longer ones: the acc kernel, in tiles of 1024
        return gemv(x, weight, bias, cfg.with_(kind="acc", block_k=1024))
    elif cfg.kind in ("dot", "dotp"):
        if weight.dtype != x.dtype:
            raise Mamba2Error(f"gemv: dot kernel needs one dtype, got {x.dtype} and {weight.dtype}")
        stages = dot_stages(cfg, block_n, block_k, max(16, block_m), x.element_size())
        dot_opts = dict(BLOCK_M=max(16, block_m), **common, EVICT=evict,
                        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                        **_launch_opts(cfg.with_(pdl=cfg.kind == "dot" and cfg.pdl, num_stages=stages), x.device))
        tma = cfg.tma and _tma_ok(x, weight)
        if tma:
            args = (TensorDescriptor.from_tensor(x, [dot_opts["BLOCK_M"], block_k]),
                    TensorDescriptor.from_tensor(weight, [block_n, block_k]), *args[2:])
        if cfg.kind == "dot":
            pdl = _pdl(cfg, x.device)
            # The bulk prefetch is sm_90's, as TMA is; a multiple of 16 bytes within the row.
            pf = min(cfg.prefetch_l2, K * weight.element_size()) // 16 * 16 if pdl and tma else 0
            _gemv_dot_kernel[grid](*args, weight, x, **dot_opts, TMA=tma, PDL=pdl, PREFETCH_L2=pf,
                                   EARLY_TILE=cfg.early_tile)
        else:
            nprog = min(grid[0], max(1, cfg.per_sm) * sm_count(x.device))
            part, count = _dotp_scratch(x.device, nprog, block_n * max(16, block_m))
            _gemv_dotp_kernel[(nprog,)](*args[:4], part, count, *args[4:], **dot_opts, TMA=tma)
    else:
        raise Mamba2Error(f"gemv: unknown kernel kind {cfg.kind!r}")
    return y


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              weight: torch.Tensor, bias: torch.Tensor | None = None, residual_in_fp32: bool = True,
              config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One row: (linear(RMSNorm(residual + x) * norm_weight, weight, bias), residual + x) in one launch.

    Same results as `add_rmsnorm` followed by `gemv` (with `config.one_pass` the normed row is
    not rounded to x.dtype before the product). x and residual are [1, K] (or [K]); the
    residual returned is a new tensor, fp32 when residual is fp32 or residual_in_fp32 with
    no residual (the first layer), as add_rmsnorm returns it.
    """
    op = "norm_gemv"
    K = x.shape[-1]
    if x.numel() != K or weight.dim() != 2 or weight.shape[1] != K:
        raise Mamba2Error(f"{op}: one row of {K} against weight {list(weight.shape)}")
    if norm_weight.shape != (K,):
        raise Mamba2Error(f"{op}: norm weight must be [{K}], got {list(norm_weight.shape)}")
    if residual is not None and residual.numel() != K:
        raise Mamba2Error(f"{op}: residual of shape {list(residual.shape)} for a row of {K}")
    N = weight.shape[0]
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        raise Mamba2Error(f"{op}: bias of shape {list(bias.shape)} for {N} outputs")
    if weight.stride(1) != 1:
        raise Mamba2Error(f"{op}: weight rows must be contiguous")
    if residual is not None:
        res_dtype = torch.promote_types(residual.dtype, x.dtype)
    else:
        res_dtype = torch.float32 if residual_in_fp32 else x.dtype
    x1 = x.reshape(K).contiguous()
    r1 = residual.reshape(K).contiguous() if residual is not None else x1
    write_res = residual is not None or res_dtype != x.dtype
    res_out = torch.empty(x.shape, dtype=res_dtype, device=x.device) if write_res else x
    cfg = config or NORM_GEMV_CONFIG
    block_n, block_k = cfg.block_n, min(cfg.block_k, triton.next_power_of_2(K))
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    pdl = _pdl(cfg, x.device)
    _norm_gemv_kernel[(triton.cdiv(N, block_n),)](
        x1, r1, norm_weight, weight, bias if bias is not None else y, y, res_out, N, K, float(eps), weight.stride(0),
        HAS_RES=residual is not None, WRITE_RES=write_res, HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0,
        BLOCK_N=block_n, BLOCK_K=block_k, EVICT="evict_first" if cfg.evict_first else "",
        ONE_PASS=bool(cfg.one_pass), PREFETCH=bool(cfg.prefetch) or pdl, PDL=pdl, **_launch_opts(cfg, x.device),
    )
    return y, res_out


# Rows up to which `linear` takes the kernel; more rows go to cuBLAS. Measured on the H200
# (benchmarks/NOTES.md, session 2): the 129 matvecs of a Codestral decode step take 3.63 ms at
# 1 row (cuBLAS 4.13) and 4.02 ms at 8 rows (cuBLAS 4.27).
KERNEL_ROWS = 8


def _kernel_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return weight.stride(-1) == 1 and (x.is_cuda or _interpreting())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the matvec kernel for the few-row products of decode (up to KERNEL_ROWS)."""
    rows = x.numel() // x.shape[-1]
    if rows > KERNEL_ROWS or rows == 0 or not _kernel_ok(x, weight):
        return F.linear(x, weight, bias)
    return gemv(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def norm_linear(x, residual, norm_weight, eps, residual_in_fp32, weight, bias=None):
    """(linear(add_rmsnorm(x, residual, norm_weight, eps)[0], weight, bias), new residual).

    One fused launch for a single row when FUSE_NORM is set; otherwise the two operations.
    """
    rows = x.numel() // x.shape[-1]
    if FUSE_NORM and rows == 1 and _kernel_ok(x, weight) and x.dtype == weight.dtype:
        return norm_gemv(x, residual, norm_weight, eps, weight, bias, residual_in_fp32)
    normed, residual = add_rmsnorm(x, residual, norm_weight, eps, residual_in_fp32)
    return linear(normed, weight, bias), residual
