"""The sampling settings a request falls back on when it leaves them out."""

from __future__ import annotations

from pathlib import Path

# OpenAI's defaults, for models without a generation_config.json.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}


def sampling_defaults(model_dir: Path | None) -> dict:
    """The model's generation_config.json, read as `mamba2 run` and transformers read it (greedy
    unless it says `do_sample: true`), else OpenAI's defaults."""
    from ..config import generation_defaults

    if model_dir is None or not (Path(model_dir) / "generation_config.json").is_file():
        return dict(OPENAI_DEFAULTS)
    return {"temperature": 0.0, **generation_defaults(model_dir)}
