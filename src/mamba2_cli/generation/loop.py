"""The generation loop: prefill, decode one token at a time, stop. One loop for every caller.

    prefill(model, ids, state)            -> logits of the last position; state advanced
                                             (cuda_graph=True: short prompts via PrefillGraphs)
    stream_generate(model, tokenizer, prompt, ...) yields GenerationEvent as text appears
    generate(...)                          -> GenerationResult (the last event's result)
    stream_batch(model, tokenizer, requests) yields (index, GenerationEvent) for a batch
    generate_batch(...)                    -> [GenerationResult] in input order

All four run `_generate`, the loop for a batch of B >= 1 sequences; a single prompt is a
batch of one. The decode step is a stepper's (steppers.py); the graphs it replays are the
model's Runner's (runner.py).
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch

from ..errors import Mamba2Error
from ..model import Mamba2LM
from ..state import Mamba2State
from ..tokenizer import Tokenizer
from .runner import runner_for
from .sequence import LiveSequence
from .steppers import choose_stepper
from .types import GenerationEvent, GenerationResult, Request

# Longest piece of prompt run through the model at once. Prefill continues from the state,
# so pieces give the same result as the whole while memory stays bounded. Pieces of 8192
# tokens prefill 65,536 Codestral tokens as fast as pieces of 16384 (H200: 1.747 against
# 1.745 s) with half the peak memory above the model (1.01 against 2.02 GB); shorter pieces
# lose speed, since batch 1's scan is cut into segments of the piece.
DEFAULT_PREFILL_CHUNK = 8192


@torch.inference_mode()
def prefill(model: Mamba2LM, input_ids: torch.Tensor, state: Mamba2State,
            chunk_tokens: int = DEFAULT_PREFILL_CHUNK, cuda_graph: bool = False) -> torch.Tensor:
    """Run input_ids [B, L] (L >= 1; on the host or the device) through the model from `state`;
    logits [B, V] of the last position.

    cuda_graph: on a GPU, prompts of 2 to PREFILL_GRAPH_BUCKETS[-1] tokens go through the
    runner's PrefillGraphs (padded to a bucket length; eager the first time, a CUDA graph
    from the second call for the same state and bucket on). Longer prompts run eagerly in
    pieces of `chunk_tokens`, where the GPU, not the host, sets the pace.
    """
    L = input_ids.shape[1]
    if L == 0:
        raise Mamba2Error("nothing to prefill: the prompt has no tokens")
    graphs = runner_for(model).prefill_graphs if cuda_graph else None
    if graphs is not None and 1 < L <= graphs.max_tokens:
        return graphs(input_ids, state)
    input_ids = input_ids.to(model.device)
    logits = None
    for start in range(0, L, chunk_tokens):
        piece = input_ids[:, start : start + chunk_tokens]
        logits = model(piece, state, logits_to_keep=1)
    return logits[:, -1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _generate(model: Mamba2LM, tokenizer: Tokenizer, requests: list[Request], state: Mamba2State | None,
              prefill_chunk: int = DEFAULT_PREFILL_CHUNK, on_prompt=None, cancel=None,
              cuda_graph: bool = True, keep_state: bool = True) -> Iterator[tuple[int, GenerationEvent]]:
    """The loop. Yields (request index, event) for a batch of requests, B >= 1.

    Each prompt is prefilled alone into its own sequence of the batched state, so prompts of
    any lengths share a batch with no padding through the recurrence. Then one step per
    token decodes every unfinished sequence; a finished sequence leaves the batch (the live
    ones are kept packed at the front of the state).

    on_prompt(i, seq_state, prompt_ids) is called once sequence i's state holds all of its
    prompt but the last token (a snapshot point: see statefile.py). cancel() is polled once
    per step; when it says so, every sequence ends after its current token (finish reason
    "cancelled").

    keep_state: the caller reads `state` afterwards. When it does not, one greedy sequence on
    a GPU has the step after next launched before the host waits for the next token (a
    sequence that then ends leaves that step's token in the state as well).
    """
    seqs = [LiveSequence(r, tokenizer, model) for r in requests]  # every request is checked before any work
    B = len(seqs)
    if B == 0:
        return
    runner = runner_for(model)
    if state is None:
        state = runner.owned_state(B)
    elif state.batch_size != B:
        raise Mamba2Error(f"the state holds {state.batch_size} sequences, {B} requests were given")
    device = model.device
    stepper = choose_stepper(runner, state, seqs, cuda_graph, keep_state)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    _sync(device)
    t0 = time.perf_counter()
    logits = []
    for i, s in enumerate(seqs):
        t_start = time.perf_counter()
        seq_state = state.sequence(i)
        ids = torch.tensor([s.prompt_ids], dtype=torch.long)  # prefill copies it to the device
        if on_prompt is not None:
            if ids.shape[1] > 1:
                prefill(model, ids[:, :-1], seq_state, prefill_chunk, cuda_graph)
            on_prompt(i, seq_state, s.prompt_ids)
            ids = ids[:, -1:]
        logits.append(prefill(model, ids, seq_state, prefill_chunk, cuda_graph))
        _sync(device)
        s.prefill_s = time.perf_counter() - t_start
    stepper.begin(torch.cat(logits) if B > 1 else logits[0])

    # Each step: drop the sequences that finished, launch the step that feeds the live ones
    # their tokens (on a GPU it runs while the events are handed out), hand out the events,
    # collect the next tokens. The first tokens are handed out before the second step is
    # launched: an eager decode step spends milliseconds of host time launching kernels,
    # which the first token should not wait for.
    live = list(range(B))  # live[j]: the request whose sequence is at position j of `state`
    finished = [j for j in live if seqs[j].max_tokens == 0]
    pending: list[tuple[int, GenerationEvent]] = []
    collected = False
    first_launch = True
    t_done = time.perf_counter()
    while True:
        done = [live[j] for j in finished]
        if finished:
            order = state.drop(len(live), finished)
            live = [live[o] for o in order]
            stepper.keep(order)
        live_seqs = [seqs[i] for i in live]
        if collected and live:
            if first_launch:
                yield from pending
                pending = []
                first_launch = False
            stepper.launch(live_seqs)
        yield from pending
        for i in done:
            yield i, seqs[i].final_event(t0, t_done, device)
        if not live:
            return
        tids = stepper.collect(live_seqs)
        collected = True
        t_done = time.perf_counter()
        cancelled = cancel is not None and cancel()
        pending, finished = [], []
        for j, (s, tid) in enumerate(zip(live_seqs, tids)):
            if s.t_first is None:
                s.t_first = t_done
            event, over = s.accept(tid, cancelled)
            if event is not None:
                pending.append((live[j], event))
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
    hook = None if on_prompt is None else (lambda i, seq_state, ids: on_prompt(seq_state, ids))
    for _, event in _generate(model, tokenizer, [req], state, prefill_chunk, hook, cancel, cuda_graph,
                              keep_state=state is not None and keep_state):
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
    return _generate(model, tokenizer, list(requests), None, prefill_chunk, cuda_graph=cuda_graph)


def generate_batch(model: Mamba2LM, tokenizer: Tokenizer, requests: Sequence[Request | str],
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK, **settings) -> list[GenerationResult]:
    """Results in input order. Strings become Requests with the shared `settings`."""
    reqs = [r if isinstance(r, Request) else Request(r, **settings) for r in requests]
    results: list[GenerationResult | None] = [None] * len(reqs)
    for i, event in stream_batch(model, tokenizer, reqs, prefill_chunk):
        if event.result is not None:
            results[i] = event.result
    return results
