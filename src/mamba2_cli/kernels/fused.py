"""Batch-1 decode: in_proj's matvec and the mixer step in one launch.

At batch 1 a layer is four dependent launches (add_rmsnorm, in_proj, step, out_proj) and
the step (about 9 us on an H200) streams almost nothing while it runs. Here the step waits
inside in_proj's launch instead of behind it:

- Programs [0, n_rows) compute in_proj, BLOCK_N rows each (the `acc` matvec of gemv.py),
  but in group order: for group g its z rows, x rows, B rows, C rows and dt rows, then
  group g + 1. Programs are dispatched in about index order, so the groups finish one
  after another. Each program stores its rows, then adds one to its group's counter
  (release).
- Programs [n_rows, n_rows + n_step) are the step's (`step.mixer_step_program`). Each
  issues its state load, waits until its group's counter reaches the group's program count
  (acquire), then runs as the step kernel does. The group's last program resets the counter.

So the steps of the first groups run while the last groups' weights still stream, and only
the last group's step is left after in_proj's last row. Results are those of the two
launches, bit for bit (the same products in the same order, the same step).

No deadlock: a matvec program never waits, so a waiting step program only needs the
matvec programs of its group to get an SM slot. That holds whatever order the programs
are dispatched in when the step's programs cannot fill every slot; the wrapper checks that
(from the compiled kernel's registers and shared memory) and runs the two launches if not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import step as step_mod
from .gemv import GEMV_CONFIG, _fma, _interpreting, _w_tile, _x_tile, linear

# On by default where it applies (batch 1, 16-bit or fp32 weights of the activation's dtype);
# benchmarks switch it off to compare.
FUSE_INPROJ_STEP = True
# in_proj's batch-1 matvec layout; maxnreg (CUDA only) caps the registers per thread, which the
# step's part raises above the matvec's own (more programs per SM stream more bytes at once).
FUSED_CONFIG = {"BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 4, "maxnreg": None, "poll": 2}

_ready: dict = {}
_capacity: dict = {}


@triton.jit
def _group_rows(v, g, S, d_inner, G, N, hpg):
    """Row of zxbcdt for position v of group g's run (z, x, B, C, dt of the group, in order)."""
    r = v - g * (2 * S + 2 * N + hpg)
    return tl.where(r < S, g * S + r,
                    tl.where(r < 2 * S, d_inner + g * S + (r - S),
                             tl.where(r < 2 * S + N, 2 * d_inner + g * N + (r - 2 * S),
                                      tl.where(r < 2 * S + 2 * N, 2 * d_inner + G * N + g * N + (r - 2 * S - N),
                                               2 * d_inner + 2 * G * N + g * hpg + (r - 2 * S - 2 * N)))))


@triton.jit
def _inproj_step_kernel(
    u_ptr, w_ptr, wb_ptr, n_rows, Kdim, stride_wn,
    zx_ptr, conv_w_ptr, conv_b_ptr, conv_state_ptr, A_ptr, D_ptr, dt_bias_ptr, norm_w_ptr,
    ssm_ptr, out_ptr, ybuf_ptr, ssbuf_ptr, count_ptr, ready_ptr,
    H, P, N, G, heads_per_group, d_inner, eps, dt_lo, dt_hi,
    stride_zx_b, stride_cw_c, stride_cs_b, stride_cs_c, stride_D_h, stride_D_p,
    stride_s_b, stride_s_h, stride_s_p, stride_out_b,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_KW: tl.constexpr,
    K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_GS: tl.constexpr, BLOCK_SS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr, DT_CLAMP: tl.constexpr, POLL: tl.constexpr = 2, SIGNAL: tl.constexpr = True,
):
    """POLL: how the step's programs wait (step.mixer_step_program's WAIT; 0, no wait, and
    SIGNAL False, no count, are wrong on purpose: benchmarks time the launch's parts)."""
    pid = tl.program_id(0)
    S = heads_per_group * P
    rows_per_group = 2 * S + 2 * N + heads_per_group
    n_mv = n_rows // ROWS
    if pid < n_mv:
        # in_proj: ROWS rows of group g (rows_per_group is a multiple of ROWS).
        g = (pid * ROWS) // rows_per_group
        rn = _group_rows(pid * ROWS + tl.arange(0, ROWS), g, S, d_inner, G, N, heads_per_group)
        rk = tl.arange(0, BLOCK_KW)
        n_mask = rn < n_rows
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
        x_ptrs = u_ptr + rk[None, :]
        m_mask = tl.arange(0, 1) < 1
        acc = tl.zeros((ROWS, BLOCK_KW), dtype=tl.float32)
        for k0 in range(0, Kdim, BLOCK_KW):
            w = _w_tile(w_ptrs, k0, Kdim, n_mask, rk, EVEN_K, "")
            acc = _fma(acc, w, _x_tile(x_ptrs, k0, Kdim, m_mask, rk, EVEN_K), True)
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(wb_ptr + rn).to(tl.float32)
        tl.store(zx_ptr + rn, y.to(zx_ptr.dtype.element_ty))
        if SIGNAL:
            # Every thread's rows are stored before the one release that counts them.
            tl.debug_barrier()
            tl.atomic_add(ready_ptr + g, 1, sem="release")
    else:
        step_mod.mixer_step_program(
            pid - n_mv, zx_ptr, conv_w_ptr, conv_b_ptr, conv_state_ptr, A_ptr, D_ptr, dt_bias_ptr, norm_w_ptr,
            ssm_ptr, out_ptr, ybuf_ptr, ssbuf_ptr, count_ptr, count_ptr,
            H, P, N, G, heads_per_group, d_inner, eps, dt_lo, dt_hi,
            stride_zx_b, stride_cw_c, stride_cs_b, stride_cs_c, stride_D_h, stride_D_p,
            stride_s_b, stride_s_h, stride_s_p, stride_out_b,
            K, BLOCK_P, BLOCK_N, BLOCK_K, BLOCK_GS, BLOCK_SS, HAS_CONV_BIAS, NORM_BEFORE_GATE, DT_CLAMP,
            True, False, False, POLL, ready_ptr, rows_per_group // ROWS,
        )


def _step_config(b: int) -> dict:
    cfg = dict(step_mod.STEP_CONFIG)
    for min_batch, over in step_mod.STEP_BATCH_CONFIG:
        if b >= min_batch:
            cfg.update(over)
    return cfg


def fusable(u: torch.Tensor, weight: torch.Tensor, ssm_state: torch.Tensor, ngroups: int) -> bool:
    """Whether `inproj_mixer_step` takes the fused launch for these operands."""
    if not FUSE_INPROJ_STEP or u.numel() != u.shape[-1] or ssm_state.shape[0] != 1:
        return False
    if not (u.is_cuda or _interpreting()) or weight.dtype != u.dtype or weight.stride(-1) != 1:
        return False
    if GEMV_CONFIG[1].kind != "acc" or GEMV_CONFIG[1].evict_first or GEMV_CONFIG[1].prefetch or GEMV_CONFIG[1].pdl:
        return False  # the fused program is the plain `acc` matvec; a changed config is compared unfused
    cfg = _step_config(1)
    if cfg["split"] or cfg["bc_pre"] or cfg["pdl"]:
        return False
    _, H, P, N = ssm_state.shape
    G = int(ngroups)
    return (2 * (H // G) * P + 2 * N + H // G) % FUSED_CONFIG["BLOCK_N"] == 0


def _fits(compiled, device: torch.device, step_programs: int, num_warps: int) -> bool:
    """True when the step's waiting programs cannot fill every program slot of the GPU, so a
    matvec program always finds one (computed from the compiled kernel; `last_fit` keeps the
    figures for benchmarks)."""
    props = torch.cuda.get_device_properties(device)
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()  # loads the module (no launch): the register count is known from then on
    threads = 32 * num_warps
    regs = (max(1, int(getattr(compiled, "n_regs", 255))) + 7) // 8 * 8
    shared = int(getattr(getattr(compiled, "metadata", None), "shared", 0) or 0)
    smem_sm = int(getattr(props, "shared_memory_per_multiprocessor", 0) or 228 * 1024)
    per_sm = min(32, 2048 // threads, 65536 // (regs * threads), smem_sm // max(shared, 1))
    slots = per_sm * props.multi_processor_count
    last_fit.update(regs=regs, shared=shared, per_sm=per_sm, slots=slots, step_programs=step_programs)
    return step_programs < slots


last_fit: dict = {}


def inproj_mixer_step(u, in_weight, in_bias, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit,
                      norm_weight, ssm_state, ngroups, eps, norm_before_gate=False):
    """mixer_decode_step(linear(u, in_weight, in_bias), ...) for one token; one launch at batch 1
    where `fusable` (and the launch fits the GPU), else the two operations. u [1, d_model] is
    the pre-normed hidden row."""
    if fusable(u, in_weight, ssm_state, ngroups):
        out = _fused(u, in_weight, in_bias, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit,
                     norm_weight, ssm_state, ngroups, eps, norm_before_gate)
        if out is not None:
            return out
    zxbcdt = linear(u, in_weight, in_bias)
    return step_mod.mixer_decode_step(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit,
                                      norm_weight, ssm_state, ngroups, eps, norm_before_gate)


def _fused(u, in_weight, in_bias, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit,
           norm_weight, ssm_state, ngroups, eps, norm_before_gate):
    b, H, P, N = ssm_state.shape
    G = int(ngroups)
    Kdim = u.shape[-1]
    d_inner = H * P
    n_rows = 2 * d_inner + 2 * G * N + H
    op = "inproj_mixer_step"
    step_mod._check(in_weight.dim() == 2 and in_weight.shape == (n_rows, Kdim), op,
                    lambda: f"in_proj weight must be [{n_rows}, {Kdim}], got {tuple(in_weight.shape)}")
    step_mod._check(in_bias is None or in_bias.shape == (n_rows,), op, lambda: f"in_proj bias must be [{n_rows}]")
    u = u.reshape(1, Kdim)
    u = u if u.stride(-1) == 1 else u.contiguous()
    zxbcdt = torch.empty((1, n_rows), dtype=u.dtype, device=u.device)
    # The step's own checks (shapes, dtypes, devices) and its launch arguments.
    a = step_mod.step_launch_args(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit,
                                  norm_weight, ssm_state, ngroups, eps, norm_before_gate, _step_config(1))
    key = (str(u.device), G)
    ready = _ready.get(key)
    if ready is None:
        ready = _ready[key] = torch.zeros((1, G), dtype=torch.int32, device=u.device)
    rows = FUSED_CONFIG["BLOCK_N"]
    block_kw = min(FUSED_CONFIG["BLOCK_K"], triton.next_power_of_2(Kdim))
    n_step = a["grid"]
    args = (u, in_weight, in_bias if in_bias is not None else u, n_rows, Kdim, in_weight.stride(0),
            *a["tensors"][:13], ready, *a["scalars"])
    kwargs = dict(HAS_BIAS=in_bias is not None, EVEN_K=Kdim % block_kw == 0, ROWS=rows, BLOCK_KW=block_kw,
                  **a["constexprs"], POLL=int(FUSED_CONFIG["poll"]), SIGNAL=bool(FUSED_CONFIG.get("signal", True)),
                  num_warps=FUSED_CONFIG["num_warps"])
    grid = (n_rows // rows + n_step,)
    if u.is_cuda and not _interpreting():
        if FUSED_CONFIG.get("maxnreg"):
            kwargs["maxnreg"] = int(FUSED_CONFIG["maxnreg"])
        # Compile without running first: a launch whose waiting programs could fill the GPU is
        # never made (the two launches run instead).
        ckey = (str(u.device), n_step, tuple(sorted((k, v) for k, v in kwargs.items())))
        ok = _capacity.get(ckey)
        if ok is None:
            compiled = _inproj_step_kernel.warmup(*args, grid=grid, **kwargs)
            ok = _capacity[ckey] = _fits(compiled, u.device, n_step, FUSED_CONFIG["num_warps"])
        if not ok:
            return None
    _inproj_step_kernel[grid](*args, **kwargs)
    return a["out"]
