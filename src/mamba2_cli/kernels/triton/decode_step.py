"""Triton decode step: one token through the mixer between in_proj and out_proj.

`mixer_decode_step` runs one program per (sequence, head, block of P rows):

1. depthwise conv over the window [conv_state, new input] + bias + SiLU for the program's
   x channels and for its group's B and C channels (cheap, so every head of a group
   recomputes B and C rather than waiting for one another);
2. dt = clamp(softplus(dt + dt_bias)); S = exp(dt A) S + dt x B^T in place (fp32);
   y = S C + D x;
3. the gated per-group RMSNorm. A group spans many programs, so each program leaves its
   gated y (fp32) and its sum of squares in a scratch buffer and bumps the group's
   arrival counter; the program that arrives last normalizes the whole group, writes the
   output, shifts the group's B and C conv windows (every program of the group has read
   them by then) and resets the counter for the next call. Partial sums are added in a
   fixed order, so the result does not depend on which program comes last.

That is the fused form, one launch. The defaults (STEP_CONFIG, STEP_BATCH_CONFIG) run the norm
as a second kernel instead, one program per (sequence, group), after every head's program has
written its part (`split`), both launched with programmatic dependent launch (`pdl`): the
norm kernel is resident before the first kernel ends, the step's programs load their state
and weights while in_proj finishes (the state only when the caller says no kernel just before
wrote it: `state_settled`, which decode passes), and out_proj's programs load their weight rows
while the norm runs. From 8 rows a first small kernel also convolves each group's B and C once
and shifts their windows (`bc_pre`), launched under PDL as well (`bc_pdl`), so the step's
programs still load their state in in_proj's tail. The results do not depend on the form.

The state slice of a program is read and written by the same threads in one tile, so the
in-place update has no hazard; the kernel is never autotuned (a tuning run would apply
the update several times). Scratch buffers are allocated once per shape and reused, so
the step can be captured in a CUDA graph after one warm-up call. Calls that share a
scratch buffer must not run concurrently on different streams.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import Mamba2Error
from .conv import conv_taps, conv_taps4_post, conv_taps4_pre, conv_window, shift_in
from .pdl import gdc_launch_dependents, gdc_wait, usable
from .ssd import softplus_clamp

# Fixed launch configuration, measured on an H200 (benchmarks/NOTES.md): BLOCK_P splits a
# head's P rows over programs, so batch 1 still has 512 programs in flight; 2 warps keep
# the registers per program low enough for many programs per SM at large batch.
STEP_CONFIG = {"BLOCK_P": 16, "num_warps": 4}  # round 5: 8.83 us per layer in a graph (w2: 9.39)
# "split" runs the gated norm as a second kernel (one program per (sequence, group), no arrival
# counter, "tail_warps" warps) instead of in the group's last program; "pdl" launches the step
# (and the norm kernel) with programmatic dependent launch (CUDA only). Off in sessions 2-9 at
# batch 1 (the fused step under PDL is slower: 8.97 against 8.34 µs per layer). Session 10,
# rounds 46-49 (H200, medians of 3, alternated): split + pdl with the norm kernel at 8 warps,
# per layer in graphs of 64 layers as `mamba2 bench` times it, 6.39 µs against 8.38 for the
# fused step (7.03 with the state loaded after the wait); Codestral batch-1 decode, with
# add_rmsnorm and the matvecs also under PDL, 250.5 against 238.3 tok/s (247.2 with the state
# loaded after the wait).
STEP_CONFIG.update({"split": True, "pdl": True, "tail_warps": 8})
# "bc_pre": a first small kernel convolves each group's B and C once (one program per sequence
# and group) instead of every head's programs recomputing them: one launch more, less work.
# At batch 1 under split + pdl: 8.86 against 7.39 µs per layer (round 47).
STEP_CONFIG["bc_pre"] = False
# "bc_pdl": bc_pre's kernel launched with PDL too (under "pdl"), so the step's kernel after it
# launches while in_proj still runs and its programs load their settled state in in_proj's
# tail; otherwise bc_pre is a plain launch, and the step's kernel launches once in_proj is done.
# H200, session 13, round 63 (bit-identical): Codestral batch-8 decode graph replays 5742.5 µs
# per step against 5810.6 and 5818.0 plain (medians of 9, alternated); the step per layer in
# graphs of 64 layers 25.48 against 25.64-25.66 µs.
STEP_CONFIG["bc_pdl"] = True
# "evict": the state's loads and stores marked evict_first (each layer's state is touched once
# per token). Measured slower at every batch (session 5, round 17: b1 9.53 against 8.83 us per
# layer, b64 82.8 % of copy against 84.4 %), so off.
STEP_CONFIG["evict"] = False
# early: z and the norm weights loaded with the state, the B/C windows and y first in the
# group's finish, the windows first in bc_pre's kernel (the kernels' EARLY); off: the round-5
# order. Same results. H200, session 6, round 22 at 11d2a47, per layer in graphs as
# `mamba2 bench` times them: b1 8.37 against 9.22 µs, b8 26.78 against 27.71, b64 85.2 % of
# copy against 84.5 %; Codestral decode b1 226.5 against 222.6 tok/s (medians of 3, alternated).
STEP_CONFIG["early"] = True
# maxnreg: a cap on the step kernel's registers per thread (CUDA; None: the compiler's
# choice, 126 at batch 1's p16 w4 on sm_90, so its 512 programs fill every SM's register file
# and out_proj, launched early under PDL, cannot make programs resident until they end).
# H200, session 11, round 53 (alternated, medians): the step per layer 8.12 / 7.16 / 6.31 µs
# at 64 / 80 / 96 against 6.31; Codestral batch-1 decode 217.1 / 228.1 / 233.7 against 242.4
# tok/s. out_proj's programs loading beside the step slow decode, so no cap.
STEP_CONFIG["maxnreg"] = None
# conv_early: under PDL with a settled state, the conv's state inputs and taps (and dt_bias)
# are loaded before the wait for in_proj as well (the kernel's CONV_EARLY); same bits ("always":
# without PDL too, where it only moves those loads first; the CPU tests take that form).
# H200, session 11, round 55 (graphs of 64 layers, medians of 5, alternated): b1 5.98 µs per
# layer against 6.31, b2 10.47 against 11.48; the fused step at b4 (no PDL) 16.65 against 16.26.
STEP_CONFIG["conv_early"] = True
# Overrides by batch size: (smallest batch, keys of STEP_CONFIG), applied in order. Measured
# on the H200 in graphs of 64 Codestral layers (benchmarks/NOTES.md, session 3, round 8):
# from 2 rows one program per head (b2 11.75 us per layer against 13.04, b4 16.19 against
# 19.45); from 8 rows B and C convolved first, one warp per 32 rows of a head and the norm as
# a second kernel (b8 27.8 us against 32.1; b64 149.6 us = 85.6 % of copy against 61.3 %,
# 155 us without the split; Codestral batch-8 decode 158.2 against 154.4 tok/s per sequence).
# From 8 rows the step and the norm are also launched with PDL, the norm at 8 warps (session 9,
# rounds 39-43, medians of 3, alternated): per layer in graphs 25.75 µs against 26.77 without
# PDL, 25.63 with the norm at 8 warps; Codestral batch-8 decode with the TMA matvec 167.7
# against 166.1 tok/s per sequence without PDL, and 166.9 against 166.4 for the 8 warps.
# Session 10, round 49: split + pdl at 2 rows 11.36 µs against 12.09 for the fused step; at 4
# rows 16.70 against 16.36, so 4-7 rows keep the fused step without PDL.
STEP_BATCH_CONFIG: list[tuple[int, dict]] = [
    (2, {"BLOCK_P": 64, "num_warps": 2}),
    (4, {"split": False, "pdl": False, "tail_warps": 4}),
    (8, {"bc_pre": True, "BLOCK_P": 32, "num_warps": 1, "split": True, "pdl": True, "tail_warps": 8}),
]

_scratch: dict = {}


@triton.jit
def _state_update(state_ptrs, s_mask, x, dt, A, Bv, Cv, Dv):
    """S = exp(dt A) S + dt x B^T (stored in place); returns y = S C + D x (fp32)."""
    state = tl.load(state_ptrs, mask=s_mask, other=0.0)
    state = state * tl.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_ptrs, state, mask=s_mask)
    return tl.sum(state * Cv[None, :], axis=1) + Dv * x


@triton.jit
def _ssd_step_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, state_ptr, y_ptr,
    H, P, N, heads_per_group, dt_lo, dt_hi,
    stride_x_b, stride_x_h, stride_dt_b, stride_B_b, stride_B_g, stride_C_b, stride_C_g,
    stride_D_h, stride_D_p, stride_s_b, stride_s_h, stride_s_p, stride_y_b, stride_y_h,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DT_CLAMP: tl.constexpr,
):
    pid = tl.program_id(0)
    npb = tl.cdiv(P, BLOCK_P)
    pb = pid % npb
    h = (pid // npb) % H
    bi = (pid // (npb * H)).to(tl.int64)
    g = h // heads_per_group
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < P
    nmask = offs_n < N
    s_mask = pmask[:, None] & nmask[None, :]
    state_ptrs = state_ptr + bi * stride_s_b + h * stride_s_h + offs_p[:, None] * stride_s_p + offs_n[None, :]

    x = tl.load(x_ptr + bi * stride_x_b + h * stride_x_h + offs_p, mask=pmask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + bi * stride_dt_b + h).to(tl.float32) + tl.load(dt_bias_ptr + h).to(tl.float32)
    dt = softplus_clamp(dt, dt_lo, dt_hi, DT_CLAMP)
    A = tl.load(A_ptr + h).to(tl.float32)
    Bv = tl.load(B_ptr + bi * stride_B_b + g * stride_B_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + bi * stride_C_b + g * stride_C_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + h * stride_D_h + offs_p * stride_D_p, mask=pmask, other=0.0).to(tl.float32)
    y = _state_update(state_ptrs, s_mask, x, dt, A, Bv, Cv, Dv)
    tl.store(y_ptr + bi * stride_y_b + h * stride_y_h + offs_p, y.to(y_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _group_finish(zx, xbc, cs, ybuf_ptr, ssbuf_ptr, out_ptr, bi64, g, ch_g, gsmask, norm_w, nss, GS, G, N,
                  d_inner, eps, stride_cs_c, stride_out_b, K: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_SS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                  BARRIER: tl.constexpr, SHIFT_BC: tl.constexpr = True, EARLY: tl.constexpr = False):
    """Normalize group g from the scratch buffers, write it, shift the group's B and C windows
    (unless SHIFT_BC is off: `_bc_conv_kernel` did). EARLY: the windows are loaded first, so
    their loads do not wait behind the output's store, and y with the sums of squares."""
    if SHIFT_BC and EARLY:
        win_B, win_C = _bc_windows(xbc, cs, g, G, N, d_inner, stride_cs_c, K, BLOCK_N, BLOCK_K)
    offs_ss = tl.arange(0, BLOCK_SS)
    ss = tl.load(ssbuf_ptr + bi64 * (G * nss) + g * nss + offs_ss, mask=offs_ss < nss, other=0.0,
                 cache_modifier=".cg")
    if EARLY:  # before the sum's barrier, not after it
        yg = tl.load(ybuf_ptr + bi64 * d_inner + ch_g, mask=gsmask, other=0.0, cache_modifier=".cg")
    rstd = tl.math.rsqrt(tl.sum(ss, axis=0) / GS + eps)
    if not EARLY:
        yg = tl.load(ybuf_ptr + bi64 * d_inner + ch_g, mask=gsmask, other=0.0, cache_modifier=".cg")
    o = yg * rstd * norm_w
    if NORM_BEFORE_GATE:
        zg = tl.load(zx + ch_g, mask=gsmask, other=0.0).to(tl.float32)
        o = o * (zg * tl.sigmoid(zg))
    tl.store(out_ptr + bi64 * stride_out_b + ch_g, o.to(out_ptr.dtype.element_ty), mask=gsmask)
    if SHIFT_BC:
        if EARLY:
            _bc_shift_in(cs, win_B, win_C, g, G, N, d_inner, stride_cs_c, K, BLOCK_N, BLOCK_K, BARRIER)
        else:
            _shift_bc(xbc, cs, g, G, N, d_inner, stride_cs_c, K, BLOCK_N, BLOCK_K, BARRIER)


@triton.jit
def _bc_windows(xbc, cs, g, G, N, d_inner, stride_cs_c, K: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Group g's B and C conv windows [BLOCK_N, BLOCK_K]: the conv state, then the new input."""
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    win_B = conv_window(xbc, cs, d_inner + g * N + offs_n, nmask, offs_k, stride_cs_c, K)
    win_C = conv_window(xbc, cs, d_inner + G * N + g * N + offs_n, nmask, offs_k, stride_cs_c, K)
    return win_B, win_C


@triton.jit
def _bc_shift_in(cs, win_B, win_C, g, G, N, d_inner, stride_cs_c, K: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BARRIER: tl.constexpr):
    """Group g's B and C conv states <- their windows without the oldest input."""
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    if BARRIER:
        tl.debug_barrier()  # every thread has read the windows before any shifts them
    shift_in(cs, win_B, d_inner + g * N + offs_n, nmask, offs_k, stride_cs_c, K)
    shift_in(cs, win_C, d_inner + G * N + g * N + offs_n, nmask, offs_k, stride_cs_c, K)


@triton.jit
def _shift_bc(xbc, cs, g, G, N, d_inner, stride_cs_c, K: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, BARRIER: tl.constexpr):
    """Shift group g's B and C conv windows by the new input (once every reader is done)."""
    win_B, win_C = _bc_windows(xbc, cs, g, G, N, d_inner, stride_cs_c, K, BLOCK_N, BLOCK_K)
    _bc_shift_in(cs, win_B, win_C, g, G, N, d_inner, stride_cs_c, K, BLOCK_N, BLOCK_K, BARRIER)


@triton.jit
def _bc_conv_kernel(
    zx_ptr, conv_w_ptr, conv_b_ptr, conv_state_ptr, bc_ptr, G, N, d_inner,
    stride_zx_b, stride_cw_c, stride_cs_b, stride_cs_c,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
    EARLY: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """BC_PRE's first kernel, one program per (sequence, group): the conv + SiLU of the group's
    B and C channels into bc [b, 2, G, N] (fp32), then the shift of their windows, so the
    step's programs load B and C instead of each recomputing them. EARLY: the windows are
    loaded before bc is stored (a load after a store waits for the work before it). PDL: the
    step's kernel may launch at once (its programs then load their state while in_proj ends);
    this one waits for in_proj before anything else."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    g = tl.program_id(0) % G
    bi64 = (tl.program_id(0) // G).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    xbc = zx_ptr + bi64 * stride_zx_b + d_inner
    cs = conv_state_ptr + bi64 * stride_cs_b
    ch_B = d_inner + g * N + offs_n
    ch_C = d_inner + G * N + g * N + offs_n
    Bv = conv_taps(xbc, cs, conv_w_ptr, conv_b_ptr, ch_B, nmask, stride_cs_c, stride_cw_c, K, HAS_CONV_BIAS)
    Cv = conv_taps(xbc, cs, conv_w_ptr, conv_b_ptr, ch_C, nmask, stride_cs_c, stride_cw_c, K, HAS_CONV_BIAS)
    if EARLY:
        win_B, win_C = _bc_windows(xbc, cs, g, G, N, d_inner, stride_cs_c, K, BLOCK_N, BLOCK_K)
    out = bc_ptr + bi64 * (2 * G * N) + g * N + offs_n
    tl.store(out, Bv, mask=nmask)
    tl.store(out + G * N, Cv, mask=nmask)
    if EARLY:
        _bc_shift_in(cs, win_B, win_C, g, G, N, d_inner, stride_cs_c, K, BLOCK_N, BLOCK_K, True)
    else:
        _shift_bc(xbc, cs, g, G, N, d_inner, stride_cs_c, K, BLOCK_N, BLOCK_K, True)


@triton.jit
def _group_norm_kernel(
    zx_ptr, conv_state_ptr, norm_w_ptr, out_ptr, ybuf_ptr, ssbuf_ptr,
    G, N, GS, nss, d_inner, eps, stride_zx_b, stride_cs_b, stride_cs_c, stride_out_b,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_GS: tl.constexpr,
    BLOCK_SS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, PDL: tl.constexpr, SHIFT_BC: tl.constexpr,
    EARLY: tl.constexpr = False,
):
    """The split step's second kernel: one program per (sequence, group)."""
    g = tl.program_id(0) % G
    bi64 = (tl.program_id(0) // G).to(tl.int64)
    offs_gs = tl.arange(0, BLOCK_GS)
    gsmask = offs_gs < GS
    ch_g = g * GS + offs_gs
    norm_w = tl.load(norm_w_ptr + ch_g, mask=gsmask, other=0.0).to(tl.float32)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    zx = zx_ptr + bi64 * stride_zx_b
    _group_finish(zx, zx + d_inner, conv_state_ptr + bi64 * stride_cs_b, ybuf_ptr, ssbuf_ptr, out_ptr, bi64, g,
                  ch_g, gsmask, norm_w, nss, GS, G, N, d_inner, eps, stride_cs_c, stride_out_b,
                  K, BLOCK_N, BLOCK_K, BLOCK_SS, NORM_BEFORE_GATE, True, SHIFT_BC, EARLY)


@triton.jit
def _mixer_step_kernel(
    zx_ptr, conv_w_ptr, conv_b_ptr, conv_state_ptr, A_ptr, D_ptr, dt_bias_ptr, norm_w_ptr,
    ssm_ptr, out_ptr, ybuf_ptr, ssbuf_ptr, count_ptr, bc_ptr,
    H, P, N, G, heads_per_group, d_inner, eps, dt_lo, dt_hi,
    stride_zx_b, stride_cw_c, stride_cs_b, stride_cs_c, stride_D_h, stride_D_p,
    stride_s_b, stride_s_h, stride_s_p, stride_out_b,
    K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_GS: tl.constexpr, BLOCK_SS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr, DT_CLAMP: tl.constexpr,
    TAIL: tl.constexpr = True, PDL: tl.constexpr = False, BC_PRE: tl.constexpr = False,
    EVICT_STATE: tl.constexpr = "", EARLY: tl.constexpr = False, PDL_STATE: tl.constexpr = False,
    CONV_EARLY: tl.constexpr = False,
):
    """TAIL: the group's last program normalizes it (else `_group_norm_kernel` does, after).
    PDL: launched early; D and A (and with PDL_STATE the state slice) are loaded before the
    wait for in_proj, everything else after it.
    BC_PRE: B and C come convolved from `_bc_conv_kernel` (which also shifted their windows).
    EARLY: z and the norm weights are loaded with the state, not after the reductions (which
    the compiler does not move loads across) and the scratch stores (which it does not move
    loads above); each of those was one more trip to memory on the program's path.
    CONV_EARLY (a settled state, width 4, not BC_PRE): the conv state's inputs, the taps, the
    conv bias and dt_bias are loaded first as well (under PDL_STATE, before the wait), and only
    in_proj's output after; the same sums in the same order."""
    pid = tl.program_id(0)
    if PDL:
        gdc_launch_dependents()
    npb = tl.cdiv(P, BLOCK_P)
    pb = pid % npb
    h = (pid // npb) % H
    bi64 = (pid // (npb * H)).to(tl.int64)
    g = h // heads_per_group
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    pmask = offs_p < P
    nmask = offs_n < N
    s_mask = pmask[:, None] & nmask[None, :]

    # Issue the big load (the state slice) first so its latency overlaps the conv.
    state_ptrs = ssm_ptr + bi64 * stride_s_b + h * stride_s_h + offs_p[:, None] * stride_s_p + offs_n[None, :]
    if PDL and not PDL_STATE:
        gdc_wait()
    state = tl.load(state_ptrs, mask=s_mask, other=0.0, eviction_policy=EVICT_STATE)
    if PDL:
        # The weights do not depend on in_proj, which may still be running. Nor does the state,
        # but a kernel launched just before this one may have written it, unflushed: PDL_STATE
        # only where the caller knows that none did (`state_settled`).
        Dv = tl.load(D_ptr + h * stride_D_h + offs_p * stride_D_p, mask=pmask, other=0.0).to(tl.float32)
        A = tl.load(A_ptr + h).to(tl.float32)

    zx = zx_ptr + bi64 * stride_zx_b
    xbc = zx + d_inner  # the conv input starts after z
    cs = conv_state_ptr + bi64 * stride_cs_b
    ch_x = h * P + offs_p
    ch_B = d_inner + g * N + offs_n
    ch_C = d_inner + G * N + g * N + offs_n
    if CONV_EARLY:
        # The conv state is as settled as the SSM state (only this layer's step writes it).
        xo0, xo1, xo2, xw0, xw1, xw2, xw3, xb = conv_taps4_pre(cs, conv_w_ptr, conv_b_ptr, ch_x, pmask, stride_cs_c,
                                                               stride_cw_c, HAS_CONV_BIAS)
        bo0, bo1, bo2, bw0, bw1, bw2, bw3, bb = conv_taps4_pre(cs, conv_w_ptr, conv_b_ptr, ch_B, nmask, stride_cs_c,
                                                               stride_cw_c, HAS_CONV_BIAS)
        co0, co1, co2, cw0, cw1, cw2, cw3, cbb = conv_taps4_pre(cs, conv_w_ptr, conv_b_ptr, ch_C, nmask, stride_cs_c,
                                                                stride_cw_c, HAS_CONV_BIAS)
        dt_b = tl.load(dt_bias_ptr + h).to(tl.float32)
    if PDL and PDL_STATE:
        gdc_wait()
    GS = heads_per_group * P
    offs_gs = tl.arange(0, BLOCK_GS)
    gsmask = offs_gs < GS
    ch_g = g * GS + offs_gs
    if EARLY:
        if not NORM_BEFORE_GATE:
            z_early = tl.load(zx + ch_x, mask=pmask, other=0.0).to(tl.float32)
        if TAIL:
            norm_w = tl.load(norm_w_ptr + ch_g, mask=gsmask, other=0.0).to(tl.float32)
    if CONV_EARLY:
        x = conv_taps4_post(xbc, cs, ch_x, pmask, xo0, xo1, xo2, xw0, xw1, xw2, xw3, xb, HAS_CONV_BIAS)
        Bv = conv_taps4_post(xbc, cs, ch_B, nmask, bo0, bo1, bo2, bw0, bw1, bw2, bw3, bb, HAS_CONV_BIAS)
        Cv = conv_taps4_post(xbc, cs, ch_C, nmask, co0, co1, co2, cw0, cw1, cw2, cw3, cbb, HAS_CONV_BIAS)
    else:
        x = conv_taps(xbc, cs, conv_w_ptr, conv_b_ptr, ch_x, pmask, stride_cs_c, stride_cw_c, K, HAS_CONV_BIAS)
        if BC_PRE:
            bc = bc_ptr + bi64 * (2 * G * N) + g * N + offs_n
            Bv = tl.load(bc, mask=nmask, other=0.0)
            Cv = tl.load(bc + G * N, mask=nmask, other=0.0)
        else:
            Bv = conv_taps(xbc, cs, conv_w_ptr, conv_b_ptr, ch_B, nmask, stride_cs_c, stride_cw_c, K, HAS_CONV_BIAS)
            Cv = conv_taps(xbc, cs, conv_w_ptr, conv_b_ptr, ch_C, nmask, stride_cs_c, stride_cw_c, K, HAS_CONV_BIAS)
        dt_b = tl.load(dt_bias_ptr + h).to(tl.float32)
    win_x = conv_window(xbc, cs, ch_x, pmask, offs_k, stride_cs_c, K)

    conv_dim = d_inner + 2 * G * N
    dt = tl.load(xbc + conv_dim + h).to(tl.float32) + dt_b
    dt = softplus_clamp(dt, dt_lo, dt_hi, DT_CLAMP)
    if not PDL:
        A = tl.load(A_ptr + h).to(tl.float32)
        Dv = tl.load(D_ptr + h * stride_D_h + offs_p * stride_D_p, mask=pmask, other=0.0).to(tl.float32)

    state = state * tl.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
    y = tl.sum(state * Cv[None, :], axis=1) + Dv * x
    # y passes through the model dtype, as the unfused path (and prefill) would store it.
    y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
    if NORM_BEFORE_GATE:
        yv = y
    else:
        if EARLY:
            z = z_early
        else:
            z = tl.load(zx + ch_x, mask=pmask, other=0.0).to(tl.float32)
        yv = y * (z * tl.sigmoid(z))
    yv = tl.where(pmask, yv, 0.0)
    tl.store(ybuf_ptr + bi64 * d_inner + ch_x, yv, mask=pmask)
    nss = heads_per_group * npb
    slot = g * nss + (h % heads_per_group) * npb + pb
    tl.store(ssbuf_ptr + bi64 * (G * nss) + slot, tl.sum(yv * yv, axis=0))

    if not TAIL:
        # The norm is the next kernel's: this program's state and x windows are all it writes.
        tl.store(state_ptrs, state, mask=s_mask, eviction_policy=EVICT_STATE)
        shift_in(cs, win_x, ch_x, pmask, offs_k, stride_cs_c, K)
    else:
        # What the group's last program needs and can fetch now, before the wait.
        if not EARLY:
            norm_w = tl.load(norm_w_ptr + ch_g, mask=gsmask, other=0.0).to(tl.float32)

        # Arrive at the group's counter. The barrier puts every thread's scratch writes (and
        # conv-state reads) before the release; acq_rel then makes the other programs'
        # writes visible to the last arrival. The state is stored after the arrival, so the
        # release does not wait for those 32 KB of stores.
        tl.debug_barrier()
        count_ptrs = count_ptr + bi64 * G + g
        arrived = tl.atomic_add(count_ptrs, 1, sem="acq_rel")
        tl.store(state_ptrs, state, mask=s_mask, eviction_policy=EVICT_STATE)
        shift_in(cs, win_x, ch_x, pmask, offs_k, stride_cs_c, K)
        if arrived == nss - 1:
            _group_finish(zx, xbc, cs, ybuf_ptr, ssbuf_ptr, out_ptr, bi64, g, ch_g, gsmask, norm_w, nss, GS, G, N,
                          d_inner, eps, stride_cs_c, stride_out_b, K, BLOCK_N, BLOCK_K, BLOCK_SS, NORM_BEFORE_GATE,
                          False, not BC_PRE, EARLY)
            tl.atomic_xchg(count_ptrs, 0, sem="relaxed")


def _check(cond: bool, op: str, msg) -> None:
    """Raise a Mamba2Error when cond is false; msg may be a callable, formatted only then."""
    if not cond:
        raise Mamba2Error(f"{op}: {msg() if callable(msg) else msg}")


def _D_2d(D: torch.Tensor, H: int, P: int) -> torch.Tensor:
    D = D.float()
    return D if D.dim() == 2 else D[:, None].expand(H, P)


def _dt_limit_args(dt_limit) -> tuple[float, float, bool]:
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    clamp = lo > 0.0 or hi != float("inf")
    return lo, (hi if hi != float("inf") else 3.0e38), clamp


def _check_state(op: str, ssm_state: torch.Tensor, shape: tuple) -> None:
    _check(ssm_state.dtype == torch.float32, op, lambda: f"ssm_state must be fp32, got {ssm_state.dtype}")
    _check(tuple(ssm_state.shape) == shape, op, lambda: f"ssm_state must be {shape}, got {tuple(ssm_state.shape)}")
    _check(ssm_state.stride(-1) == 1, op, "ssm_state must be contiguous in its last dim (it is updated in place)")


def ssd_decode_step(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_state, *, block_p=None, num_warps=4):
    """One token; same contract as `torch_ref.ssd_decode_step` (ssm_state updated in place).
    block_p (default min(64, P)) and num_warps lay out the launch (benchmarks time them)."""
    op = "ssd_decode_step"
    _check(x.dim() == 3, op, lambda: f"x must be [b, H, P], got {tuple(x.shape)}")
    b, H, P = x.shape
    _check(B.dim() == 3 and B.shape == C.shape and B.shape[0] == b,
           op, lambda: f"B and C must be [b, G, N], got {tuple(B.shape)} and {tuple(C.shape)}")
    G, N = B.shape[1:]
    _check(H % G == 0, op, lambda: f"ngroups {G} must divide nheads {H}")
    _check(dt.shape == (b, H), op, lambda: f"dt must be [b, H] = {(b, H)}, got {tuple(dt.shape)}")
    _check(D.shape in ((H,), (H, P)), op, lambda: f"D must be [H] or [H, P], got {tuple(D.shape)}")
    _check_state(op, ssm_state, (b, H, P, N))
    x, B, C, dt = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, B, C, dt))
    D2 = _D_2d(D, H, P)
    A = A.float().contiguous()
    dt_bias = dt_bias.float().contiguous()
    lo, hi, clamp = _dt_limit_args(dt_limit)
    y = torch.empty((b, H, P), dtype=x.dtype, device=x.device)
    BLOCK_P = min(block_p or 64, triton.next_power_of_2(P))
    npb = triton.cdiv(P, BLOCK_P)
    _ssd_step_kernel[(b * H * npb,)](
        x, dt, A, B, C, D2, dt_bias, ssm_state, y, H, P, N, H // G, lo, hi,
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        D2.stride(0), D2.stride(1), ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_P=BLOCK_P, BLOCK_N=triton.next_power_of_2(N), DT_CLAMP=clamp, num_warps=num_warps,
    )
    return y


def _scratch_for(device, b: int, d_inner: int, nslots: int, G: int):
    key = (str(device), b, d_inner, nslots, G)
    buf = _scratch.get(key)
    if buf is None:
        buf = (
            torch.empty((b, d_inner), dtype=torch.float32, device=device),
            torch.empty((b, nslots), dtype=torch.float32, device=device),
            torch.zeros((b, G), dtype=torch.int32, device=device),
        )
        _scratch[key] = buf
    return buf


def mixer_decode_step(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit,
                      norm_weight, ssm_state, ngroups, eps, norm_before_gate=False, *, state_settled=False,
                      block_p=None, config=None):
    """One decode token of the mixer; same contract as `torch_ref.mixer_decode_step`.

    zxbcdt [b, 2*d_inner + 2*G*N + H]; conv_state [b, conv_dim, K-1] and ssm_state
    [b, H, P, N] (fp32) are updated in place. Returns the gated, normed y [b, d_inner].
    state_settled: no kernel launched just before this call wrote ssm_state, so under PDL
    the state is loaded before the wait for the kernel before. `config` (keys of
    STEP_CONFIG) overrides STEP_CONFIG for this call.
    """
    op = "mixer_decode_step"
    _check(ssm_state.dim() == 4, op, lambda: f"ssm_state must be [b, H, P, N], got {tuple(ssm_state.shape)}")
    b, H, P, N = ssm_state.shape
    G = int(ngroups)
    _check(G > 0 and H % G == 0, op, lambda: f"ngroups {G} must divide nheads {H}")
    d_inner = H * P
    conv_dim = d_inner + 2 * G * N
    _check(zxbcdt.dim() == 2 and zxbcdt.shape == (b, 2 * d_inner + 2 * G * N + H), op,
           lambda: f"zxbcdt must be [b, 2*d_inner + 2*G*N + H] = {(b, 2 * d_inner + 2 * G * N + H)}, "
           f"got {tuple(zxbcdt.shape)}")
    _check(zxbcdt.dtype in (torch.float16, torch.bfloat16, torch.float32), op,
           lambda: f"unsupported dtype {zxbcdt.dtype}")
    _check(conv_weight.dim() == 2 and conv_weight.shape[0] == conv_dim, op,
           lambda: f"conv_weight must be [conv_dim={conv_dim}, K], got {tuple(conv_weight.shape)}")
    K = conv_weight.shape[1]
    _check(K >= 2, op, lambda: f"conv width must be >= 2, got {K}")
    _check(conv_state.shape == (b, conv_dim, K - 1), op,
           lambda: f"conv_state must be [b, conv_dim, K-1] = {(b, conv_dim, K - 1)}, got {tuple(conv_state.shape)}")
    _check(conv_state.stride(-1) == 1, op, "conv_state must be contiguous in its last dim (updated in place)")
    _check(conv_bias is None or conv_bias.shape == (conv_dim,), op, lambda: f"conv_bias must be [{conv_dim}]")
    _check(norm_weight.shape == (d_inner,), op,
           lambda: f"norm_weight must be [{d_inner}], got {tuple(norm_weight.shape)}")
    _check(D.shape in ((H,), (H, P)), op, lambda: f"D must be [H] or [H, P], got {tuple(D.shape)}")
    _check(A.shape == (H,) and dt_bias.shape == (H,), op, "A and dt_bias must be [H]")
    _check_state(op, ssm_state, (b, H, P, N))
    tensors = (zxbcdt, conv_weight, conv_state, A, D, dt_bias, norm_weight, ssm_state)
    _check(all(t.device == ssm_state.device for t in tensors), op, "all tensors must be on one device")

    zxbcdt = zxbcdt if zxbcdt.stride(-1) == 1 else zxbcdt.contiguous()
    conv_weight = conv_weight if conv_weight.stride(-1) == 1 else conv_weight.contiguous()
    conv_bias_arg = conv_bias.contiguous() if conv_bias is not None else conv_weight
    D2 = _D_2d(D, H, P)
    A = A.float().contiguous()
    dt_bias = dt_bias.float().contiguous()
    norm_weight = norm_weight.contiguous()
    lo, hi, clamp = _dt_limit_args(dt_limit)

    cfg = dict(STEP_CONFIG)
    for min_batch, over in STEP_BATCH_CONFIG:
        if b >= min_batch:
            cfg.update(over)
    cfg.update(config or {})
    BLOCK_P = min(block_p or cfg["BLOCK_P"], triton.next_power_of_2(P))
    npb = triton.cdiv(P, BLOCK_P)
    hpg = H // G
    split = bool(cfg["split"])
    pdl = usable(cfg["pdl"], zxbcdt.device)
    launch = {"launch_pdl": True} if pdl else {}
    first_launch = dict(launch)
    if cfg.get("maxnreg") and zxbcdt.is_cuda:
        first_launch["maxnreg"] = int(cfg["maxnreg"])
    out = torch.empty((b, d_inner), dtype=zxbcdt.dtype, device=zxbcdt.device)
    ybuf, ssbuf, counts = _scratch_for(zxbcdt.device, b, d_inner, H * npb, G)
    bc_pre = bool(cfg["bc_pre"])
    bc = ybuf  # unused unless bc_pre
    if bc_pre:
        bc = _scratch_for(zxbcdt.device, b, 2 * G * N, 0, 0)[0]
        _bc_conv_kernel[(b * G,)](
            zxbcdt, conv_weight, conv_bias_arg, conv_state, bc, G, N, d_inner,
            zxbcdt.stride(0), conv_weight.stride(0), conv_state.stride(0), conv_state.stride(1),
            K=K, BLOCK_N=triton.next_power_of_2(N), BLOCK_K=triton.next_power_of_2(K),
            HAS_CONV_BIAS=conv_bias is not None, EARLY=bool(cfg["early"]), PDL=pdl and bool(cfg["bc_pdl"]),
            num_warps=4, **(launch if cfg["bc_pdl"] else {}),
        )
    _mixer_step_kernel[(b * H * npb,)](
        zxbcdt, conv_weight, conv_bias_arg, conv_state, A, D2, dt_bias, norm_weight,
        ssm_state, out, ybuf, ssbuf, counts, bc,
        H, P, N, G, hpg, d_inner, float(eps), lo, hi,
        zxbcdt.stride(0), conv_weight.stride(0), conv_state.stride(0), conv_state.stride(1),
        D2.stride(0), D2.stride(1),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), out.stride(0),
        K=K, BLOCK_P=BLOCK_P, BLOCK_N=triton.next_power_of_2(N), BLOCK_K=triton.next_power_of_2(K),
        BLOCK_GS=triton.next_power_of_2(hpg * P), BLOCK_SS=triton.next_power_of_2(hpg * npb),
        HAS_CONV_BIAS=conv_bias is not None, NORM_BEFORE_GATE=bool(norm_before_gate), DT_CLAMP=clamp,
        TAIL=not split, PDL=pdl, BC_PRE=bc_pre, EVICT_STATE="evict_first" if cfg["evict"] else "",
        EARLY=bool(cfg["early"]), PDL_STATE=bool(state_settled),
        CONV_EARLY=bool(cfg["conv_early"]) and (pdl or cfg["conv_early"] == "always") and bool(state_settled)
        and K == 4 and not bc_pre,
        num_warps=cfg["num_warps"], **first_launch,
    )
    if split:
        _group_norm_kernel[(b * G,)](
            zxbcdt, conv_state, norm_weight, out, ybuf, ssbuf,
            G, N, hpg * P, H * npb // G, d_inner, float(eps),
            zxbcdt.stride(0), conv_state.stride(0), conv_state.stride(1), out.stride(0),
            K=K, BLOCK_N=triton.next_power_of_2(N), BLOCK_K=triton.next_power_of_2(K),
            BLOCK_GS=triton.next_power_of_2(hpg * P), BLOCK_SS=triton.next_power_of_2(hpg * npb),
            NORM_BEFORE_GATE=bool(norm_before_gate), PDL=pdl, SHIFT_BC=not bc_pre, EARLY=bool(cfg["early"]),
            num_warps=cfg["tail_warps"],
            **launch,
        )
    return out

