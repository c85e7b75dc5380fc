"""One request inside the loop: its prompt ids, sampler, detokenizer, stop conditions, clocks."""

from __future__ import annotations

import resource
from typing import Sequence

import torch

from ..errors import Mamba2Error
from ..model import Mamba2LM
from ..tokenizer import Tokenizer
from .sampling import SamplingParams
from .types import GenerationEvent, GenerationResult, Request


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class StopMatcher:
    """Holds back text that may be the start of a stop string; cuts at the first match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, chunk: str) -> str:
        self.text += chunk
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.flush()
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = len(self.text) - hold
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


class LiveSequence:
    """A request being generated: what the loop keeps for it from prefill to its result."""

    def __init__(self, req: Request, tokenizer: Tokenizer, model: Mamba2LM):
        self.params = SamplingParams(req.temperature, req.top_k, req.top_p, req.min_p,
                                     req.repetition_penalty).check()
        if req.max_tokens < 0:
            raise Mamba2Error(f"max tokens must be >= 0, got {req.max_tokens}")
        self.max_tokens = req.max_tokens
        self.prompt_ids = req.prompt_ids(tokenizer)
        device, vocab = model.device, model.cfg.vocab_size
        if max(self.prompt_ids) >= vocab or min(self.prompt_ids) < 0:
            raise Mamba2Error(f"prompt token id out of range for a vocabulary of {vocab}")
        self.generator = None
        if not self.params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(req.seed if req.seed is not None else int(torch.seed() % 2**63))
        self.seen = None
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(self.prompt_ids, device=device)] = True
        self.eos_ids = set() if req.ignore_eos else tokenizer.eos_ids
        self.detok = tokenizer.stream(self.prompt_ids)
        self.stops = StopMatcher(req.stop)
        self.generated: list[int] = []
        self.finish = "length"
        self.prefill_s = 0.0
        self.t_first: float | None = None

    def accept(self, tid: int, cancelled: bool) -> tuple[GenerationEvent | None, bool]:
        """Take a sampled token: the event to yield (if any), and whether the sequence is done.

        A finished sequence's last token is never fed to the model: the state ends holding
        prompt + generated[:-1], which is what a state file saved after generation records.
        """
        self.generated.append(tid)
        if tid in self.eos_ids:
            self.finish = "eos"
            return None, True
        piece = self.detok.step(tid)
        text = self.stops.feed(piece) if piece else ""
        if self.stops.stopped:
            self.finish = "stop"
            return (GenerationEvent(text, tid) if text else None), True
        if len(self.generated) >= self.max_tokens:
            return GenerationEvent(text, tid), True
        if cancelled:
            self.finish = "cancelled"
            return GenerationEvent(text, tid), True
        return GenerationEvent(text, tid), False

    def final_event(self, t0: float, t_end: float, device: torch.device) -> GenerationEvent:
        tail = ""
        if not self.stops.stopped:
            rest = self.detok.flush()  # an unfinished UTF-8 character decodes as U+FFFD, as a full decode has it
            tail = self.stops.feed(rest) if rest else ""
            tail += "" if self.stops.stopped else self.stops.flush()
            if self.stops.stopped:
                self.finish = "stop"
        n_decode = max(len(self.generated) - 1, 0)
        decode_s = t_end - self.t_first if self.t_first is not None else 0.0
        stats = {
            "prefill_s": self.prefill_s,
            "prefill_tok_s": len(self.prompt_ids) / self.prefill_s if self.prefill_s > 0 else None,
            "ttft_s": (self.t_first - t0) if self.t_first is not None else None,
            "decode_s": decode_s,
            "decode_tok_s": n_decode / decode_s if n_decode and decode_s > 0 else None,
            "peak_memory_bytes": peak_memory_bytes(device),
        }
        result = GenerationResult(self.stops.text, self.generated, len(self.prompt_ids), self.finish, stats)
        return GenerationEvent(tail, None, result)
