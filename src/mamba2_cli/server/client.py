"""The client side of `mamba2 run --server` and `mamba2 chat --server`: OpenAI's streaming
API over the standard library's HTTP, so a bare install reaches a server without the
`serve` extra or the model."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import Mamba2Error


# GenerationEvent and GenerationResult's fields, without importing the generation package
# (and torch with it): `run --server` starts in a fraction of a second.
@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    stats: dict = field(default_factory=dict)


@dataclass
class GenerationEvent:
    text: str
    token_id: int | None
    result: GenerationResult | None = None


class ServerClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 3600.0):
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            self.url = "http://" + self.url
        self.api_key = api_key if api_key is not None else os.environ.get("MAMBA2_API_KEY")
        self.timeout = timeout
        self._model: str | None = None

    def _open(self, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except Exception:  # noqa: BLE001: not our server's error object; the status says enough
                message = e.reason
            raise Mamba2Error(f"the server at {self.url} answered {e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise Mamba2Error(f"cannot reach the server at {self.url}: {reason}") from None

    @property
    def model(self) -> str:
        """The id of the model the server serves."""
        if self._model is None:
            with self._open("/v1/models") as r:
                self._model = json.loads(r.read())["data"][0]["id"]
        return self._model

    def stream(self, path: str, body: dict, cancel: Callable[[], bool] | None = None) -> Iterator[GenerationEvent]:
        """POST a streaming request; GenerationEvents as the text arrives, the last one with
        a GenerationResult (its token_ids empty: the API sends text) and the usage in stats."""
        body = {"model": self.model, **body, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        t_first = None
        text, finish, use, pieces = [], "length", {}, 0
        cancelled = False
        with self._open(path, body) as r:
            for line in r:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    use = chunk["usage"]
                for choice in chunk.get("choices", ()):
                    piece = choice.get("text")
                    if piece is None:
                        piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if t_first is None:
                            t_first = time.perf_counter()
                        pieces += 1
                        text.append(piece)
                        yield GenerationEvent(piece, None)
                    finish = choice.get("finish_reason") or finish
                if cancel is not None and cancel():  # closing the connection ends the sequence on the server
                    cancelled, finish = True, "cancelled"
                    break
        t_end = time.perf_counter()
        generated = use.get("completion_tokens", pieces)
        decode_s = t_end - t_first if t_first is not None else 0.0
        stats = {
            "prefill_s": None, "prefill_tok_s": None,
            "ttft_s": t_first - t0 if t_first is not None else None, "decode_s": decode_s,
            "decode_tok_s": (generated - 1) / decode_s if generated > 1 and decode_s > 0 and not cancelled else None,
            "cached_tokens": (use.get("prompt_tokens_details") or {}).get("cached_tokens"),
            "completion_tokens": generated,
        }
        result = GenerationResult("".join(text), [], use.get("prompt_tokens", 0), finish, stats)
        yield GenerationEvent("", None, result)


class _ServerTemplate:
    """What the chat REPL asks of a template: the server's is not visible from here."""

    is_fallback = False

    @staticmethod
    def shows_system_prompt() -> bool:
        return True


class RemoteChatSession:
    """ChatSession's surface for the REPL, with the conversation kept here and each turn
    sent whole to the server, whose prefix cache reads only the new turn."""

    def __init__(self, client: ServerClient, system: str | None = None, **settings):
        self.client = client
        self.system = system or None
        self.settings = settings
        self.template = _ServerTemplate()
        self.messages: list[dict] = []
        self.last_turn: dict = {}
        self._context = 0

    def send(self, text: str, cancel: Callable[[], bool] | None = None) -> Iterator[GenerationEvent]:
        user = {"role": "user", "content": text}
        system = [{"role": "system", "content": self.system}] if self.system else []
        settings = dict(self.settings)
        if settings.get("seed") is not None:
            settings["seed"] += sum(m["role"] == "assistant" for m in self.messages)
        body = {"messages": system + self.messages + [user], **settings}
        for event in self.client.stream("/v1/chat/completions", body, cancel):
            if event.result is not None:
                r = event.result
                self.messages += [user, {"role": "assistant", "content": r.text}]
                cached = r.stats["cached_tokens"] or 0
                self._context = r.prompt_tokens + r.stats["completion_tokens"]
                self.last_turn = {"prefill_tokens": r.prompt_tokens - cached, "reread": bool(self.messages[:-2]) and
                                  not cached, "reply_tokens": r.stats["completion_tokens"],
                                  "finish_reason": r.finish_reason, **r.stats}
            yield event

    def reset(self) -> None:
        self.messages, self.last_turn, self._context = [], {}, 0

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    @property
    def context_tokens(self) -> int:
        return self._context

    def save(self, path) -> None:
        raise Mamba2Error("/save and /load need the model state, which stays on the server; "
                          "chat without --server for them")

    load = save
