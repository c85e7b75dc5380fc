"""mamba2: generate text with Mamba-2 language models, on this project's own implementation."""

__version__ = "0.1.0"

from .errors import Mamba2Error
from .generate import GenerationEvent, GenerationResult, generate, stream_generate
from .loader import load_model, load_preset

__all__ = [
    "__version__",
    "Mamba2Error",
    "GenerationEvent",
    "GenerationResult",
    "generate",
    "load_model",
    "load_preset",
    "stream_generate",
]
