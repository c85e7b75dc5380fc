"""Backends: the operations the model calls, with one signature per operation.

A backend is a module that provides these functions (see `pytorch`, the PyTorch backend,
for the exact semantics of each; `triton` is the GPU backend):

    linear(x, proj) -> x @ proj.weight^T + proj.bias
        The projections; a fast backend streams weights for the few-row products of decode.
    ssd_prefill(x, dt, A, B, C, D, dt_bias, dt_limit, chunk_size, initial_state=None,
                seq_len=None, final_state=None)
        -> (y [b, L, H, P] in x.dtype, final_state [b, H, P, N] fp32)
        Chunked SSD scan of a whole prompt, continuing from `initial_state`. `final_state`,
        if given, receives the result and may be `initial_state` itself (in place).
    ssd_decode_step(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_state) -> y [b, H, P]
        One token; updates `ssm_state` [b, H, P, N] fp32 in place.
    causal_conv1d(xBC, weight, bias, conv_state, seq_len=None) -> [b, L, C]
        Depthwise causal conv + SiLU over a prompt from `conv_state` [b, C, K-1];
        overwrites conv_state with the last K-1 inputs (before position seq_len).
    conv1d_step(xBC, weight, bias, conv_state) -> [b, C]
        One token of the same; shifts conv_state in place.
    gated_rmsnorm(y, z, weight, group_size, eps, norm_before_gate=False) -> like y
    add_rmsnorm(x, residual, weight, eps, residual_in_fp32=True) -> (normed, residual)
    norm_linear(x, residual, norm_weight, eps, residual_in_fp32, proj)
        -> (linear(add_rmsnorm(...)[0], proj), residual): the pre-norm and the projection
        after it (decode's in_proj and lm_head), which a backend may fuse.
    mixer_decode_step(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit,
                      norm_weight, ssm_state, ngroups, eps, norm_before_gate,
                      *, state_settled=False) -> [b, d_inner]
        Everything of one decode token between in_proj and out_proj: conv window update,
        conv + SiLU, dt softplus/clamp, state update in place, y = S C + D x, gated norm.
        state_settled: no kernel launched just before the call wrote ssm_state (the model's
        decode passes it: each token starts with the embedding's plain launch).

seq_len (prefill operations): None, or an integer tensor [b] on the device: row i holds
seq_len[i] real positions, then padding that is never read (the SSM state passes through
it, the conv state is taken before it; y there is zero). Read on the device, so a CUDA
graph captured for L positions serves every shorter prompt (generation.PrefillGraphs).

Layouts: x [b, L, H, P]; dt [b, L, H] (raw, before softplus and dt_bias); A [H] fp32,
already -exp(A_log); B, C [b, L, G, N] with head h reading group h // (H / G);
D [H] or [H, P]; conv weight [C, K]; conv_state [b, C, K-1] oldest input first.

Weights: `proj` is the projection itself (`mamba2_cli.linear.Linear`), never its raw
tensors, so the model does not know how a weight is stored. A plain Linear holds `weight`
[out, in] in the model dtype and `bias` [out] or None; both backends read those. A weight
stored another way (quantized, sharded) is a sibling class, in its own module, that the
backends recognise by type and dispatch on; model.py stays as it is.

A backend may implement an operation by composing others (pytorch composes
mixer_decode_step from the step operations); a fast backend fuses it into few launches.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from ..errors import Mamba2Error

BACKENDS = ("torch", "triton")


def triton_available(device_type: str) -> tuple[bool, str]:
    """Whether the triton backend can run on this device type, and why not."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type != "cuda" and not (interpret and device_type == "cpu"):
        return False, "the triton backend needs an NVIDIA GPU (or TRITON_INTERPRET=1 on CPU)"
    try:
        importlib.import_module("triton")
    except ImportError:
        return False, "the triton backend needs the `triton` package (pip install triton)"
    return True, ""


def describe_device(device) -> dict:
    """The GPU, its architecture and the Triton launch-configuration table it gets, for `info`,
    `bench` and error messages: {"gpu": "NVIDIA H100 80GB HBM3", "architecture": "sm_90 (Hopper)",
    "kernel_table": "table 9.0" | "fallback"}; None each off CUDA (the table: without triton)."""
    if getattr(device, "type", device) != "cuda":
        return {"gpu": None, "architecture": None, "kernel_table": None}
    import torch

    try:
        from .triton import configs
    except ImportError:
        cap = tuple(torch.cuda.get_device_capability(device))
        return {"gpu": torch.cuda.get_device_name(device), "architecture": f"sm_{cap[0]}{cap[1]}",
                "kernel_table": None}
    cap = configs.capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "architecture": configs.architecture(cap),
            "kernel_table": configs.table_name(cap)}


# Triton's kernel objects: compiled (JITFunction) or run by the CPU interpreter.
_KERNEL_TYPES = ("JITFunction", "InterpretedFunction")


def kernel_failure(exc: BaseException) -> str | None:
    """The one-line message for an exception raised while a Triton kernel compiled or launched
    (found on its traceback): the GPU, the kernel and the way around it. None for any other."""
    kernel, tb = None, exc.__traceback__
    while tb is not None and kernel is None:
        obj = tb.tb_frame.f_locals.get("self")
        if type(obj).__name__ in _KERNEL_TYPES and type(obj).__module__.startswith("triton"):
            kernel = getattr(obj, "__name__", None) or getattr(getattr(obj, "fn", None), "__name__", "?")
        tb = tb.tb_next
    if kernel is None:
        return None
    import torch

    if torch.cuda.is_available():
        d = describe_device(torch.device("cuda", torch.cuda.current_device()))
        where = f"{d['gpu']}, {d['architecture']}, kernels {d['kernel_table']}"
    else:
        where = "the CPU interpreter"
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return (f"the Triton kernel {kernel} failed to compile or launch on {where} ({reason[:200]}); "
            f"run with --backend torch")


def get_backend(name: str, device_type: str = "cpu") -> ModuleType:
    """'torch' | 'triton' | 'auto' -> the backend module. auto = triton on CUDA, else torch."""
    if name == "auto":
        ok, _ = triton_available(device_type)
        name = "triton" if ok and device_type == "cuda" else "torch"
    if name == "torch":
        from . import pytorch

        return pytorch
    if name == "triton":
        ok, why = triton_available(device_type)
        if not ok:
            raise Mamba2Error(why)
        return importlib.import_module(".triton", __name__)
    raise Mamba2Error(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")

