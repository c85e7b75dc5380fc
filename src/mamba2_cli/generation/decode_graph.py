"""DecodeGraph: the decode step of the whole model for one state, captured as a CUDA graph."""

from __future__ import annotations

import torch

from .. import timings
from ..errors import Mamba2Error
from ..model import Mamba2LM
from ..state import Mamba2State
from .steppers import decode_one_token


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
    `capture_second_slot` captures the step a second time, copying to a second pinned slot,
    so two launched steps may be in flight: the loop issues the step after next before it
    waits.
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
            with timings.phase("graph_capture"), torch.inference_mode(), torch.cuda.graph(graph):
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

    def capture_second_slot(self, model: Mamba2LM) -> None:
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
