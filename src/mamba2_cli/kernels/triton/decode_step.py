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

That is the fused form, one launch. The configurations (configs.DECODE_STEP, by batch size)
mostly run the norm as a second kernel instead, one program per (sequence, group), after
every head's program has written its part (`split`), both launched with programmatic
dependent launch (`pdl`): the norm kernel is resident before the first kernel ends, the
step's programs load their state and weights while in_proj finishes (the state only when
the caller says no kernel just before wrote it: `state_settled`, which decode passes), and
out_proj's programs load their weight rows while the norm runs. From batch 8 a first small
kernel also convolves each group's B and C once and shifts their windows (`bc_pre`),
launched under PDL as well, so the step's programs still load their state in in_proj's
tail. The results do not depend on the form.

Loads are issued as early as the data allows: the compiler does not move a load above a
store (they might alias) nor across a reduction's barrier, so z, the norm weights and the
conv windows are loaded with the state rather than where they are used.

The state slice of a program is read and written by the same threads in one tile, so the
in-place update has no hazard. Scratch buffers are allocated once per shape and reused, so
the step can be captured in a CUDA graph after one warm-up call. Calls that share a
scratch buffer must not run concurrently on different streams.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import Mamba2Error
from .configs import config_for
from .conv import conv_taps, conv_taps4_post, conv_taps4_pre, conv_window, shift_in
from .pdl import gdc_launch_dependents, gdc_wait, usable
from .ssd import softplus_clamp

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
                  BARRIER: tl.constexpr, SHIFT_BC: tl.constexpr = True):
    """Normalize group g from the scratch buffers, write it, shift the group's B and C windows
    (unless SHIFT_BC is off: `_bc_conv_kernel` did). The windows are loaded first, so their
    loads do not wait behind the output's store, and y with the sums of squares."""
    if SHIFT_BC:
        win_B, win_C = _bc_windows(xbc, cs, g, G, N, d_inner, stride_cs_c, K, BLOCK_N, BLOCK_K)
    offs_ss = tl.arange(0, BLOCK_SS)
    ss = tl.load(ssbuf_ptr + bi64 * (G * nss) + g * nss + offs_ss, mask=offs_ss < nss, other=0.0,
                 cache_modifier=".cg")
    yg = tl.load(ybuf_ptr + bi64 * d_inner + ch_g, mask=gsmask, other=0.0, cache_modifier=".cg")
    rstd = tl.math.rsqrt(tl.sum(ss, axis=0) / GS + eps)
    o = yg * rstd * norm_w
    if NORM_BEFORE_GATE:
        zg = tl.load(zx + ch_g, mask=gsmask, other=0.0).to(tl.float32)
        o = o * (zg * tl.sigmoid(zg))
    tl.store(out_ptr + bi64 * stride_out_b + ch_g, o.to(out_ptr.dtype.element_ty), mask=gsmask)
    if SHIFT_BC:
        _bc_shift_in(cs, win_B, win_C, g, G, N, d_inner, stride_cs_c, K, BLOCK_N, BLOCK_K, BARRIER)


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
def _bc_conv_kernel(
    zx_ptr, conv_w_ptr, conv_b_ptr, conv_state_ptr, bc_ptr, G, N, d_inner,
    stride_zx_b, stride_cw_c, stride_cs_b, stride_cs_c,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """BC_PRE's first kernel, one program per (sequence, group): the conv + SiLU of the group's
    B and C channels into bc [b, 2, G, N] (fp32), then the shift of their windows, so the
    step's programs load B and C instead of each recomputing them. The windows are loaded
    before bc is stored (a load after a store waits for the work before it). PDL: the
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
    win_B, win_C = _bc_windows(xbc, cs, g, G, N, d_inner, stride_cs_c, K, BLOCK_N, BLOCK_K)
    out = bc_ptr + bi64 * (2 * G * N) + g * N + offs_n
    tl.store(out, Bv, mask=nmask)
    tl.store(out + G * N, Cv, mask=nmask)
    _bc_shift_in(cs, win_B, win_C, g, G, N, d_inner, stride_cs_c, K, BLOCK_N, BLOCK_K, True)


@triton.jit
def _group_norm_kernel(
    zx_ptr, conv_state_ptr, norm_w_ptr, out_ptr, ybuf_ptr, ssbuf_ptr,
    G, N, GS, nss, d_inner, eps, stride_zx_b, stride_cs_b, stride_cs_c, stride_out_b,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_GS: tl.constexpr,
    BLOCK_SS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, PDL: tl.constexpr, SHIFT_BC: tl.constexpr,
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
                  K, BLOCK_N, BLOCK_K, BLOCK_SS, NORM_BEFORE_GATE, True, SHIFT_BC)


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
    PDL_STATE: tl.constexpr = False, CONV_EARLY: tl.constexpr = False,
):
    """TAIL: the group's last program normalizes it (else `_group_norm_kernel` does, after).
    PDL: launched early; D and A (and with PDL_STATE the state slice) are loaded before the
    wait for in_proj, everything else after it.
    BC_PRE: B and C come convolved from `_bc_conv_kernel` (which also shifted their windows).
    z and the norm weights are loaded with the state, not after the reductions (which the
    compiler does not move loads across) and the scratch stores (which it does not move
    loads above): each of those would be one more trip to memory on the program's path.
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
    state = tl.load(state_ptrs, mask=s_mask, other=0.0)
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
    if not NORM_BEFORE_GATE:
        z = tl.load(zx + ch_x, mask=pmask, other=0.0).to(tl.float32)
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
        yv = y * (z * tl.sigmoid(z))
    yv = tl.where(pmask, yv, 0.0)
    tl.store(ybuf_ptr + bi64 * d_inner + ch_x, yv, mask=pmask)
    nss = heads_per_group * npb
    slot = g * nss + (h % heads_per_group) * npb + pb
    tl.store(ssbuf_ptr + bi64 * (G * nss) + slot, tl.sum(yv * yv, axis=0))

    if not TAIL:
        # The norm is the next kernel's: this program's state and x windows are all it writes.
        tl.store(state_ptrs, state, mask=s_mask)
        shift_in(cs, win_x, ch_x, pmask, offs_k, stride_cs_c, K)
    else:
        # Arrive at the group's counter. The barrier puts every thread's scratch writes (and
        # conv-state reads) before the release; acq_rel then makes the other programs'
        # writes visible to the last arrival. The state is stored after the arrival, so the
        # release does not wait for those 32 KB of stores.
        tl.debug_barrier()
        count_ptrs = count_ptr + bi64 * G + g
        arrived = tl.atomic_add(count_ptrs, 1, sem="acq_rel")
        tl.store(state_ptrs, state, mask=s_mask)
        shift_in(cs, win_x, ch_x, pmask, offs_k, stride_cs_c, K)
        if arrived == nss - 1:
            _group_finish(zx, xbc, cs, ybuf_ptr, ssbuf_ptr, out_ptr, bi64, g, ch_g, gsmask, norm_w, nss, GS, G, N,
                          d_inner, eps, stride_cs_c, stride_out_b, K, BLOCK_N, BLOCK_K, BLOCK_SS, NORM_BEFORE_GATE,
                          False, not BC_PRE)
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


def ssd_decode_step(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_state):
    """One token; same contract as `pytorch.ssd_decode_step` (ssm_state updated in place)."""
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
    cfg = config_for(x.device, "decode_step", "ssd_step")
    BLOCK_P = min(cfg["BLOCK_P"], triton.next_power_of_2(P))
    npb = triton.cdiv(P, BLOCK_P)
    _ssd_step_kernel[(b * H * npb,)](
        x, dt, A, B, C, D2, dt_bias, ssm_state, y, H, P, N, H // G, lo, hi,
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        D2.stride(0), D2.stride(1), ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_P=BLOCK_P, BLOCK_N=triton.next_power_of_2(N), DT_CLAMP=clamp, num_warps=cfg["num_warps"],
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


def entry_for(batch: int) -> str:
    """The configs.DECODE_STEP entry for a batch of `batch` sequences."""
    return "batch1" if batch < 2 else "batch2-3" if batch < 4 else "batch4-7" if batch < 8 else "batch8+"


def mixer_decode_step(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit,
                      norm_weight, ssm_state, ngroups, eps, norm_before_gate=False, *, state_settled=False,
                      config=None):
    """One decode token of the mixer; same contract as `pytorch.mixer_decode_step`.

    zxbcdt [b, 2*d_inner + 2*G*N + H]; conv_state [b, conv_dim, K-1] and ssm_state
    [b, H, P, N] (fp32) are updated in place. Returns the gated, normed y [b, d_inner].
    state_settled: no kernel launched just before this call wrote ssm_state, so under PDL
    the state is loaded before the wait for the kernel before. `config` overrides keys of
    the configs.DECODE_STEP entry for this batch size (tests and benchmarks use it).
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

    cfg = config_for(zxbcdt.device, "decode_step", entry_for(b))
    if config:
        cfg = {**cfg, **config}
    BLOCK_P = min(cfg["BLOCK_P"], triton.next_power_of_2(P))
    npb = triton.cdiv(P, BLOCK_P)
    hpg = H // G
    split = bool(cfg["split"])
    pdl = usable(cfg["pdl"], zxbcdt.device)
    launch = {"launch_pdl": True} if pdl else {}
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
            HAS_CONV_BIAS=conv_bias is not None, PDL=pdl, num_warps=4, **launch,
        )
    # CONV_EARLY wherever the entry asks for PDL: on a GPU its loads then go before the wait;
    # under the interpreter (no PDL) it only reorders loads, for the same bits.
    conv_early = bool(cfg["pdl"]) and bool(state_settled) and K == 4 and not bc_pre
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
        TAIL=not split, PDL=pdl, BC_PRE=bc_pre, PDL_STATE=bool(state_settled), CONV_EARLY=conv_early,
        num_warps=cfg["num_warps"], **launch,
    )
    if split:
        _group_norm_kernel[(b * G,)](
            zxbcdt, conv_state, norm_weight, out, ybuf, ssbuf,
            G, N, hpg * P, H * npb // G, d_inner, float(eps),
            zxbcdt.stride(0), conv_state.stride(0), conv_state.stride(1), out.stride(0),
            K=K, BLOCK_N=triton.next_power_of_2(N), BLOCK_K=triton.next_power_of_2(K),
            BLOCK_GS=triton.next_power_of_2(hpg * P), BLOCK_SS=triton.next_power_of_2(hpg * npb),
            NORM_BEFORE_GATE=bool(norm_before_gate), PDL=pdl, SHIFT_BC=not bc_pre,
            num_warps=cfg["norm_warps"], **launch,
        )
    return out
