"""Decode at batch 1: a producer and the matvec that consumes its output, in one launch.

At batch 1 a layer is a chain of kernels (add_rmsnorm, in_proj, the step, out_proj), and the
short ones (the step's 8 µs, the norm's 2) are latency: the memory bus idles while they run,
and each matvec then starts streaming its weights from nothing. Here the producer and the
matvec after it share one launch. The lowest program ids do the producer's work (the mixer
step's programs, or the single add_rmsnorm row) and count each part they finish (a group of
the step, the norm's row) on a counter in memory; the other programs are the matvec's row
blocks, which load their whole weight rows into registers first and only then wait for the
producer's count, so the weights stream while the producer runs.

The counter is never reset: in a launch the producers add `parts` and every matvec program
adds 1 once it is done, so a launch adds exactly `period` = parts + matvec programs and
starts at a multiple of it; a matvec program, which has not added yet, waits until the count
modulo period reaches parts. The counter is int64, one per launch shape (so one period);
launches that share it must be ordered on one stream (as decode's are, also in a CUDA graph).

Progress. Producers never wait for anything but each other's arrivals on the step's own
counters (the group's last program finishes the group), so what could stall is a matvec
program waiting while a producer has not started: the producers are the lowest program ids,
and the GPU starts a launch's programs in the order of their ids (as single-pass scans that
look back at lower blocks rely on). In the interpreter programs run one after another, so the
matvec programs find the producers done.

Numerics: the producer is the unfused kernels' code; the consumer sums each row's products in
fp32 in one tile (a different order of the same sum than gemv's acc kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import Mamba2Error
from . import gemv, step
from .norm import add_rmsnorm_rows

# step_out: the mixer step and out_proj in one launch; norm_in: add_rmsnorm and in_proj (and
# norm_f and lm_head) in one launch. Batch 1 only; the matvec's rows per program and warps.
STREAM_CONFIG = {"step_out": False, "norm_in": False, "out_block_n": 2, "in_block_n": 2, "norm_warps": 4}
# Nanoseconds a waiting program sleeps between reads of the ready count (0: it spins). The
# interpreter cannot run the sleep's inline assembly, so it always spins.
STREAM_CONFIG["sleep_ns"] = 200
# acquire: the waiting program's acquire (an L1 invalidation) before it reads x; off: x read
# from L2 (.cg) once the count is seen, no fence (the read issues only after the count's load
# returns: the loop's exit depends on it).
STREAM_CONFIG["acquire"] = True

# The count lives on SLOTS copies, SLOT_STRIDE int64 apart (256 bytes, so on different lines
# of the L2): each matvec program reads and counts on one, so no single address takes every
# program's accesses (round 33: on one address each program added 3-4 ns, in series).
SLOTS = 64
SLOT_STRIDE = 32

# Rows longer than this are not held in registers whole (the consumer's tile is a whole row).
MAX_K = 16384

_counters: dict = {}


def _counter_for(device, key) -> torch.Tensor:
    """The ready counts (int64, on SLOTS slots) of one launch shape on one device."""
    k = (str(device), key)
    buf = _counters.get(k)
    if buf is None:
        buf = _counters[k] = torch.zeros(SLOTS * SLOT_STRIDE, dtype=torch.int64, device=device)
    return buf


@triton.jit
def count_part(ready_ptr, SLOTS: tl.constexpr, SLOT_STRIDE: tl.constexpr):
    """A producer's part is done (its writes come first: release), on every slot."""
    tl.debug_barrier()  # every thread's writes before the release
    tl.atomic_add(ready_ptr + tl.arange(0, SLOTS) * SLOT_STRIDE, 1, sem="release")


@triton.jit
def late_gemv(r, x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, ready_ptr, parts, n_cons,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SLEEP_NS: tl.constexpr,
              SLOTS: tl.constexpr, SLOT_STRIDE: tl.constexpr, ACQUIRE: tl.constexpr):
    """Rows r * BLOCK_N ... of y = x W^T (+ b) for one row x, the r-th of n_cons such programs:
    the weight rows are loaded whole, then the program waits for the launch's `parts`
    producer counts on its slot, reads x, and adds its own count to the slot at the end."""
    rn = r * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    k_mask = rk < K
    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :],
                mask=n_mask[:, None] & k_mask[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    slot = r % SLOTS
    counter = ready_ptr + slot * SLOT_STRIDE
    period = parts + (n_cons - slot + SLOTS - 1) // SLOTS  # what a launch adds to this slot
    while tl.load(counter, volatile=True) % period < parts:
        if SLEEP_NS > 0:  # poll less often
            tl.inline_asm_elementwise("nanosleep.u32 $1; mov.u32 $0, 0;", "=r,r", [tl.full((1,), SLEEP_NS, tl.int32)],
                                      dtype=tl.int32, is_pure=False, pack=1)
    if ACQUIRE:
        tl.atomic_add(counter, 0, sem="acquire")  # what the producers wrote before counting is visible
        x = tl.load(x_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)
    else:  # x read from L2 (where the producers' stores are), after the count was seen
        x = tl.load(x_ptr + rk, mask=k_mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if HAS_BIAS:
        y += bias
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)
    tl.atomic_add(counter, 1, sem="relaxed")  # the launch's count on the slot ends at a multiple of period


@triton.jit
def _step_out_kernel(
    zx_ptr, conv_w_ptr, conv_b_ptr, conv_state_ptr, A_ptr, D_ptr, dt_bias_ptr, norm_w_ptr,
    ssm_ptr, out_ptr, ybuf_ptr, ssbuf_ptr, count_ptr, bc_ptr,
    H, P, N, G, heads_per_group, d_inner, eps, dt_lo, dt_hi,
    stride_zx_b, stride_cw_c, stride_cs_b, stride_cs_c, stride_D_h, stride_D_p,
    stride_s_b, stride_s_h, stride_s_p, stride_out_b,
    w_ptr, wb_ptr, o_ptr, ready_ptr, n_out, stride_wn, n_step, programs,
    K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_GS: tl.constexpr, BLOCK_SS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr, DT_CLAMP: tl.constexpr, TAIL: tl.constexpr, PDL: tl.constexpr,
    BC_PRE: tl.constexpr, EVICT_STATE: tl.constexpr, EARLY: tl.constexpr,
    OUT_BLOCK_N: tl.constexpr, OUT_BLOCK_K: tl.constexpr, OUT_HAS_BIAS: tl.constexpr, SLEEP_NS: tl.constexpr,
    SLOTS: tl.constexpr, SLOT_STRIDE: tl.constexpr, ACQUIRE: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_step:
        step.mixer_step_body(
            pid, zx_ptr, conv_w_ptr, conv_b_ptr, conv_state_ptr, A_ptr, D_ptr, dt_bias_ptr,
            norm_w_ptr, ssm_ptr, out_ptr, ybuf_ptr, ssbuf_ptr, count_ptr, bc_ptr, ready_ptr,
            H, P, N, G, heads_per_group, d_inner, eps, dt_lo, dt_hi,
            stride_zx_b, stride_cw_c, stride_cs_b, stride_cs_c, stride_D_h, stride_D_p,
            stride_s_b, stride_s_h, stride_s_p, stride_out_b,
            K, BLOCK_P, BLOCK_N, BLOCK_K, BLOCK_GS, BLOCK_SS, HAS_CONV_BIAS, NORM_BEFORE_GATE, DT_CLAMP,
            TAIL, PDL, BC_PRE, EVICT_STATE, EARLY, SLOTS, SLOT_STRIDE,
        )
    else:
        late_gemv(pid - n_step, out_ptr, w_ptr, wb_ptr, o_ptr, n_out, d_inner, stride_wn, ready_ptr,
                  G, programs - n_step, OUT_BLOCK_N, OUT_BLOCK_K, OUT_HAS_BIAS, SLEEP_NS, SLOTS, SLOT_STRIDE, ACQUIRE)


@triton.jit
def _norm_in_kernel(
    x_ptr, res_ptr, nw_ptr, normed_ptr, res_out_ptr, D, eps,
    w_ptr, wb_ptr, y_ptr, n_out, stride_wn, ready_ptr, programs,
    HAS_RES: tl.constexpr, WRITE_RES: tl.constexpr, BLOCK_D: tl.constexpr,
    OUT_BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, SLEEP_NS: tl.constexpr,
    SLOTS: tl.constexpr, SLOT_STRIDE: tl.constexpr, ACQUIRE: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid == 0:
        add_rmsnorm_rows(pid, x_ptr, res_ptr, nw_ptr, normed_ptr, res_out_ptr, 1, D, eps,
                         D, D, D, D, HAS_RES, WRITE_RES, BLOCK_D, 1, True)
        count_part(ready_ptr, SLOTS, SLOT_STRIDE)
    else:
        late_gemv(pid - 1, normed_ptr, w_ptr, wb_ptr, y_ptr, n_out, D, stride_wn, ready_ptr, 1, programs - 1,
                  OUT_BLOCK_N, BLOCK_D, HAS_BIAS, SLEEP_NS, SLOTS, SLOT_STRIDE, ACQUIRE)


def _weight_ok(x: torch.Tensor, weight: torch.Tensor, K: int) -> bool:
    return (weight.dim() == 2 and weight.shape[1] == K and weight.stride(1) == 1 and weight.dtype == x.dtype
            and K <= MAX_K and weight.device == x.device and gemv._kernel_ok(x, weight))


def step_out(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit, norm_weight, ssm_state, ngroups,
             eps, norm_before_gate, out_weight, out_bias=None, *, config=None, block_n=None, num_warps=None):
    """out_proj(mixer_decode_step(...)) for one sequence in one launch (see the module doc).

    Same contract and state updates as `torch_ref.mixer_decode_out`; batch 1 only, in the
    step's fused form (no `split`, no `bc_pre`)."""
    op = "step_out"
    st = step.prepare_step(op, zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit, norm_weight,
                           ssm_state, ngroups, eps, norm_before_gate, None, config)
    if st.b != 1 or st.split or st.bc_pre or st.pdl:
        raise Mamba2Error(f"{op}: batch 1 in the step's one-launch form only")
    if not _weight_ok(st.zxbcdt, out_weight, st.d_inner):
        raise Mamba2Error(f"{op}: out_proj weight {tuple(out_weight.shape)} does not fit")
    n_out = out_weight.shape[0]
    if out_bias is not None and (out_bias.shape != (n_out,) or not out_bias.is_contiguous()):
        raise Mamba2Error(f"{op}: bias of shape {tuple(out_bias.shape)} for {n_out} outputs")
    bn = block_n or int(STREAM_CONFIG["out_block_n"])
    n_items = triton.cdiv(n_out, bn)
    programs = st.programs + n_items
    ready = _counter_for(zxbcdt.device, ("step_out", programs, st.G))
    o = torch.empty((1, n_out), dtype=st.zxbcdt.dtype, device=zxbcdt.device)
    _step_out_kernel[(programs,)](
        *st.args, out_weight, out_bias if out_bias is not None else o, o, ready, n_out, out_weight.stride(0),
        st.programs, programs, **st.constexprs,
        OUT_BLOCK_N=bn, OUT_BLOCK_K=triton.next_power_of_2(st.d_inner), OUT_HAS_BIAS=out_bias is not None,
        SLEEP_NS=_sleep_ns(), SLOTS=SLOTS, SLOT_STRIDE=SLOT_STRIDE,
        ACQUIRE=bool(STREAM_CONFIG["acquire"]), num_warps=num_warps or st.cfg["num_warps"],
    )
    return o


def norm_in(x, residual, norm_weight, eps, residual_in_fp32, weight, bias=None, *, block_n=None, num_warps=None):
    """(linear(add_rmsnorm(x, residual, ...)[0], weight, bias), new residual) for one row, in
    one launch (see the module doc); the same results as the two operations."""
    op = "norm_in"
    Dm = x.shape[-1]
    if x.numel() != Dm or norm_weight.shape != (Dm,) or (residual is not None and residual.shape != x.shape):
        raise Mamba2Error(f"{op}: one row of {Dm} with its residual and norm weight")
    if not _weight_ok(x, weight, Dm):
        raise Mamba2Error(f"{op}: weight {tuple(weight.shape)} does not fit")
    n_out = weight.shape[0]
    if bias is not None and (bias.shape != (n_out,) or not bias.is_contiguous()):
        raise Mamba2Error(f"{op}: bias of shape {tuple(bias.shape)} for {n_out} outputs")
    if residual is not None:
        res_dtype = torch.promote_types(residual.dtype, x.dtype)
    else:
        res_dtype = torch.float32 if residual_in_fp32 else x.dtype
    x1 = x.reshape(Dm).contiguous()
    r1 = residual.reshape(Dm).contiguous() if residual is not None else x1
    write_res = residual is not None or res_dtype != x.dtype
    res_out = torch.empty(x.shape, dtype=res_dtype, device=x.device) if write_res else x
    normed = torch.empty(Dm, dtype=x.dtype, device=x.device)
    bn = block_n or int(STREAM_CONFIG["in_block_n"])
    programs = 1 + triton.cdiv(n_out, bn)
    ready = _counter_for(x.device, ("norm_in", programs))
    y = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    _norm_in_kernel[(programs,)](
        x1, r1, norm_weight, normed, res_out, Dm, float(eps),
        weight, bias if bias is not None else y, y, n_out, weight.stride(0), ready, programs,
        HAS_RES=residual is not None, WRITE_RES=write_res, BLOCK_D=triton.next_power_of_2(Dm),
        OUT_BLOCK_N=bn, HAS_BIAS=bias is not None, SLEEP_NS=_sleep_ns(), SLOTS=SLOTS,
        SLOT_STRIDE=SLOT_STRIDE, ACQUIRE=bool(STREAM_CONFIG["acquire"]), num_warps=num_warps or int(STREAM_CONFIG["norm_warps"]),
    )
    return y, res_out


def norm_linear(x, residual, norm_weight, eps, residual_in_fp32, weight, bias=None):
    """The backend's norm_linear: `norm_in` for one row when STREAM_CONFIG["norm_in"], else gemv's."""
    Dm = x.shape[-1]
    if STREAM_CONFIG["norm_in"] and x.numel() == Dm and _weight_ok(x, weight, Dm):
        return norm_in(x, residual, norm_weight, eps, residual_in_fp32, weight, bias)
    return gemv.norm_linear(x, residual, norm_weight, eps, residual_in_fp32, weight, bias)


def mixer_decode_out(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit, norm_weight, ssm_state,
                     ngroups, eps, norm_before_gate, out_weight, out_bias=None):
    """The backend's mixer_decode_out: `step_out` for one sequence when STREAM_CONFIG["step_out"]
    (and the step's configuration is its one-launch form), else the step, then linear."""
    if (STREAM_CONFIG["step_out"] and zxbcdt.dim() == 2 and zxbcdt.shape[0] == 1
            and _weight_ok(zxbcdt, out_weight, out_weight.shape[-1]) and _one_launch_step()):
        return step_out(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit, norm_weight,
                        ssm_state, ngroups, eps, norm_before_gate, out_weight, out_bias)
    y = step.mixer_decode_step(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit, norm_weight,
                               ssm_state, ngroups, eps, norm_before_gate)
    return gemv.linear(y, out_weight, out_bias)


def _sleep_ns() -> int:
    return 0 if gemv._interpreting() else int(STREAM_CONFIG["sleep_ns"])


def _one_launch_step() -> bool:
    cfg = step.STEP_CONFIG
    return not (cfg["split"] or cfg["bc_pre"] or cfg["pdl"])


__all__ = ["STREAM_CONFIG", "step_out", "norm_in", "norm_linear", "mixer_decode_out"]
