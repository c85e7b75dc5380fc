"""Triton SSD prefill: the chunked scan of a whole prompt in one pass over the sequence.

One program owns one (sequence, head, block of P rows) and walks the chunks in order,
carrying its slice of the state [BLOCK_P, N] in fp32 registers. Per chunk of CHUNK tokens:

    a      = cumsum(dt * A)                         (log-decay from the chunk start)
    y      = exp(a) * (C . S_in^T)                  (the state entering the chunk)
           + ((C B^T) o exp(a_q - a_s) o dt_s o [s <= q]) . x     (inside the chunk)
           + D x
    S_out  = exp(a_end) S_in + (x o dt o exp(a_end - a))^T . B

Why one pass instead of upstream's five kernels: the chunk-boundary states never touch
device memory (at L=16384 one layer's states are 268 MB of fp32 written and read twice),
and since no state is stored per chunk, a small chunk costs nothing but loop trips, so the
quadratic in-chunk work stays small. Results do not depend on the chunk length (it only
regroups the same sums), so the kernel picks its own; `chunk_size` of the interface is
accepted and ignored.

C B^T depends on the group, not the head: with few programs (batch 1, latency-bound) a first
small kernel computes it once per (sequence, chunk, group) in fp32 so the scan does not repeat
it for every head of a group. With many programs each program computes it itself: the scan
is then throughput-bound, and one more product per chunk costs less than the pre-pass, its
copies through shared memory and their layout conversion.

A small grid (batch 1: too few programs to fill the GPU) splits the sequence into segments
instead (choose_config). The segment's entering state is the only thing it needs from the
ones before it, and that state is a sum over them:

    S_in[k] = exp(A_tot[k-1]) S_in[k-1] + S_own[k-1]

where S_own[k] is segment k's final state from zero and A_tot[k] its total log-decay. A
first pass (STATES_ONLY: no C, no y) computes S_own and A_tot for every segment but the last,
all at once; the second pass runs every segment at once, each composing its S_in first.

Layout choices of the scan kernel (constexprs):
- the next chunk's x and dt are loaded into registers during this chunk, so their latency
  hides behind a whole chunk step; B and C, which feed a dot directly, Triton's pipeliner
  copies through shared memory by itself (num_stages). Prefetching B, C or C B^T into
  registers as well spills and costs more than the wait.
- STATE_T: the state held as S^T [N, P], so neither product that uses it needs a transpose
  (the states-only pass of a batch-1 split holds S [P, N]).
- D_IN_SCORES: D x as D on the diagonal of the in-chunk product (D per head only): saves a
  layout conversion; D then enters through the 16-bit operand (2^-9 relative).

Numerics: dt, A, decays and the carried state are fp32. Matrix products take 16-bit
operands (the input dtype) with fp32 accumulation, as upstream does; with fp32 inputs they
run in full fp32 ("ieee"), never tf32, so fp32 results stay within 1e-4 of float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import Mamba2Error
from .configs import config_for

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The chunk count is never specialized. Triton compiles an integer argument equal to 1 as a
# constant, which gives a prompt of one chunk (L <= CHUNK) a kernel of its own with the chunk
# loop unrolled away; on the H200 (Triton 3.6) that variant of the P-block-32 scan returns a
# wrong final state (relative error ~1) and at times faults with an illegal memory access,
# so every prompt runs the looped kernel. L stays specialized: its divisibility by 16 saves
# instructions in the masks, and L = 1 compiles a looped kernel as well. seg_chunks likewise
# (equal to nchunks unless the sequence is split).
_LENGTH_ARGS = ["nchunks", "seg_chunks"]


@triton.jit
def softplus_clamp(v, dt_lo, dt_hi, DT_CLAMP: tl.constexpr):
    """clamp(softplus(v), lo, hi) in fp32, accurate for large negative v too.

    softplus(v) = max(v, 0) + log1p(exp(-|v|)); log1p(u) is computed as
    log(1 + u) * u / ((1 + u) - 1), which stays accurate where 1 + u rounds (no log1p
    in every Triton release).
    """
    u = tl.exp(-tl.abs(v))
    w = 1.0 + u
    log1p_u = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    sp = tl.maximum(v, 0.0) + log1p_u
    if DT_CLAMP:
        sp = tl.minimum(tl.maximum(sp, dt_lo), dt_hi)
    return sp


@triton.jit
def row_length(len_ptr, bi, L, HAS_LEN: tl.constexpr):
    """Real positions of sequence bi: seq_len[bi] (clamped to [0, L]) when given, else L."""
    if HAS_LEN:
        n = tl.minimum(tl.maximum(tl.load(len_ptr + bi).to(tl.int32), 0), L)
    else:
        n = L
    return n


@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _chunk_cb_kernel(
    C_ptr, B_ptr, cb_ptr, len_ptr,
    L, N, nchunks, G,
    stride_C_b, stride_C_l, stride_C_g,
    stride_B_b, stride_B_l, stride_B_g,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_LEN: tl.constexpr,
):
    """cb[b, c, g] = C_chunk . B_chunk^T  ([CHUNK, CHUNK] fp32), zero rows past the sequence."""
    pid = tl.program_id(0)
    g = pid % G
    bc = pid // G
    c = bc % nchunks
    bi = (bc // nchunks).to(tl.int64)
    offs_q = tl.arange(0, CHUNK)
    offs_n = tl.arange(0, BLOCK_N)
    t0 = c.to(tl.int64) * CHUNK
    tmask = (t0 + offs_q) < row_length(len_ptr, bi, L, HAS_LEN)
    C_base = C_ptr + bi * stride_C_b + t0 * stride_C_l + g * stride_C_g
    B_base = B_ptr + bi * stride_B_b + t0 * stride_B_l + g * stride_B_g
    acc = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nmask = (n0 + offs_n) < N
        Cm = tl.load(C_base + offs_q[:, None] * stride_C_l + (n0 + offs_n)[None, :],
                     mask=tmask[:, None] & nmask[None, :], other=0.0)
        Bt = tl.load(B_base + offs_q[None, :] * stride_B_l + (n0 + offs_n)[:, None],
                     mask=tmask[None, :] & nmask[:, None], other=0.0)
        acc += tl.dot(Cm, Bt, input_precision=DOT_PRECISION)
    out = cb_ptr + pid.to(tl.int64) * (CHUNK * CHUNK)
    tl.store(out + offs_q[:, None] * CHUNK + offs_q[None, :], acc)


@triton.jit
def _chunk_output(Cm, Bm, cb, xm, state, a, dt, D_h, Dv, causal, offs_q, CB_PRECOMPUTED: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, STATE_T: tl.constexpr,
                  D_IN_SCORES: tl.constexpr):
    """y of one chunk [CHUNK, BLOCK_P] in fp32: the entering state's part plus the in-chunk part."""
    # Inside the chunk. Decay exponents are differences of one chunk's cumsum, so
    # they stay small; the upper triangle is clamped before exp (it is masked anyway).
    if not CB_PRECOMPUTED:
        cb = tl.dot(Cm, tl.trans(Bm), input_precision=DOT_PRECISION)
    decay = tl.exp(tl.minimum(a[:, None] - a[None, :], 0.0))
    scores = tl.where(causal, cb * decay * dt[None, :], 0.0)
    if D_IN_SCORES:
        # D x as D on the diagonal of the in-chunk product (D per head only).
        scores += tl.where(offs_q[:, None] == offs_q[None, :], D_h, 0.0)

    # The state entering the chunk, seen from each position: exp(a_q) C_q . S_in.
    if STATE_T:
        s_op = state.to(xm.dtype)
    else:
        s_op = tl.trans(state.to(xm.dtype))
    y = tl.dot(Cm, s_op, input_precision=DOT_PRECISION)
    y = y * tl.exp(a)[:, None]
    y += tl.dot(scores.to(xm.dtype), xm, input_precision=DOT_PRECISION)
    if not D_IN_SCORES:
        y += Dv[None, :] * xm.to(tl.float32)
    return y


@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _ssd_scan_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, cb_ptr, init_ptr, y_ptr, final_ptr, len_ptr,
    seg_state_ptr, seg_decay_ptr,
    L, H, P, N, G, heads_per_group, nchunks, dt_lo, dt_hi, seg_chunks, nseg,
    stride_x_b, stride_x_l, stride_x_h,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_B_b, stride_B_l, stride_B_g,
    stride_C_b, stride_C_l, stride_C_g,
    stride_D_h, stride_D_p,
    stride_y_b, stride_y_l, stride_y_h,
    stride_s_b, stride_s_h, stride_s_p,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    CB_PRECOMPUTED: tl.constexpr, HAS_INIT: tl.constexpr, DT_CLAMP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STATE_T: tl.constexpr, D_IN_SCORES: tl.constexpr, HAS_LEN: tl.constexpr,
    STATES_ONLY: tl.constexpr, SPLIT: tl.constexpr,
):
    # Program order: P block fastest, then head, then segment, then sequence, so the heads
    # of one group (which read the same B, C and C B^T) run side by side and share L2.
    pid = tl.program_id(0)
    npb = tl.cdiv(P, BLOCK_P)
    pb = pid % npb
    h = (pid // npb) % H
    seg = (pid // (npb * H)) % nseg
    bi = (pid // (npb * H * nseg)).to(tl.int64)
    g = h // heads_per_group
    # Positions past the sequence's length (padding) are masked out of every load: they
    # read as zero, so the state passes through them unchanged and their y is zero.
    # A segment covers chunks [seg * seg_chunks, (seg + 1) * seg_chunks) of its sequence
    # (one segment, the whole sequence, unless SPLIT); n counts its real positions.
    t_seg = seg * seg_chunks * CHUNK
    n = tl.minimum(tl.maximum(row_length(len_ptr, bi, L, HAS_LEN) - t_seg, 0), seg_chunks * CHUNK)
    n_loop = tl.minimum(seg_chunks, nchunks - seg * seg_chunks)

    offs_q = tl.arange(0, CHUNK)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < P
    nmask = offs_n < N
    causal = offs_q[:, None] >= offs_q[None, :]

    A = tl.load(A_ptr + h).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + h).to(tl.float32)
    Dv = tl.load(D_ptr + h * stride_D_h + offs_p * stride_D_p, mask=pmask, other=0.0).to(tl.float32)
    D_h = tl.load(D_ptr + h * stride_D_h).to(tl.float32)

    if STATE_T:
        # The state held as S^T [N, P]: both products that touch it then take it as is.
        s_in = h * stride_s_h + offs_p[None, :] * stride_s_p + offs_n[:, None]
        s_mask = pmask[None, :] & nmask[:, None]
        state = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    else:
        s_in = h * stride_s_h + offs_p[:, None] * stride_s_p + offs_n[None, :]
        s_mask = pmask[:, None] & nmask[None, :]
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    s_off = bi * stride_s_b + s_in
    if HAS_INIT and not STATES_ONLY:
        state += tl.load(init_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)
    if SPLIT and not STATES_ONLY:
        # The state entering this segment, composed from the segments before it: each one's
        # own final state (from zero, computed by the STATES_ONLY pass) and total decay.
        for k in range(0, seg):
            row = bi * (nseg - 1) + k
            state = state * tl.exp(tl.load(seg_decay_ptr + row * H + h)) \
                + tl.load(seg_state_ptr + row * stride_s_b + s_in, mask=s_mask, other=0.0)

    # Base pointers advance by one chunk per trip (64-bit pointer arithmetic, so long
    # prompts cannot overflow 32-bit offsets).
    t64 = t_seg.to(tl.int64)
    x_base = x_ptr + bi * stride_x_b + h * stride_x_h + t64 * stride_x_l
    y_base = y_ptr + bi * stride_y_b + h * stride_y_h + t64 * stride_y_l
    dt_base = dt_ptr + bi * stride_dt_b + h * stride_dt_h + t64 * stride_dt_l
    B_base = B_ptr + bi * stride_B_b + g * stride_B_g + t64 * stride_B_l
    C_base = C_ptr + bi * stride_C_b + g * stride_C_g + t64 * stride_C_l
    cb_base = cb_ptr + ((bi * nchunks + seg * seg_chunks) * G + g) * (CHUNK * CHUNK)
    a_total = tl.zeros((), dtype=tl.float32)

    # Registers hold the next chunk's dt and x while this one computes, so their latency
    # hides behind a whole chunk step.
    tmask_n = offs_q < n
    dt_n = tl.load(dt_base + offs_q * stride_dt_l, mask=tmask_n, other=0.0)
    x_n = tl.load(x_base + offs_q[:, None] * stride_x_l + offs_p[None, :],
                  mask=tmask_n[:, None] & pmask[None, :], other=0.0)

    for c in range(0, n_loop):
        tmask = (c * CHUNK + offs_q) < n
        dt_raw = dt_n
        xm = x_n
        tmask_n = ((c + 1) * CHUNK + offs_q) < n
        dt_n = tl.load(dt_base + (CHUNK + offs_q) * stride_dt_l, mask=tmask_n, other=0.0)
        x_n = tl.load(x_base + (CHUNK + offs_q)[:, None] * stride_x_l + offs_p[None, :],
                      mask=tmask_n[:, None] & pmask[None, :], other=0.0)
        if not STATES_ONLY:
            Cm = tl.load(C_base + offs_q[:, None] * stride_C_l + offs_n[None, :],
                         mask=tmask[:, None] & nmask[None, :], other=0.0)
        Bm = tl.load(B_base + offs_q[:, None] * stride_B_l + offs_n[None, :],
                     mask=tmask[:, None] & nmask[None, :], other=0.0)
        if CB_PRECOMPUTED and not STATES_ONLY:
            cb = tl.load(cb_base + offs_q[:, None] * CHUNK + offs_q[None, :])

        # Positions past L get dt = 0: no decay and no input, the state passes through.
        dt = tl.where(tmask, softplus_clamp(dt_raw.to(tl.float32) + dt_bias, dt_lo, dt_hi, DT_CLAMP), 0.0)
        dA = dt * A
        a = tl.cumsum(dA, axis=0)
        a_end = tl.sum(dA, axis=0)

        a_total += a_end
        if not STATES_ONLY:
            if not CB_PRECOMPUTED:
                cb = dt  # a placeholder: _chunk_output computes C B^T itself
            y = _chunk_output(Cm, Bm, cb, xm, state, a, dt, D_h, Dv, causal, offs_q, CB_PRECOMPUTED,
                              DOT_PRECISION, STATE_T, D_IN_SCORES)
            if HAS_LEN:
                ymask = (c * CHUNK + offs_q) < L - t_seg  # padding gets its (zero) y: no stale memory
            else:
                ymask = tmask
            tl.store(y_base + offs_q[:, None] * stride_y_l + offs_p[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=ymask[:, None] & pmask[None, :])

        # Carry the state to the chunk's end.
        w = tl.exp(a_end - a) * dt
        xw = (xm.to(tl.float32) * w[:, None]).to(xm.dtype)
        if STATE_T:
            state = state * tl.exp(a_end) + tl.dot(tl.trans(Bm), xw, input_precision=DOT_PRECISION)
        else:
            state = state * tl.exp(a_end) + tl.dot(tl.trans(xw), Bm, input_precision=DOT_PRECISION)

        x_base += CHUNK * stride_x_l
        y_base += CHUNK * stride_y_l
        dt_base += CHUNK * stride_dt_l
        B_base += CHUNK * stride_B_l
        C_base += CHUNK * stride_C_l
        cb_base += G * CHUNK * CHUNK

    if STATES_ONLY:
        # This segment's own final state (from zero) and its total decay, for the segments after
        # it (this pass runs nseg = all segments but the last).
        row = bi * nseg + seg
        tl.store(seg_state_ptr + row * stride_s_b + s_in, state, mask=s_mask)
        if pb == 0:
            tl.store(seg_decay_ptr + row * H + h, a_total)
    elif seg == nseg - 1:
        tl.store(final_ptr + s_off, state, mask=s_mask)


def _segments(cfg: dict, programs: int, nchunks: int) -> int:
    """How many segments the sequence is split into: SEGMENTS when set, else enough for
    SPLIT_PROGRAMS programs when the batch gives fewer, each at least SPLIT_MIN_CHUNKS long."""
    if cfg.get("SEGMENTS"):
        return max(1, min(int(cfg["SEGMENTS"]), nchunks))
    target = int(cfg.get("SPLIT_PROGRAMS") or 0)
    if target <= programs:
        return 1
    return max(1, min(target // programs, nchunks // max(1, int(cfg.get("SPLIT_MIN_CHUNKS") or 1))))


def _launch_scan(x, dt, A, B, C, D2, stride_D, dt_bias, cb, init, y, final, seq_len, seg_state, seg_decay,
                 grid, L, H, P, N, G, nchunks, lo, hi, seg_chunks, nseg, BLOCK_P, flags, num_warps, num_stages):
    _ssd_scan_kernel[grid](
        x, dt, A, B, C, D2, dt_bias, cb, init, y, final, seq_len if seq_len is not None else A,
        seg_state, seg_decay,
        L, H, P, N, G, H // G, nchunks, lo, hi if hi != float("inf") else 3.0e38, seg_chunks, nseg,
        x.stride(0), x.stride(1), x.stride(2),
        dt.stride(0), dt.stride(1), dt.stride(2),
        B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2),
        stride_D[0], stride_D[1],
        y.stride(0), y.stride(1), y.stride(2),
        final.stride(0), final.stride(1), final.stride(2),
        BLOCK_P=BLOCK_P, **flags, num_warps=num_warps, num_stages=num_stages,
    )


def choose_config(b: int, H: int, P: int, L: int, dtype: torch.dtype, device=None) -> dict:
    """The scan's configuration (configs.SSD) for b sequences of L tokens of an H-head,
    P-wide layer: "few" programs, "many" from rules.many_programs programs of 64 rows, "fp32"
    for fp32 inputs; batch 1 takes "many" cut into SEGMENTS segments when the prompt is long
    enough (its first pass with "many_states")."""
    rules = config_for(device, "ssd", "rules")
    many = config_for(device, "ssd", "many")
    cfg = dict(config_for(device, "ssd", "few"))
    programs = b * H * triton.cdiv(P, 64)
    if programs >= rules["many_programs"]:
        cfg.update(many)
    if dtype == torch.float32:
        cfg.update(config_for(device, "ssd", "fp32"))
    if programs >= rules["many_programs"] or dtype == torch.float32:
        return cfg
    nseg = min(rules["split_target"] // programs, triton.cdiv(L, many["CHUNK"]) // cfg["SPLIT_MIN_CHUNKS"])
    if nseg >= rules["split_min_segments"]:
        cfg.update(many)
        cfg.update(SEGMENTS=nseg, states=dict(config_for(device, "ssd", "many_states")))
    return cfg


def _check(cond: bool, msg) -> None:
    """Raise a Mamba2Error when cond is false; msg may be a callable, formatted only then."""
    if not cond:
        raise Mamba2Error(f"ssd_prefill: {msg() if callable(msg) else msg}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _f32(t: torch.Tensor) -> torch.Tensor:
    # A Python-side check costs less than a no-op dispatch; prefill calls this per layer.
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def ssd_prefill(x, dt, A, B, C, D, dt_bias, dt_limit, chunk_size, initial_state=None, seq_len=None,
                final_state=None, *, config=None):
    """Chunked SSD scan; same contract as `pytorch.ssd_prefill`.

    x [b, L, H, P] (fp16, bf16 or fp32); dt [b, L, H]; A [H] fp32; B, C [b, L, G, N] in
    x.dtype; D [H] or [H, P]; dt_bias [H]; initial_state [b, H, P, N] fp32 or None.
    Returns y [b, L, H, P] in x.dtype and the final state [b, H, P, N] fp32.
    seq_len [b] (integer, on the device): real positions per row, the rest is padding that
    the kernels never read (the length is read on the device, so a CUDA graph captured for
    L positions serves every shorter prompt). final_state: where to write the final state;
    it may be initial_state itself (each program reads its slice of the state before it
    writes the same slice, so the update is in place and needs no copy).
    `chunk_size` is accepted for the interface; the kernel's own chunk gives the same sums.
    `config` overrides keys of the chosen configuration (tests and benchmarks use it).
    """
    _check(x.dim() == 4, lambda: f"x must be [b, L, H, P], got shape {tuple(x.shape)}")
    b, L, H, P = x.shape
    _check(x.dtype in _FLOAT_DTYPES, lambda: f"x dtype {x.dtype} not supported (fp16, bf16, fp32)")
    _check(B.dim() == 4 and C.dim() == 4 and B.shape == C.shape and B.shape[:2] == (b, L),
           lambda: f"B and C must be [b, L, G, N] matching x; got {tuple(B.shape)} and {tuple(C.shape)}")
    G, N = B.shape[-2:]
    _check(H % G == 0, lambda: f"ngroups {G} must divide nheads {H}")
    _check(B.dtype == x.dtype and C.dtype == x.dtype,
           lambda: f"B, C dtype ({B.dtype}, {C.dtype}) must match x ({x.dtype})")
    _check(dt.shape == (b, L, H), lambda: f"dt must be [b, L, H] = {(b, L, H)}, got {tuple(dt.shape)}")
    _check(A.shape == (H,) and dt_bias.shape == (H,), "A and dt_bias must be [H]")
    _check(D.shape in ((H,), (H, P)), lambda: f"D must be [H] or [H, P], got {tuple(D.shape)}")
    _check(16 <= P and 16 <= N and N <= 256, lambda: f"headdim P={P} must be >= 16 and d_state N={N} in 16..256")
    tensors = [x, dt, A, B, C, D, dt_bias] + ([initial_state] if initial_state is not None else [])
    _check(all(t.device == x.device for t in tensors), "all tensors must be on one device")
    if initial_state is not None:
        _check(initial_state.shape == (b, H, P, N) and initial_state.dtype == torch.float32,
               lambda: f"initial_state must be fp32 [b, H, P, N] = {(b, H, P, N)}, got "
               f"{initial_state.dtype} {tuple(initial_state.shape)}")
        # The kernel reads the initial state with the final state's (contiguous) strides.
        initial_state = initial_state if initial_state.is_contiguous() else initial_state.contiguous()
    if seq_len is not None:
        _check(seq_len.shape == (b,) and not seq_len.is_floating_point() and seq_len.device == x.device,
               lambda: f"seq_len must be an integer tensor [b] = [{b}] on {x.device}, got "
               f"{seq_len.dtype} {tuple(seq_len.shape)} on {seq_len.device}")
    out = final_state
    if final_state is not None:
        _check(final_state.shape == (b, H, P, N) and final_state.dtype == torch.float32
               and final_state.device == x.device,
               lambda: f"final_state must be fp32 [b, H, P, N] = {(b, H, P, N)} on {x.device}")
        if not final_state.is_contiguous():
            final_state = None  # computed into a new tensor, then copied

    cfg = choose_config(b, H, P, L, x.dtype, x.device)
    cfg.update(config or {})

    y = torch.empty((b, L, H, P), dtype=x.dtype, device=x.device)
    final = final_state if final_state is not None else torch.empty((b, H, P, N), dtype=torch.float32,
                                                                    device=x.device)
    if L == 0 or b == 0:
        if initial_state is None:
            final.zero_()
        elif final.data_ptr() != initial_state.data_ptr():
            final.copy_(initial_state)
        return y, (out.copy_(final) if out is not None and out is not final else final)

    x, B, C, dt = (_last_dim_contiguous(t) for t in (x, B, C, dt))
    A = _f32(A)
    dt_bias = _f32(dt_bias)
    D2 = _f32(D)
    # D per head is read with a zero stride along P (no expanded copy).
    stride_D = (D2.stride(0), D2.stride(1)) if D2.dim() == 2 else (D2.stride(0), 0)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    dt_clamp = lo > 0.0 or hi != float("inf")
    precision = "ieee" if x.dtype == torch.float32 else "tf32"

    CHUNK = int(cfg["CHUNK"])
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_P = min(int(cfg["BLOCK_P"]), triton.next_power_of_2(P))
    nchunks = triton.cdiv(L, CHUNK)
    npb = triton.cdiv(P, BLOCK_P)

    if cfg["CB_PRECOMPUTED"]:
        cb = torch.empty((b, nchunks, G, CHUNK, CHUNK), dtype=torch.float32, device=x.device)
        _chunk_cb_kernel[(b * nchunks * G,)](
            C, B, cb, seq_len if seq_len is not None else A, L, N, nchunks, G,
            C.stride(0), C.stride(1), C.stride(2),
            B.stride(0), B.stride(1), B.stride(2),
            CHUNK=CHUNK, BLOCK_N=min(BLOCK_N, 128), DOT_PRECISION=precision, HAS_LEN=seq_len is not None,
            **config_for(x.device, "ssd", "cb"),
        )
    else:
        cb = y  # unused

    nseg = _segments(cfg, b * H * npb, nchunks)
    seg_chunks = triton.cdiv(nchunks, nseg)
    nseg = triton.cdiv(nchunks, seg_chunks)  # no empty segment at the end
    if nseg > 1 and final_state is not None and initial_state is not None \
            and final_state.data_ptr() == initial_state.data_ptr():
        # The last segment writes the final state while the others still read the initial one.
        final = torch.empty_like(final)
    init = initial_state if initial_state is not None else final
    common = dict(CHUNK=CHUNK, BLOCK_N=BLOCK_N, CB_PRECOMPUTED=bool(cfg["CB_PRECOMPUTED"]),
                  HAS_INIT=initial_state is not None, DT_CLAMP=dt_clamp, DOT_PRECISION=precision,
                  HAS_LEN=seq_len is not None)
    seg_state = seg_decay = A  # unused unless split
    if nseg > 1:
        # Pass 1: every segment but the last, from a zero state: its final state and decay.
        seg_state = torch.empty((b * (nseg - 1), H, P, N), dtype=torch.float32, device=x.device)
        seg_decay = torch.empty((b * (nseg - 1), H), dtype=torch.float32, device=x.device)
        pcfg = {**cfg, **config_for(x.device, "ssd", "states"), **cfg.get("states", {})}
        BP1 = min(int(pcfg["BLOCK_P"]), triton.next_power_of_2(P))
        _launch_scan(x, dt, A, B, C, D2, stride_D, dt_bias, cb, init, y, final, seq_len, seg_state, seg_decay,
                     (b * (nseg - 1) * H * triton.cdiv(P, BP1),), L, H, P, N, G, nchunks, lo, hi,
                     seg_chunks, nseg - 1, BP1,
                     {**common, "STATE_T": bool(pcfg["STATE_T"]), "D_IN_SCORES": False,
                      "STATES_ONLY": True, "SPLIT": True},
                     int(pcfg["num_warps"]), int(pcfg["num_stages"]))
    # Pass 2 (the only one unless split): every segment, from the state composed for it.
    _launch_scan(x, dt, A, B, C, D2, stride_D, dt_bias, cb, init, y, final, seq_len, seg_state, seg_decay,
                 (b * nseg * H * npb,), L, H, P, N, G, nchunks, lo, hi, seg_chunks, nseg, BLOCK_P,
                 {**common, "STATE_T": True, "D_IN_SCORES": D.dim() == 1, "STATES_ONLY": False, "SPLIT": nseg > 1},
                 int(cfg["num_warps"]), int(cfg["num_stages"]))
    if out is not None and out is not final:
        out.copy_(final)
        final = out
    return y, final
