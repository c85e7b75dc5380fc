"""Triton norms: residual add + RMSNorm, and the gated per-group RMSNorm of the mixer.

Both compute in fp32 and write their output in the input dtype; one program per row (and
per group), the whole row in one tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import Mamba2Error
from .configs import config_for, warps_for
from .pdl import gdc_launch_dependents, gdc_wait, usable

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, M, D, eps,
    stride_x, stride_res, stride_out, stride_res_out,
    HAS_RES: tl.constexpr, WRITE_RES: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """ROWS rows per program, one [ROWS, BLOCK_D] tile. PDL (decode): the next kernel may
    launch at once, and the norm weight is loaded before the wait for the kernel that wrote x,
    so the matvec after this one loads its weights meanwhile."""
    if PDL:
        gdc_launch_dependents()
    row = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    offs = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs < D) & (row < M)
    # Loaded before the residual's store: a load after a store waits for it (they might alias).
    w = tl.load(w_ptr + offs, mask=offs < D, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()  # x (and the residual) come from the kernels before
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32) + x
    else:
        r = x
    if WRITE_RES:
        # The norm reads the residual as stored (rounded, when it is not fp32).
        r = r.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + offs, r, mask=mask)
        r = r.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(r * r, axis=1) / D + eps)[:, None]
    tl.store(out_ptr + row * stride_out + offs, (r * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rmsnorm_kernel(
    y_ptr, z_ptr, w_ptr, out_ptr, M, group_size, eps,
    stride_y, stride_z, stride_out,
    NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    # ROWS rows of one group per program, one [ROWS, BLOCK] tile.
    row = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    col = (tl.program_id(1) * group_size + tl.arange(0, BLOCK))[None, :]
    mask = (tl.arange(0, BLOCK) < group_size)[None, :] & (row < M)
    wmask = col < (tl.program_id(1) + 1) * group_size
    y = tl.load(y_ptr + row * stride_y + col, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * stride_z + col, mask=mask, other=0.0).to(tl.float32)
    gate = z * tl.sigmoid(z)
    if not NORM_BEFORE_GATE:
        y = y * gate
    rstd = tl.math.rsqrt(tl.sum(y * y, axis=1) / group_size + eps)[:, None]
    w = tl.load(w_ptr + col, mask=wmask, other=0.0).to(tl.float32)
    out = y * rstd * w
    if NORM_BEFORE_GATE:
        out = out * gate
    tl.store(out_ptr + row * stride_out + col, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(cond: bool, op: str, msg) -> None:
    """Raise a Mamba2Error when cond is false; msg may be a callable, formatted only then."""
    if not cond:
        raise Mamba2Error(f"{op}: {msg() if callable(msg) else msg}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [rows, d] with unit stride in d (a view where the layout allows)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def add_rmsnorm(x, residual, weight, eps, residual_in_fp32=True):
    """residual += x (new tensor; fp32 when asked); returns (RMSNorm(residual) * w, residual).

    Same contract as `pytorch.add_rmsnorm`: the normed output is in x.dtype; without a
    residual the residual is x (as fp32 when residual_in_fp32).
    """
    op = "add_rmsnorm"
    _check(x.dtype in _FLOAT_DTYPES, op, lambda: f"unsupported dtype {x.dtype}")
    D = x.shape[-1]
    _check(weight.shape == (D,), op, lambda: f"weight must be [{D}], got {tuple(weight.shape)}")
    if residual is not None:
        _check(residual.shape == x.shape, op, lambda: f"residual shape {tuple(residual.shape)} != x {tuple(x.shape)}")
        _check(residual.dtype in _FLOAT_DTYPES, op, lambda: f"unsupported residual dtype {residual.dtype}")
        res_dtype = torch.promote_types(residual.dtype, x.dtype)
    else:
        res_dtype = torch.float32 if residual_in_fp32 else x.dtype
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    write_res = residual is not None or res_dtype != x.dtype
    res_out = torch.empty(x.shape, dtype=res_dtype, device=x.device) if write_res else x
    res2 = _rows(residual) if residual is not None else x2
    M = x2.shape[0]
    if M:
        cfg = config_for(x.device, "norm", "add")
        BLOCK = triton.next_power_of_2(D)
        rows = min(cfg["ROWS"], triton.next_power_of_2(M))
        pdl = usable(M <= cfg["pdl_max_rows"], x.device)
        _add_rmsnorm_kernel[(triton.cdiv(M, rows),)](
            x2, res2, weight, out, res_out, M, D, float(eps),
            x2.stride(0), res2.stride(0), D, D,
            HAS_RES=residual is not None, WRITE_RES=write_res, BLOCK_D=BLOCK, ROWS=rows,
            PDL=pdl, num_warps=warps_for(cfg["warps_by_width"], BLOCK * rows), **({"launch_pdl": True} if pdl else {}),
        )
    return out, res_out


def gated_rmsnorm(y, z, weight, group_size, eps, norm_before_gate=False):
    """Per-group RMSNorm gated by silu(z); same contract as `pytorch.gated_rmsnorm`."""
    op = "gated_rmsnorm"
    _check(y.dtype in _FLOAT_DTYPES, op, lambda: f"unsupported dtype {y.dtype}")
    _check(z.shape == y.shape, op, lambda: f"z shape {tuple(z.shape)} != y {tuple(y.shape)}")
    d = y.shape[-1]
    _check(weight.shape == (d,), op, lambda: f"weight must be [{d}], got {tuple(weight.shape)}")
    _check(group_size > 0 and d % group_size == 0, op, lambda: f"group_size {group_size} must divide {d}")
    y2, z2 = _rows(y), _rows(z)
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    M = y2.shape[0]
    if M:
        cfg = config_for(y.device, "norm", "gated")
        BLOCK = triton.next_power_of_2(group_size)
        rows = min(cfg["ROWS"], triton.next_power_of_2(M))
        _gated_rmsnorm_kernel[(triton.cdiv(M, rows), d // group_size)](
            y2, z2, weight, out, M, group_size, float(eps), y2.stride(0), z2.stride(0), d,
            NORM_BEFORE_GATE=bool(norm_before_gate), BLOCK=BLOCK, ROWS=rows,
            num_warps=warps_for(cfg["warps_by_width"], BLOCK * rows),
        )
    return out
