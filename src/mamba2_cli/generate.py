"""The generation loop: prefill, decode one token at a time, stop. One loop for every caller.

    prefill(model, ids, state)            -> logits of the last position; state advanced
                                             (cuda_graph=True: short prompts via PrefillGraphs)
    decode_one_token(model, tokens, state) -> logits of the next position; state advanced
    stream_generate(model, tokenizer, prompt, ...) yields GenerationEvent as text appears
    generate(...)                          -> GenerationResult (the last event's result)
    stream_batch(model, tokenizer, requests) yields (index, GenerationEvent) for a batch
    generate_batch(...)                    -> [GenerationResult] in input order

All four run `_generate_rows`, the loop for a batch of B >= 1 sequences; a single prompt
is a batch of one.
"""

from __future__ import annotations

import resource
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .errors import Mamba2Error
from .model import Mamba2LM
from .sampling import SamplingParams, sample
from .state import Mamba2State
from .tokenizer import Tokenizer

# Longest piece of prompt run through the model at once. Prefill continues from the state,
# so pieces give the same result as the whole while memory stays bounded. Measured on an
# H200 (session 7, round 27: Codestral, 65,536 tokens, alternated): pieces of 4096 tokens
# 1.761 s, 8192 1.747 s, 16384 1.745 s, with 0.51, 1.01 and 2.02 GB of peak memory above
# the model (batch 1's scan gains from longer pieces since it is cut into segments).
DEFAULT_PREFILL_CHUNK = 8192


@torch.inference_mode()
def prefill(model: Mamba2LM, input_ids: torch.Tensor, state: Mamba2State,
            chunk_tokens: int = DEFAULT_PREFILL_CHUNK, cuda_graph: bool = False) -> torch.Tensor:
    """Run input_ids [B, L] (L >= 1; on the host or the device) through the model from `state`;
    logits [B, V] of the last position.

    cuda_graph: on a GPU, prompts of 2 to PREFILL_GRAPH_BUCKETS[-1] tokens go through the
    model's PrefillGraphs (padded to a bucket length; eager the first time, a CUDA graph from
    the second call for the same state and bucket on). Longer prompts run eagerly in pieces
    of `chunk_tokens`, where the GPU, not the host, sets the pace.
    """
    L = input_ids.shape[1]
    if L == 0:
        raise Mamba2Error("nothing to prefill: the prompt has no tokens")
    graphs = prefill_graphs(model) if cuda_graph else None
    if graphs is not None and 1 < L <= graphs.max_tokens:
        return graphs(input_ids, state)
    input_ids = input_ids.to(model.device)
    logits = None
    for start in range(0, L, chunk_tokens):
        piece = input_ids[:, start : start + chunk_tokens]
        logits = model(piece, state, logits_to_keep=1)
    return logits[:, -1]


# Prompt lengths the prefill graphs are captured for; a prompt runs padded to the smallest
# bucket that holds it. A Codestral-sized prefill of up to ~170 tokens takes as long as
# reading the weights once (3.4 ms on an H200), so padding is free there; above, buckets
# grow by at most 2x (1.5x from 256 on), and past 1024 tokens the GPU's work outlasts the
# host's launches, so eager prefill loses little. Each bucket is a padded piece, never a
# split: every piece would read the 14 GB of weights again.
PREFILL_GRAPH_BUCKETS = (64, 128, 256, 384, 512, 768, 1024)
PREFILL_GRAPH_ENTRIES = 32  # (state, rows, bucket) entries kept per model, least recently used dropped


class _StandInGraph:
    """What a captured graph does, run eagerly: for CPU tests of PrefillGraphs. Like a real
    capture it runs nothing when made, binds the state given then, and each replay writes
    one static output."""

    def __init__(self, fn):
        self.fn = fn
        self.output = None

    @torch.inference_mode()
    def replay(self):
        out = self.fn()
        if self.output is None:
            self.output = out
        else:
            self.output.copy_(out)


class _PaddedPrefill:
    """One (state, rows B, bucket T): the padded forward with static inputs, eager or captured.

    `io` holds the ids [B, T] and, after them, the real lengths [B], so a call costs one
    host-to-device copy. Positions past a row's length keep whatever ids were there (valid
    ids from an earlier prompt, or zeros): the model never reads them into real positions.
    """

    def __init__(self, graphs: "PrefillGraphs", batch: int, T: int):
        self.graphs, self.B, self.T = graphs, batch, T
        device = graphs.model.device
        self.io = torch.zeros(batch * T + batch, dtype=torch.long, device=device)
        self.ids = self.io[: batch * T].view(batch, T)
        self.lens = self.io[batch * T :]
        self.host = torch.zeros(batch * T + batch, dtype=torch.long)
        self.graph = None
        self.logits = None

    def _load(self, input_ids: torch.Tensor) -> None:
        B, L = input_ids.shape
        if input_ids.device.type == "cpu" and self.io.device.type != "cpu":
            self.host[: B * self.T].view(B, self.T)[:, :L] = input_ids
            self.host[B * self.T :] = L
            self.io.copy_(self.host)
        else:
            self.ids[:, :L].copy_(input_ids)
            self.lens.fill_(L)

    def _forward(self, state: Mamba2State) -> torch.Tensor:
        return self.graphs.model(self.ids, state, logits_to_keep=1, seq_len=self.lens)[:, -1]

    def eager(self, input_ids: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """The padded forward, run now; on a GPU on the side stream that later captures it,
        so this call is also the warm-up (kernels compiled, cuBLAS set up for that stream)."""
        self._load(input_ids)
        side = self.graphs.side_stream()
        if side is None:
            return self._forward(state)
        current = torch.cuda.current_stream(side.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = self._forward(state)
        current.wait_stream(side)
        out.record_stream(current)
        return out

    def capture(self, state: Mamba2State) -> None:
        graphs = self.graphs
        if graphs.stand_in:
            self.graph = _StandInGraph(lambda: self._forward(state))
        else:
            side = graphs.side_stream()
            side.wait_stream(torch.cuda.current_stream(side.device))
            if graphs.pool is None:
                graphs.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=graphs.pool, stream=side):
                    self.logits = self._forward(state)
            except Exception as e:
                raise Mamba2Error(f"CUDA graph capture of the prefill failed ({e}); "
                                  "run with --no-cuda-graph to prefill without it") from None
            self.graph = graph
        graphs.captures += 1

    def replay(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._load(input_ids)
        self.graph.replay()
        # Copied out: the static logits are overwritten by the next replay of this graph, and
        # the memory of the pool's graphs is shared.
        return (self.graph.output if self.graphs.stand_in else self.logits).clone()


class PrefillGraphs:
    """CUDA graphs of the prefill of short prompts, per (state, batch rows, bucket length).

    A prompt of L <= max(buckets) tokens runs padded to the smallest bucket T >= L with its
    real length in a device tensor (Mamba2LM.forward's seq_len): one graph serves every
    length up to T, the state advances over the real tokens only, and the logits are the
    last real token's. A graph replays the whole prefill in one launch, where the eager
    forward issues ~7 launches per layer from Python (~24 ms of host time on Codestral's
    64 layers, against ~4 ms of GPU work for 128 tokens).

    When to capture: the first call for a (state, B, T) runs the padded forward eagerly; the
    second captures it (and replays); later calls replay. Capturing costs about one more
    eager forward of host time, so a one-shot run (one prompt, then decode) never pays for
    a graph it would not reuse, while chat turns, repeated generate calls and benchmark
    repeats replay. Graphs are keyed by the state's addresses (they write it in place) and
    share one memory pool: they never run at once, and each call copies its logits out.
    """

    def __init__(self, model: Mamba2LM, buckets=PREFILL_GRAPH_BUCKETS, stand_in: bool = False):
        self.model = model
        self.buckets = tuple(sorted(buckets))
        self.stand_in = stand_in  # CPU tests: "capture" makes an eager stand-in
        self.entries: OrderedDict = OrderedDict()
        self.pool = None
        self._stream = None
        self.captures = 0

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def bucket(self, L: int) -> int:
        for T in self.buckets:
            if T >= L:
                return T
        raise Mamba2Error(f"{L} tokens is more than the largest prefill graph ({self.max_tokens})")

    def side_stream(self):
        if self.stand_in or self.model.device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.model.device)
        return self._stream

    def key(self, state: Mamba2State, T: int) -> tuple:
        return (state.conv.data_ptr(), state.conv.stride(), state.ssm.data_ptr(), state.ssm.stride(),
                state.batch_size, T, self.model.backend_name)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """input_ids [B, L] (host or device), 1 <= L <= max_tokens -> logits [B, V]; state advanced."""
        B, L = input_ids.shape
        if B != state.batch_size:
            raise Mamba2Error(f"{B} rows of ids for a state of {state.batch_size} sequences")
        key = self.key(state, self.bucket(L))
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _PaddedPrefill(self, B, key[-2])
            while len(self.entries) > PREFILL_GRAPH_ENTRIES:
                self.entries.popitem(last=False)
            return entry.eager(input_ids, state)
        self.entries.move_to_end(key)
        if entry.graph is None:
            entry.capture(state)
        return entry.replay(input_ids)


def prefill_graphs(model: Mamba2LM) -> PrefillGraphs | None:
    """The model's PrefillGraphs on a GPU (made on first use), or a stand-in a test attached
    (model._prefill_graphs); None where there are no graphs."""
    graphs = model.__dict__.get("_prefill_graphs")
    if graphs is None and model.device.type == "cuda":
        graphs = model.__dict__["_prefill_graphs"] = PrefillGraphs(model)
    return graphs


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

    greedy: the graph also takes the argmax, writes it over `tokens` (the next step's input,
    so no copy comes before the next replay) and copies it to pinned host memory; `launch`
    and `collect` then replace the call and the host's read of a separately sampled token
    (one launch and one wait per step instead of four launches and a blocking copy).
    `allow_ahead` captures the step a second time, copying to a second pinned slot, so two
    launched steps may be in flight: the loop issues the step after next before it waits.
    """

    def __init__(self, model: Mamba2LM, state: Mamba2State, greedy: bool = False):
        device = model.device
        self.state = state
        self.greedy = greedy
        self.tokens = torch.zeros(state.batch_size, dtype=torch.long, device=device)
        if greedy:
            self.host = torch.zeros(2, state.batch_size, dtype=torch.long).pin_memory()
            self.done = [torch.cuda.Event(), torch.cuda.Event()]
            self.in_flight: list[int] = []  # pinned slots of launched steps not yet collected, oldest first
        saved = state.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                decode_one_token(model, self.tokens, state)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graphs = [self._capture(model, 0)]
        self.graph, self.logits = self.graphs[0]
        state.copy_(saved)

    def _capture(self, model: Mamba2LM, slot: int):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), torch.cuda.graph(graph):
                logits = decode_one_token(model, self.tokens, self.state)
                if self.greedy:
                    nxt = logits.argmax(dim=-1)  # as sampling.sample takes it
                    self.tokens.copy_(nxt)
                    self.host[slot].copy_(nxt, non_blocking=True)
        except Exception as e:
            raise Mamba2Error(f"CUDA graph capture of the decode step failed ({e}); "
                              "run with --no-cuda-graph to decode without it") from None
        return graph, logits

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens.view(-1))
        self.graph.replay()
        return self.logits

    def allow_ahead(self, model: Mamba2LM) -> None:
        """A greedy graph: let two steps be in flight (captures the second slot's graph once)."""
        if len(self.graphs) == 1:
            self.graphs.append(self._capture(model, 1))

    def forget(self) -> None:
        """A new loop starts: steps a previous loop launched and never collected are dropped
        (they are ordered before anything launched now, so nothing of theirs is read)."""
        self.in_flight.clear()

    def launch(self, tokens: torch.Tensor | None = None) -> None:
        """A greedy graph's step: from `tokens`, or (None) from the token the step launched
        last chooses."""
        slot = (self.in_flight[-1] + 1) % len(self.graphs) if self.in_flight else 0
        if len(self.in_flight) == len(self.graphs):
            raise RuntimeError("every pinned slot holds a step not yet collected")
        if tokens is not None:
            self.tokens.copy_(tokens.view(-1))
        self.graphs[slot][0].replay()
        self.done[slot].record()
        self.in_flight.append(slot)

    def collect(self) -> list[int]:
        """The tokens the oldest launched step chose, on the host, once it is done."""
        slot = self.in_flight.pop(0)
        self.done[slot].synchronize()
        return self.host[slot].tolist()


def owned_state(model: Mamba2LM, batch_size: int) -> Mamba2State:
    """A zeroed state the model keeps for callers that bring none, reused from call to call
    so its CUDA graph is captured once."""
    states = model.__dict__.setdefault("_owned_states", {})
    if batch_size not in states:
        states[batch_size] = model.new_state(batch_size)
    states[batch_size].reset()
    return states[batch_size]


# One greedy sequence decoded through CUDA graphs uses DecodeGraph's greedy form (the argmax in
# the graph, one launch and one wait per step). H200, session 11, round 57 (batch 1, Codestral,
# µs per step): graph replays back to back 3992, replay + argmax + the host's read 4147, the
# greedy form 4089.
GREEDY_GRAPH = True
# Where the caller leaves the state to the loop (`ahead`), that greedy form issues the step
# after next before waiting for the next token. H200, session 13, round 65 (bench_model b1,
# Codestral, medians of 5 alternated in one process): 3948.5 against 4087.7 µs per step, the
# replays alone 3929.3; against session 12's src in separate processes 253.4 against 252.5 tok/s.
AHEAD = True


def decode_step_fn(model: Mamba2LM, state: Mamba2State, cuda_graph: bool = True, greedy: bool = False):
    """tokens [B] -> logits [B, V], advancing `state`: a CUDA graph replay on GPUs (captured
    once per model and state, then cached), the eager forward elsewhere. greedy (GPUs): the
    DecodeGraph that also picks the argmax (its launch/collect)."""
    if model.device.type != "cuda" or not cuda_graph:
        return lambda tokens: decode_one_token(model, tokens, state)
    cache = model.__dict__.setdefault("_decode_graphs", {})
    key = (state.ssm.data_ptr(), state.conv.data_ptr(), state.batch_size, model.backend_name, greedy)
    if key not in cache:
        cache[key] = DecodeGraph(model, state, greedy)
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


class _Sequence:
    """One request inside the loop: its ids, sampler, detokenizer, stop conditions, clocks."""

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
        self.stops = _StopMatcher(req.stop)
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


def _sample_rows(logits: torch.Tensor, seqs: list[_Sequence]) -> torch.Tensor:
    """One token per row; rows with their own settings or seeds sample on their own."""
    if len(seqs) == 1:
        s = seqs[0]
        return sample(logits, s.params, s.seen, s.generator)
    if all(s.params.greedy and s.seen is None for s in seqs):
        return logits.argmax(dim=-1)
    return torch.cat([sample(logits[j : j + 1], s.params, s.seen, s.generator) for j, s in enumerate(seqs)])


def _drop_rows(state: Mamba2State, n: int, finished: list[int]) -> list[int]:
    """Remove the `finished` rows from the first n rows of `state` by moving the last live
    rows into their places (one row copy per finished sequence). Returns, for each row that
    remains, the row it came from."""
    order = list(range(n))
    for j in sorted(finished, reverse=True):
        last = order.pop()
        if j < len(order):
            order[j] = last
    for j, o in enumerate(order):  # sources lie past the new end, destinations before it
        if o != j:
            state.conv[:, j].copy_(state.conv[:, o])
            state.ssm[:, j].copy_(state.ssm[:, o])
    return order


class _LiveRows:
    """The decode step for the live rows of a batched state (they are kept at the front).

    Eager: one forward over exactly the live rows. With CUDA graphs: a graph is captured per
    batch size, so as rows leave, the step runs the next power of two at or above the live
    count (the rows past the live ones hold finished sequences; their extra steps are thrown
    away): a batch of B captures at most log2(B) + 1 graphs, not B.
    """

    def __init__(self, model: Mamba2LM, state: Mamba2State, cuda_graph: bool):
        self.model, self.state = model, state
        self.graphs = cuda_graph and model.device.type == "cuda"

    def _rows(self, n: int) -> Mamba2State:
        s = self.state
        return s if n == s.batch_size else Mamba2State(s.conv[:, :n], s.ssm[:, :n])

    def capture(self) -> None:
        """Capture the full batch's graph now (before any clock starts), if graphs are used."""
        if self.graphs:
            decode_step_fn(self.model, self.state, True)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        if not self.graphs:
            return decode_one_token(self.model, tokens, self._rows(n))
        size = min(self.state.batch_size, 1 << (n - 1).bit_length())
        if size > n:
            tokens = torch.cat([tokens, tokens.new_zeros(size - n)])
        return decode_step_fn(self.model, self._rows(size), True)(tokens)[:n]


@torch.inference_mode()
def _generate_rows(model: Mamba2LM, tokenizer: Tokenizer, requests: list[Request], state: Mamba2State | None,
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK, on_prompt=None, cancel=None,
                   cuda_graph: bool = True, ahead: bool = False) -> Iterator[tuple[int, GenerationEvent]]:
    """The loop. Yields (request index, event) for a batch of requests, B >= 1.

    Each prompt is prefilled alone into its own row of the batched state, so prompts of any
    lengths share a batch with no padding through the recurrence. Then one model call per
    step decodes every unfinished row; a finished row leaves the batch (the live rows are
    kept packed at the front of the state).

    on_prompt(i, row_state, prompt_ids) is called once row i holds all of its prompt but the
    last token (a snapshot point: see statefile.py). cancel() is polled once per step; when
    it says so, every sequence ends after its current token (finish reason "cancelled").

    ahead: the caller does not read `state` afterwards, so one greedy sequence on a GPU may
    have the step after next launched before the host waits for the next token (a sequence
    that then ends leaves that step's token in the state as well).
    """
    seqs = [_Sequence(r, tokenizer, model) for r in requests]  # every request is checked before any work
    B = len(seqs)
    if B == 0:
        return
    if state is None:
        state = owned_state(model, B)
    elif state.batch_size != B:
        raise Mamba2Error(f"the state holds {state.batch_size} sequences, {B} requests were given")
    device = model.device
    decode = _LiveRows(model, state, cuda_graph)
    # One greedy sequence on a GPU: the graph takes the argmax itself (DecodeGraph's greedy).
    greedy_graph = None
    if (GREEDY_GRAPH and B == 1 and decode.graphs and seqs[0].params.greedy and seqs[0].seen is None
            and seqs[0].max_tokens > 1):
        greedy_graph = decode_step_fn(model, state, True, greedy=True)  # captured before the clock
        greedy_graph.forget()
        if ahead and AHEAD:
            greedy_graph.allow_ahead(model)
        else:
            ahead = False
    elif any(s.max_tokens > 1 for s in seqs):
        decode.capture()  # once per model and state, before the clock starts
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    _sync(device)
    t0 = time.perf_counter()
    logits = []
    for i, s in enumerate(seqs):
        t_start = time.perf_counter()
        row = state.row(i)
        ids = torch.tensor([s.prompt_ids], dtype=torch.long)  # prefill copies it to the device
        if on_prompt is not None:
            if ids.shape[1] > 1:
                prefill(model, ids[:, :-1], row, prefill_chunk, cuda_graph)
            on_prompt(i, row, s.prompt_ids)
            ids = ids[:, -1:]
        logits.append(prefill(model, ids, row, prefill_chunk, cuda_graph))
        _sync(device)
        s.prefill_s = time.perf_counter() - t_start
    logits = torch.cat(logits) if B > 1 else logits[0]

    # Each step: drop the rows that finished, feed the live rows' tokens (one model call;
    # on a GPU it runs while the events are handed out), hand out the events, sample. The
    # first tokens are handed out before the second step is issued: an eager decode step
    # spends milliseconds of host time launching kernels, which the first token should not
    # wait for.
    rows = list(range(B))  # rows[j]: the request whose state is in row j of `state`
    finished = [j for j in rows if seqs[j].max_tokens == 0]
    pending: list[tuple[int, GenerationEvent]] = []
    tokens = None
    first_step = True
    t_done = time.perf_counter()
    while True:
        done = [rows[j] for j in finished]
        if finished:
            order = _drop_rows(state, len(rows), finished)
            rows = [rows[o] for o in order]
            index = torch.tensor(order, dtype=torch.long, device=device)
            logits = logits[index]
            tokens = tokens[index] if tokens is not None else None
        launched = False
        if tokens is not None and rows:
            if first_step:
                yield from pending
                pending = []
            first_step = False
            if greedy_graph is not None:
                if not greedy_graph.in_flight:
                    greedy_graph.launch(None if tokens is greedy_graph.tokens else tokens)
                if ahead and len(seqs[rows[0]].generated) + 2 <= seqs[rows[0]].max_tokens:
                    greedy_graph.launch()  # the step after next, from the token the launched one picks
                launched = True
            else:
                logits = decode(tokens)
        yield from pending
        for i in done:
            yield i, seqs[i].final_event(t0, t_done, device)
        if not rows:
            return
        if launched:
            tids = greedy_graph.collect()  # the one wait per step
            tokens = greedy_graph.tokens
        else:
            tokens = _sample_rows(logits, [seqs[i] for i in rows])
            tids = tokens.tolist()  # the one host sync per step
        t_done = time.perf_counter()
        cancelled = cancel is not None and cancel()
        pending, finished = [], []
        for j, (i, tid) in enumerate(zip(rows, tids)):
            s = seqs[i]
            if s.t_first is None:
                s.t_first = t_done
            event, over = s.accept(tid, cancelled)
            if event is not None:
                pending.append((i, event))
            if over:
                finished.append(j)
            elif s.seen is not None:
                s.seen[0, tid] = True


def stream_generate(
    model: Mamba2LM,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int] | None,
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
    last_token: int | None = None,
    on_prompt=None,
    cancel=None,
    keep_state: bool = True,
) -> Iterator[GenerationEvent]:
    """Generate from `prompt` (text, or token ids used as they are), yielding text as it appears.

    With `state` given, generation continues from it and leaves it advanced (holding prompt
    and generated tokens but the last generated one); otherwise a fresh state is used.
    `last_token`: the state came from a state file and this is its unconsumed last token
    (SavedState.last_token); it is fed first, a text prompt gets no BOS, and with no prompt
    (None) generation continues the saved text. on_prompt(state, prompt_ids) is called when
    the state holds all of the prompt but its last token; cancel() ends generation after the
    current token when it returns True. keep_state=False: the caller will not read the given
    state afterwards, so the loop may run a step ahead of the host (the state may then hold
    the last generated token too).
    """
    req = Request(prompt, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
                  ignore_eos, last_token)
    hook = None if on_prompt is None else (lambda i, row, ids: on_prompt(row, ids))
    for _, event in _generate_rows(model, tokenizer, [req], state if state is not None else owned_state(model, 1),
                                   prefill_chunk, hook, cancel, cuda_graph, ahead=state is None or not keep_state):
        yield event


def generate(model: Mamba2LM, tokenizer: Tokenizer, prompt: str | Sequence[int] | None, **kwargs) -> GenerationResult:
    """Generate to the end; returns text, token_ids, finish_reason and stats."""
    result = None
    for event in stream_generate(model, tokenizer, prompt, **kwargs):
        result = event.result or result
    return result


def stream_batch(model: Mamba2LM, tokenizer: Tokenizer, requests: Sequence[Request],
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 cuda_graph: bool = True) -> Iterator[tuple[int, GenerationEvent]]:
    """Generate for several requests as one batch; yields (request index, event).

    Events of different requests interleave; each request's own events come in order and
    its last one carries its result. Greedy output of each request equals its output alone.
    """
    return _generate_rows(model, tokenizer, list(requests), None, prefill_chunk, cuda_graph=cuda_graph)


def generate_batch(model: Mamba2LM, tokenizer: Tokenizer, requests: Sequence[Request | str],
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK, **settings) -> list[GenerationResult]:
    """Results in input order. Strings become Requests with the shared `settings`."""
    reqs = [r if isinstance(r, Request) else Request(r, **settings) for r in requests]
    results: list[GenerationResult | None] = [None] * len(reqs)
    for i, event in stream_batch(model, tokenizer, reqs, prefill_chunk):
        if event.result is not None:
            results[i] = event.result
    return results
