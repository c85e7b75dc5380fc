"""The sampling settings a request falls back on when it leaves them out."""

from __future__ import annotations

import json
from pathlib import Path

# OpenAI's defaults, for models whose generation_config.json names none.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}
_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(model_dir: Path | None) -> dict:
    """The model's generation_config.json sampling keys over OpenAI's defaults.

    `do_sample: false` there means greedy decoding, whatever temperature it names.
    """
    defaults = dict(OPENAI_DEFAULTS)
    if model_dir is None:
        return defaults
    try:
        cfg = json.loads((Path(model_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return defaults
    if not isinstance(cfg, dict):
        return defaults
    for key in _KEYS:
        v = cfg.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            defaults[key] = v
    if cfg.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults
