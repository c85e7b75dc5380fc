"""mamba2: generate text with Mamba-2 language models, on this project's own implementation."""

__version__ = "0.1.0"

from .errors import Mamba2Error
from .generate import (GenerationEvent, GenerationResult, Request, generate, generate_batch, stream_batch,
                       stream_generate)
from .loader import load_model, load_preset
from .statefile import SavedState, load_state, save_state

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
