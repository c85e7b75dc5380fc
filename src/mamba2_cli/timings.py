"""One-time work of a process, timed: CUDA graph capture and Triton kernel compilation.

`first_token_work()` gives the seconds spent so far on each; the CLI's statistics report
them beside the load's read and place. Compilation is timed through Triton's JIT hooks
(around each compile, a disk-cache hit included); capture through `phase("graph_capture")`
around each capture, its compiles counted as compilation only.
"""

from __future__ import annotations

import contextlib
import glob
import os
import threading
import time

_totals = {"graph_capture": 0.0, "compile": 0.0}
_compile_started = threading.local()
_installed = False


def first_token_work() -> dict:
    """{'graph_capture_s': ..., 'compile_s': ...}: seconds this process has spent on each."""
    return {f"{k}_s": v for k, v in _totals.items()}


@contextlib.contextmanager
def phase(name: str):
    """Add the wall time of the block to `name`, less the compilation inside it."""
    t0, c0 = time.perf_counter(), _totals["compile"]
    try:
        yield
    finally:
        _totals[name] += time.perf_counter() - t0 - (_totals["compile"] - c0)


def _before_compile(*args, **kwargs):
    _compile_started.t = time.perf_counter()
    return False  # go on and compile


def _after_compile(*args, **kwargs):
    t = getattr(_compile_started, "t", None)
    if t is not None:
        _totals["compile"] += time.perf_counter() - t
        _compile_started.t = None


def watch_compiles() -> None:
    """Time every Triton compile of this process from now on (Triton's JIT hooks, where they
    are free; a hook someone else installed is left alone)."""
    global _installed
    if _installed:
        return
    try:
        from triton import knobs
    except ImportError:
        return
    rt = knobs.runtime
    if getattr(rt, "jit_cache_hook", None) is None and getattr(rt, "jit_post_compile_hook", None) is None:
        rt.jit_cache_hook, rt.jit_post_compile_hook = _before_compile, _after_compile
        _installed = True


def kernel_names() -> set[str]:
    """The names of the triton backend's kernels (the JIT functions named *_kernel; under
    TRITON_INTERPRET=1 their interpreted stand-ins)."""
    from .kernels.triton import conv, decode_step, matvec, norm, quant_matvec, ssd

    return {obj.fn.__name__ for mod in (conv, decode_step, matvec, norm, quant_matvec, ssd) for obj in vars(mod).values()
            if type(obj).__module__.startswith("triton.") and getattr(getattr(obj, "fn", None), "__name__", "")
            .endswith("_kernel")}


def cache_has_our_kernels(cache_dir: str | None = None) -> bool:
    """Whether Triton's on-disk cache holds any compiled kernel of ours: none means this
    process compiles them all (seconds before the first token)."""
    if cache_dir is None:
        try:
            from triton import knobs

            cache_dir = knobs.cache.dir
        except (ImportError, AttributeError):  # a Triton without knobs: say nothing
            return True
    if not cache_dir or not os.path.isdir(cache_dir):
        return False
    return any(glob.glob(os.path.join(glob.escape(cache_dir), "*", f"{name}.json")) for name in kernel_names())
