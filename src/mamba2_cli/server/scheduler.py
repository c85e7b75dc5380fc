"""The scheduler: one thread owns the model and runs every sequence of the server.

Sequences live in the rows of one batched state of `max_batch` rows, the running ones
packed at the front. Each iteration:

    launch    sample each running row's next token on the device from the step launched
              last, and launch the next step from those tokens at once (a CUDA graph per
              batch-size bucket: powers of two up to max_batch, the rows past the running
              ones spare), so the device runs it while the host does the rest
    collect   read the sampled tokens (the one wait per step) and hand each to its sequence
    retire    finished and cancelled rows leave at once: the last running rows move into
              the gaps, and a chat reply's state goes to the prefix cache first
    admit     each waiting request, while rows are free, is prefilled alone into a
              one-row scratch state (from the longest cached prefix of its tokens), cached,
              copied into the next free row, and its first token sampled; the next launch
              feeds it
    deliver   the iteration's events go to the event loop in one call

A step launched ahead also feeds the rows that end with the token it was launched from;
they leave afterwards, so the state a chat reply leaves in the cache has read the whole
reply, and the step's logits go with it.

A request's tokens are the same as alone: each row is prefilled alone, and the batched
step and per-row sampling (each sequence with its own generator) give each row what a
batch of one gives it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import Mamba2Error
from ..generation.loop import prefill
from ..generation.runner import runner_for
from ..generation.sequence import LiveSequence
from ..generation.steppers import decode_one_token, sample_each
from ..generation.types import GenerationEvent, Request
from .prefix_cache import PrefixCache


class QueueFull(Exception):
    """No room in the queue: the server answers 429."""


class NotReady(Exception):
    """The model is still loading (503), or failed to load."""


@dataclass
class Job:
    """One request on its way through the scheduler."""

    request: Request  # its prompt as token ids
    keep_reply: bool  # a chat turn: its reply's end state goes to the prefix cache
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq: LiveSequence | None = None  # made on admission, in the scheduler's thread
    cached_tokens: int = 0
    cancelled: bool = False  # set by the event loop when the client goes away
    t_submit: float = field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(self, load: Callable[[], tuple], *, max_batch: int, max_queue: int, cache_bytes: int,
                 cuda_graph: bool = True):
        self._load = load
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.cache_bytes = cache_bytes
        self.cuda_graph = cuda_graph
        self.status = "loading"  # loading | ready | failed
        self.error: str | None = None
        self.model = self.tokenizer = None
        self.cache: PrefixCache | None = None
        self.waiting: deque[Job] = deque()
        self.rows: list[Job] = []  # rows[j]: the job whose sequence is in row j
        self.peak_running = 0
        self.steps = 0
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.on_failure: Callable[[str], None] | None = None

    # -- the event loop's side ----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="mamba2-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def prompt_ids(self, request: Request) -> list[int]:
        """The request's prompt as token ids, checked against the model; Mamba2Error if bad.

        Called from the event loop's worker threads: it touches no device, since another
        thread's device work during a CUDA graph capture would break the capture.
        """
        if self.status != "ready":
            raise NotReady(self.error or "the model is loading")
        ids = request.prompt_ids(self.tokenizer)
        vocab = self.model.cfg.vocab_size
        if max(ids) >= vocab or min(ids) < 0:
            raise Mamba2Error(f"prompt token id out of range for a vocabulary of {vocab}")
        return ids

    def submit(self, job: Job) -> None:
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
            self.waiting.append(job)
            self._wake.notify()

    def health(self) -> dict:
        h = {"status": self.status, "running": len(self.rows), "queued": len(self.waiting),
             "max_batch": self.max_batch, "peak_running": self.peak_running, "steps": self.steps}
        if self.error:
            h["error"] = self.error
        if self.cache is not None:
            h["state_cache"] = self.cache.stats()
        return h

    # -- the scheduler thread -----------------------------------------------------------

    def _main(self) -> None:
        try:
            self.model, self.tokenizer = self._load()
            self._prepare()
        except Exception as e:  # noqa: BLE001: whatever stops the load stops the server, in one line
            self.error = str(e) if isinstance(e, Mamba2Error) else f"loading failed: {type(e).__name__}: {e}"
            self.status = "failed"
            if self.on_failure is not None:
                self.on_failure(self.error)
            return
        self.status = "ready"
        try:
            with torch.inference_mode():
                self._serve()
        except Exception as e:  # noqa: BLE001: a bug; every waiting client gets a 500, the server stops
            traceback.print_exc()
            self.error = f"generation failed: {type(e).__name__}: {e}"
            self.status = "failed"
            for job in self.rows + list(self.waiting):
                self._deliver([(job, e)])
            if self.on_failure is not None:
                self.on_failure(self.error)

    @torch.inference_mode()
    def _prepare(self) -> None:
        model = self.model
        with torch.inference_mode(False):  # plain tensors, as the runner's own states
            self.state = model.new_state(self.max_batch)
            self.scratch = model.new_state(1)
        self.runner = runner_for(model)
        self.graphs = self.cuda_graph and self.runner.make_decode_graph is not None
        self.cache = PrefixCache(model.device, self.cache_bytes)
        self.done = torch.cuda.Event() if model.device.type == "cuda" else None
        if self.done is not None:
            self.chosen_host = torch.empty(self.max_batch, dtype=torch.long, pin_memory=True)
        if self.graphs:  # every bucket's graph before the first request, not during one
            for size in sorted({self._bucket(n) for n in range(1, self.max_batch + 1)}):
                self.runner.decode_graph(self.state.leading(size))

    def _bucket(self, n: int) -> int:
        return min(self.max_batch, 1 << (n - 1).bit_length())

    def _serve(self) -> None:
        logits = None  # [n, V] of the step launched last, for the first n rows
        fresh: list[int] = []  # first tokens of the rows admitted since, after those n
        while True:
            with self._wake:
                while not self.rows and not self.waiting and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
            out: list[tuple[Job, object]] = []
            # sample and launch: the next step is issued before the host reads the tokens,
            # so the device runs it while the host hands out events and admits requests
            chosen = None
            if self.rows:
                parts = []
                if logits is not None:
                    chosen = sample_each(logits, [job.seq for job in self.rows[: len(logits)]])
                    parts.append(chosen)
                    if self.done is not None:  # the host's copy, ordered before the next step
                        chosen = self.chosen_host[: len(chosen)].copy_(chosen, non_blocking=True)
                        self.done.record()
                if fresh:
                    parts.append(torch.tensor(fresh, dtype=torch.long).to(self.model.device))
                logits = self._launch(torch.cat(parts) if len(parts) > 1 else parts[0])
                fresh = []
            # collect: on a GPU the tokens are read from their pinned copy once the event says
            # it is written; a plain read (chosen.tolist()) would queue behind the step just
            # launched and wait for it too, so the host's work would not overlap the step
            if chosen is not None:
                if self.done is not None:  # wait with the GIL released: the event loop writes meanwhile
                    self.done.synchronize()
                t_done = time.perf_counter()
                finished = []
                for j, (job, tid) in enumerate(zip(self.rows, chosen.tolist())):
                    event, over = job.seq.accept(tid, False)
                    if event is not None:
                        out.append((job, event))
                    if over:
                        finished.append(j)
                    elif job.seq.seen is not None:
                        job.seq.seen[0, tid] = True
                logits = self._retire(finished, t_done, out, logits)
            # retire the rows whose clients left
            gone = [j for j, job in enumerate(self.rows) if job.cancelled]
            if gone:
                logits = self._retire(gone, time.perf_counter(), out, logits, cancelled=True)
            # admit
            while len(self.rows) < self.max_batch:
                with self._wake:
                    job = self.waiting.popleft() if self.waiting else None
                if job is None:
                    break
                if not job.cancelled:
                    tid = self._admit(job, out)
                    if tid is not None:
                        fresh.append(tid)
            self.peak_running = max(self.peak_running, len(self.rows))
            # deliver
            if out:
                self._deliver(out)

    def _launch(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of every running row from `tokens` [n] on the device; logits [n, V]."""
        n = tokens.shape[0]
        self.steps += 1
        if not self.graphs:
            return decode_one_token(self.model, tokens, self.state.leading(n))
        size = self._bucket(n)
        if size > n:
            tokens = torch.cat([tokens, tokens.new_zeros(size - n)])
        return self.runner.decode_graph(self.state.leading(size))(tokens)[:n]

    def _admit(self, job: Job, out: list) -> int | None:
        """Prefill the job's prompt alone, from the longest cached prefix, into the next free
        row; its first token (None: the job ended with it, and takes no row)."""
        try:
            seq = job.seq = LiveSequence(job.request, self.tokenizer, self.model)
        except Mamba2Error as e:
            out.append((job, e))
            return None
        ids = seq.prompt_ids
        t_start = time.perf_counter()
        scratch = self.scratch
        hit = self.cache.lookup(ids)
        if hit is not None:
            n, entry = hit
            scratch.conv.copy_(entry.conv)
            scratch.ssm.copy_(entry.ssm)
            job.cached_tokens = n
        else:
            scratch.reset()
            n = 0
        if n == len(ids):
            logits = entry.logits
        else:
            rest = torch.tensor([ids[n:]], dtype=torch.long)
            logits = prefill(self.model, rest, scratch, cuda_graph=self.graphs)
            self.cache.put(ids, scratch, logits)
        tid = sample_each(logits, [seq]).item()
        t_done = time.perf_counter()
        seq.prefill_s = t_done - t_start
        seq.t_first = t_done
        job.t_start = t_start
        if seq.max_tokens == 0:
            out.append((job, seq.final_event(job.t_submit, t_done, self.model.device)))
            return None
        event, over = seq.accept(tid, False)
        if event is not None:
            out.append((job, event))
        if over:
            out.append((job, seq.final_event(job.t_submit, t_done, self.model.device)))
            return None
        if seq.seen is not None:
            seq.seen[0, tid] = True
        j = len(self.rows)
        self.state.conv[:, j].copy_(scratch.conv[:, 0])
        self.state.ssm[:, j].copy_(scratch.ssm[:, 0])
        self.rows.append(job)
        return tid

    def _retire(self, positions: list[int], t_done: float, out: list, logits: torch.Tensor,
                cancelled: bool = False) -> torch.Tensor:
        """Take the rows at `positions` out of the batch (the last running rows fill the gaps);
        `logits` of the step in flight, for the rows that stay.

        The step in flight has fed each leaving row its last token too, so a chat reply's
        state (queued after that step) has read prompt + reply, and its logits are that step's.
        """
        if not positions:
            return logits
        for j in positions:
            job = self.rows[j]
            if cancelled:
                continue
            seq = job.seq
            if job.keep_reply:
                self.cache.put(seq.prompt_ids + seq.generated, self.state.sequence(j), logits[j : j + 1])
            out.append((job, seq.final_event(job.t_submit, t_done, self.model.device)))
        order = self.state.drop(len(self.rows), positions)
        self.rows = [self.rows[o] for o in order]
        return logits[torch.tensor(order, dtype=torch.long, device=logits.device)] if order else None

    def _deliver(self, out: list) -> None:
        by_loop: dict = {}
        for job, item in out:
            by_loop.setdefault(job.loop, []).append((job.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def finish_reason(event: GenerationEvent) -> str:
    """OpenAI's name for why a sequence ended."""
    return "length" if event.result.finish_reason == "length" else "stop"
