"""CUDA graphs of the prefill of short prompts, one per (state, batch size, bucket length)."""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from .. import timings
from ..errors import Mamba2Error
from ..model import Mamba2LM
from ..state import Mamba2State

# Prompt lengths the prefill graphs are captured for; a prompt runs padded to the smallest
# bucket that holds it. A Codestral-sized prefill of up to ~170 tokens takes as long as
# reading the weights once (3.4 ms on an H200), so padding is free there; above, buckets
# grow by at most 2x (1.5x from 256 on), and past 1024 tokens the GPU's work outlasts the
# host's launches, so eager prefill loses little. Each bucket is a padded piece, never a
# split: every piece would read the 14 GB of weights again.
PREFILL_GRAPH_BUCKETS = (64, 128, 256, 384, 512, 768, 1024)
PREFILL_GRAPH_ENTRIES = 32  # (state, batch size, bucket) entries kept per model, least recently used dropped


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
    """One (state, batch size B, bucket T): the padded forward with static inputs, eager or captured.

    `io` holds the ids [B, T] and, after them, the real lengths [B], so a call costs one
    host-to-device copy. Positions past a sequence's length keep whatever ids were there
    (valid ids from an earlier prompt, or zeros): the model never reads them into real
    positions.
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
                with timings.phase("graph_capture"), torch.cuda.graph(graph, pool=graphs.pool, stream=side):
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
    """CUDA graphs of the prefill of short prompts, per (state, batch size, bucket length).

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
        self._model = weakref.ref(model)  # the model's Runner holds these graphs and must not keep it alive
        self.buckets = tuple(sorted(buckets))
        self.stand_in = stand_in  # CPU tests: "capture" makes an eager stand-in
        self.entries: OrderedDict = OrderedDict()
        self.pool = None
        self._stream = None
        self.captures = 0

    @property
    def model(self) -> Mamba2LM:
        return self._model()

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
