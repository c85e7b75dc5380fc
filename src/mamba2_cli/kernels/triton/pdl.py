"""Programmatic dependent launch (PDL, Hopper and later), shared by the decode kernels.

A kernel launched with PDL may start while the kernel before it on the stream still runs:
it calls `gdc_launch_dependents()` to let the kernel after it launch in turn, loads what no
kernel in flight writes (weights; the decode step's SSM state only when its caller promises
that no kernel just before wrote it, `state_settled`), and calls `gdc_wait()` before it reads
anything an earlier kernel wrote or writes anything at all. The wait returns once the kernel
before has completed and its memory is visible; since every PDL kernel completes only after
its own wait, completion stays ordered along the whole chain. Which kernels launch this way:
add_rmsnorm of decode's few rows, the matvecs and the decode step (configs.py's "pdl").
griddepcontrol exists from sm_90 on: below that no kernel is compiled with it, whatever
an entry asks.
"""

from __future__ import annotations

import os

import triton

from .configs import capability

try:  # absent from old Triton builds
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except ImportError:  # pragma: no cover
    HAS_PDL = False

    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable(wanted: bool, device) -> bool:
    """Whether a launch on `device` takes PDL when `wanted`: a CUDA GPU of capability 9.0 or
    later, a Triton that has it, and not the interpreter (where the calls are no-ops anyway)."""
    return (bool(wanted) and HAS_PDL and getattr(device, "type", device) == "cuda" and not interpreting()
            and capability(device) >= (9, 0))
