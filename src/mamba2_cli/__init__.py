"""mamba2: generate text with Mamba-2 language models, on this project's own implementation."""

__version__ = "0.1.0"

from .errors import Mamba2Error  # noqa: E402

# The model side imports torch (seconds); `mamba2 download`, `models` and `version` need none
# of it, so these names are imported on first use.
_LAZY = {
    "GenerationEvent": ".generation",
    "GenerationResult": ".generation",
    "Request": ".generation",
    "generate": ".generation",
    "generate_batch": ".generation",
    "stream_batch": ".generation",
    "stream_generate": ".generation",
    "load_model": ".loader",
    "load_preset": ".loader",
    "SavedState": ".statefile",
    "load_state": ".statefile",
    "save_state": ".statefile",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "Mamba2Error",
    "GenerationEvent",
    "GenerationResult",
    "Request",
    "SavedState",
    "generate",
    "generate_batch",
    "load_model",
    "load_preset",
    "load_state",
    "save_state",
    "stream_batch",
    "stream_generate",
]
