"""What goes into generation and what comes out: Request, GenerationEvent, GenerationResult."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..errors import Mamba2Error
from ..tokenizer import Tokenizer
from .sampling import SamplingParams


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "length" | "eos" | "stop" | "cancelled"
    stats: dict = field(default_factory=dict)


@dataclass
class GenerationEvent:
    text: str  # text that became printable with this token ('' while a character or stop string is pending)
    token_id: int | None
    result: GenerationResult | None = None  # set on the last event only


@dataclass
class Request:
    """One sequence to generate: its prompt and its own settings (a batch may mix them).

    `prompt` is text or token ids used as they are. `last_token` continues a saved state
    (see statefile.py): the state holds everything before it, it is fed first, the text
    prompt is encoded without a BOS, and the prompt may then be empty (None): generation
    simply continues.
    """

    prompt: str | Sequence[int] | None
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    last_token: int | None = None

    def prompt_ids(self, tokenizer: Tokenizer) -> list[int]:
        continuing = self.last_token is not None
        if self.prompt is None or isinstance(self.prompt, str) and not self.prompt:
            ids = []
        elif isinstance(self.prompt, str):
            ids = tokenizer.encode(self.prompt, add_bos=False if continuing else None)  # no BOS mid-text
        else:
            ids = [int(i) for i in self.prompt]
        ids = [int(self.last_token)] + ids if continuing else ids
        if not ids:
            raise Mamba2Error("the prompt is empty")
        return ids

    # Settings a JSON line may give per prompt, with their types.
    JSON_KEYS = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
                 "repetition_penalty": float, "seed": int, "stop": list, "ignore_eos": bool}

    @classmethod
    def from_json(cls, obj, defaults: dict, where: str) -> "Request":
        """A request from one JSONL object: {"prompt": ..., and any of JSON_KEYS}; the rest from `defaults`."""
        if not isinstance(obj, dict):
            raise Mamba2Error(f"{where}: expected a JSON object with a \"prompt\"")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise Mamba2Error(f"{where}: \"prompt\" must be a non-empty string")
        settings = dict(defaults)
        for key, value in obj.items():
            if key == "prompt":
                continue
            kind = cls.JSON_KEYS.get(key)
            if kind is None:
                raise Mamba2Error(f"{where}: unknown key {key!r} (known: prompt, {', '.join(cls.JSON_KEYS)})")
            if key == "stop" and isinstance(value, str):
                value = [value]
            ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))
                  or kind is float and isinstance(value, int) and not isinstance(value, bool))
            if key == "stop":
                ok = ok and all(isinstance(v, str) for v in value)
            if key == "seed" and value is None:
                ok = True
            if not ok:
                raise Mamba2Error(f"{where}: {key!r} must be {'a list of strings' if kind is list else kind.__name__}")
            settings[key] = value
        req = cls(prompt, **settings)
        try:
            SamplingParams(req.temperature, req.top_k, req.top_p, req.min_p, req.repetition_penalty).check()
        except Mamba2Error as e:
            raise Mamba2Error(f"{where}: {e}") from None
        if req.max_tokens < 0:
            raise Mamba2Error(f"{where}: max_tokens must be >= 0")
        return req
