"""The generation loop: prefill, decode one token at a time, stop. One loop for every caller.

    prefill(model, ids, state)            -> logits of the last position; state advanced
    decode_one_token(model, tokens, state) -> logits of the next position; state advanced
    stream_generate(model, tokenizer, prompt, ...) yields GenerationEvent as text appears
    generate(...)                          -> GenerationResult (the last event's result)
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .errors import Mamba2Error
from .model import Mamba2LM
from .sampling import SamplingParams, sample
from .state import Mamba2State
from .tokenizer import Tokenizer

# Longest piece of prompt run through the model at once. Prefill continues from the state,
# so pieces give the same result as the whole while memory stays bounded.
DEFAULT_PREFILL_CHUNK = 4096


@torch.inference_mode()
def prefill(model: Mamba2LM, input_ids: torch.Tensor, state: Mamba2State,
            chunk_tokens: int = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
    """Run input_ids [B, L] (L >= 1) through the model from `state`; logits [B, V] of the last position."""
    L = input_ids.shape[1]
    if L == 0:
        raise Mamba2Error("nothing to prefill: the prompt has no tokens")
    logits = None
    for start in range(0, L, chunk_tokens):
        piece = input_ids[:, start : start + chunk_tokens]
        logits = model(piece, state, logits_to_keep=1)
    return logits[:, -1]


@torch.inference_mode()
def decode_one_token(model: Mamba2LM, tokens: torch.Tensor, state: Mamba2State) -> torch.Tensor:
    """tokens [B] -> logits [B, V] of the next position."""
    return model(tokens.view(-1, 1), state)[:, -1]


class DecodeGraph:
    """The decode step of the whole model for one state, captured once as a CUDA graph.

    Input tokens, state and logits live in static buffers; a call copies the tokens in and
    replays embedding, every layer, the final norm and lm_head in one launch. Warm-up runs
    before the capture (compiling kernels, allocating scratch) advance the state, so it is
    saved and put back.
    """

    def __init__(self, model: Mamba2LM, state: Mamba2State):
        device = model.device
        self.state = state
        self.tokens = torch.zeros(state.batch_size, dtype=torch.long, device=device)
        saved = state.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                decode_one_token(model, self.tokens, state)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), torch.cuda.graph(self.graph):
                self.logits = decode_one_token(model, self.tokens, state)
        except Exception as e:
            raise Mamba2Error(f"CUDA graph capture of the decode step failed ({e}); "
                              "run with --no-cuda-graph to decode without it") from None
        state.copy_(saved)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens.view(-1))
        self.graph.replay()
        return self.logits


def owned_state(model: Mamba2LM, batch_size: int) -> Mamba2State:
    """A zeroed state the model keeps for callers that bring none, reused from call to call
    so its CUDA graph is captured once."""
    states = model.__dict__.setdefault("_owned_states", {})
    if batch_size not in states:
        states[batch_size] = model.new_state(batch_size)
    states[batch_size].reset()
    return states[batch_size]


def decode_step_fn(model: Mamba2LM, state: Mamba2State, cuda_graph: bool = True):
    """tokens [B] -> logits [B, V], advancing `state`: a CUDA graph replay on GPUs (captured
    once per model and state, then cached), the eager forward elsewhere."""
    if model.device.type != "cuda" or not cuda_graph:
        return lambda tokens: decode_one_token(model, tokens, state)
    cache = model.__dict__.setdefault("_decode_graphs", {})
    key = (state.ssm.data_ptr(), state.conv.data_ptr(), state.batch_size, model.backend_name)
    if key not in cache:
        cache[key] = DecodeGraph(model, state)
    return cache[key]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "length" | "eos" | "stop"
    stats: dict = field(default_factory=dict)


@dataclass
class GenerationEvent:
    text: str  # text that became printable with this token ('' while a character or stop string is pending)
    token_id: int | None
    result: GenerationResult | None = None  # set on the last event only


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _StopMatcher:
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


def stream_generate(
    model: Mamba2LM,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    state: Mamba2State | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    cuda_graph: bool = True,
) -> Iterator[GenerationEvent]:
    """Generate from `prompt` (text, or token ids used as they are), yielding text as it appears.

    With `state` given, generation continues from it (and leaves it advanced); otherwise a
    fresh state is used.
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty).check()
    if max_tokens < 0:
        raise Mamba2Error(f"max tokens must be >= 0, got {max_tokens}")
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not prompt_ids:
        raise Mamba2Error("the prompt is empty")
    device = model.device
    vocab = model.cfg.vocab_size
    if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
        raise Mamba2Error(f"prompt token id out of range for a vocabulary of {vocab}")
    if state is None:
        state = owned_state(model, 1)
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
        seen[0, ids[0]] = True
    step_fn = decode_step_fn(model, state, cuda_graph)  # capture (once) before the clock starts

    eos_ids = set() if ignore_eos else tokenizer.eos_ids
    detok = tokenizer.stream(prompt_ids)
    stops = _StopMatcher(stop)
    generated: list[int] = []
    finish = "length"

    _sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, state, prefill_chunk)
    t_prefill = t_first = None
    for step in range(max_tokens):
        token = sample(logits, params, seen, generator)
        tid = int(token.item())  # the one host sync per token
        now = time.perf_counter()
        if step == 0:
            t_first = now
            t_prefill = now  # sampling the first token belongs to the prefill
        generated.append(tid)
        if tid in eos_ids:
            finish = "eos"
            break
        piece = detok.step(tid)
        text = stops.feed(piece) if piece else ""
        if stops.stopped:
            finish = "stop"
            if text:
                yield GenerationEvent(text, tid)
            break
        if step + 1 == max_tokens:
            yield GenerationEvent(text, tid)
            break
        if seen is not None:
            seen.scatter_(1, token.view(-1, 1), True)
        logits = step_fn(token)
        yield GenerationEvent(text, tid)
    if not stops.stopped:
        rest = detok.flush()  # an unfinished UTF-8 character decodes as U+FFFD, as a full decode has it
        tail = stops.feed(rest) if rest else ""
        tail += "" if stops.stopped else stops.flush()
        if stops.stopped:
            finish = "stop"
    else:
        tail = ""
    _sync(device)
    t_end = time.perf_counter()

    prefill_s = (t_prefill or t_end) - t0
    n_decode = max(len(generated) - 1, 0)
    decode_s = t_end - t_first if t_first is not None else 0.0
    stats = {
        "prefill_s": prefill_s,
        "prefill_tok_s": len(prompt_ids) / prefill_s if prefill_s > 0 else None,
        "ttft_s": (t_first - t0) if t_first is not None else None,
        "decode_s": decode_s,
        "decode_tok_s": n_decode / decode_s if n_decode and decode_s > 0 else None,
        "peak_memory_bytes": peak_memory_bytes(device),
    }
    result = GenerationResult(stops.text, generated, len(prompt_ids), finish, stats)
    yield GenerationEvent(tail, None, result)


def generate(model: Mamba2LM, tokenizer: Tokenizer, prompt: str | Sequence[int], **kwargs) -> GenerationResult:
    """Generate to the end; returns text, token_ids, finish_reason and stats."""
    result = None
    for event in stream_generate(model, tokenizer, prompt, **kwargs):
        result = event.result or result
    return result
