"""mamba2: generate text with Mamba-2 language models, on this project's own implementation."""

import sys
import types

__version__ = "0.1.0"

from .errors import Mamba2Error  # noqa: E402

# The model side imports torch (seconds); `mamba2 download`, `models` and `version` need none
# of it, so these names are imported on first use.
_LAZY = {
    "GenerationEvent": ".generate",
    "GenerationResult": ".generate",
    "Request": ".generate",
    "generate": ".generate",
    "generate_batch": ".generate",
    "stream_batch": ".generate",
    "stream_generate": ".generate",
    "load_model": ".loader",
    "load_preset": ".loader",
    "SavedState": ".statefile",
    "load_state": ".statefile",
    "save_state": ".statefile",
}


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing a submodule sets it as an attribute of the package; `mamba2_cli.generate`
        # stays the function, as it was when this file imported it eagerly.
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == "." + name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
