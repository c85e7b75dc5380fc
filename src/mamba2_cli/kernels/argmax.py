"""Triton greedy pick: the argmax of each row of logits, written where the next step reads it.

Greedy decode in a CUDA graph ends with the argmax of lm_head's output. `argmax` takes the
logits as lm_head leaves them (the model dtype; the comparison is the same in fp32, so no
cast kernel comes first), one program per row, and writes the token straight into the
int64 buffer the next step embeds and, if given, into a second buffer: pinned host memory,
which the GPU writes through the mapping CUDA gives pinned memory (no copy after it), or
device memory. Launched with programmatic dependent launch on CUDA, so its program is
resident before lm_head ends.

Ties go to the first index and NaN counts as larger than any number (its first index wins),
as `torch.argmax` has it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import Mamba2Error
from .pdl import gdc_launch_dependents, gdc_wait, usable

# Tiles of up to MAX_BLOCK logits, 32 per thread at 16 warps: 113 registers on sm_90 with 16-byte
# loads (a 32768 tile spills at 16 and at 32 warps). Codestral's 32768 logits take two trips.
MAX_BLOCK = 16384
NUM_WARPS = 16
PDL = True


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, host_ptr, V, stride_x, BLOCK: tl.constexpr, HOST: tl.constexpr,
                   PDL: tl.constexpr):
    row = tl.program_id(0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs = tl.arange(0, BLOCK)
    base = x_ptr + row.to(tl.int64) * stride_x
    best = -float("inf")
    best_i = 0
    nan_i = V  # the first NaN's index; V while none
    for v0 in range(0, V, BLOCK):
        idx = v0 + offs
        x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
        nan_i = tl.minimum(nan_i, tl.min(tl.where(x != x, idx, V), axis=0))
        x = tl.where(x != x, -float("inf"), x)
        m = tl.max(x, axis=0)
        i = tl.min(tl.where(x == m, idx, V), axis=0)  # the first index of the tile's max
        if m > best:  # strictly: an equal later maximum loses to the earlier one
            best = m
            best_i = i
    tok = tl.where(nan_i < V, nan_i, best_i).to(tl.int64)
    tl.store(out_ptr + row, tok)
    if HOST:
        tl.store(host_ptr + row, tok)


def argmax(logits: torch.Tensor, out: torch.Tensor, host: torch.Tensor | None = None) -> torch.Tensor:
    """out[b] = argmax of logits[b, :] (int64); also into `host` (pinned CPU or device memory,
    int64 [b]) if given. logits [b, V] with unit stride along V; returns out."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise Mamba2Error(f"argmax: logits must be [b, V] with contiguous rows, got {list(logits.shape)}")
    b, V = logits.shape
    for name, t in (("out", out), ("host", host)):
        if t is None:
            continue
        if t.dtype != torch.int64 or t.shape != (b,) or not t.is_contiguous():
            raise Mamba2Error(f"argmax: {name} must be a contiguous int64 tensor of shape [{b}]")
    if out.device != logits.device:
        raise Mamba2Error(f"argmax: out is on {out.device}, the logits on {logits.device}")
    if host is not None and host.device != logits.device and not (host.device.type == "cpu" and host.is_pinned()):
        raise Mamba2Error("argmax: host must be pinned CPU memory or on the logits' device")
    if V == 0:
        raise Mamba2Error("argmax: no logits")
    block = min(triton.next_power_of_2(V), MAX_BLOCK)
    pdl = usable(PDL, logits.device)
    _argmax_kernel[(b,)](logits, out, host if host is not None else out, V, logits.stride(0), BLOCK=block,
                         HOST=host is not None, PDL=pdl, num_warps=NUM_WARPS, **({"launch_pdl": True} if pdl else {}))
    return out
