"""Runner: what generation keeps for one model from call to call.

The model's CUDA graphs (the bucketed prefill graphs, a decode graph per state and batch
size) and the states lent to callers that bring none, so a graph captured for one call is
replayed by the next. A graph holds the addresses of the weights it was captured with, so
a runner serves one version of the weights on one device: `Mamba2LM.prepare` (called
again whenever weights are replaced) bumps `model.weights_version`, and `runner_for` then
starts a new runner, dropping every graph of the old weights.
"""

from __future__ import annotations

import weakref

import torch

from ..model import Mamba2LM
from ..state import Mamba2State
from .decode_graph import DecodeGraph
from .prefill_graphs import PrefillGraphs
from .steppers import decode_one_token


def _weights_version(model: Mamba2LM) -> int:
    return getattr(model, "weights_version", 0)


class Runner:
    """The graph caches and lent states of one model.

    prefill_graphs: the PrefillGraphs (None: prefill runs eagerly). make_decode_graph(model,
    state, greedy) builds a decode graph, DecodeGraph on a GPU (None: decode runs eagerly).
    CPU tests put eager stand-ins in both places to exercise the graph paths.
    """

    def __init__(self, model: Mamba2LM):
        # Runners are found through a registry keyed weakly by the model: a strong
        # reference from here would keep every model ever generated with alive.
        self._model = weakref.ref(model)
        self.weights_version = _weights_version(model)
        self.device = model.device
        on_gpu = model.device.type == "cuda"
        self.prefill_graphs: PrefillGraphs | None = PrefillGraphs(model) if on_gpu else None
        self.make_decode_graph = DecodeGraph if on_gpu else None
        self.decode_graphs: dict[tuple, DecodeGraph] = {}
        self.states: dict[int, Mamba2State] = {}

    @property
    def model(self) -> Mamba2LM:
        return self._model()

    def serves(self, model: Mamba2LM) -> bool:
        return self.weights_version == _weights_version(model) and self.device == model.device

    def decode_graph(self, state: Mamba2State, greedy: bool = False) -> DecodeGraph:
        """The decode graph of `state` (captured at its first use, then cached)."""
        model = self.model
        key = (state.ssm.data_ptr(), state.conv.data_ptr(), state.batch_size, model.backend_name, greedy)
        if key not in self.decode_graphs:
            self.decode_graphs[key] = self.make_decode_graph(model, state, greedy)
        return self.decode_graphs[key]

    def decode_step(self, state: Mamba2State, cuda_graph: bool = True):
        """tokens [B] -> logits [B, V], advancing `state`: the state's decode graph where
        there are graphs, the eager forward elsewhere."""
        if cuda_graph and self.make_decode_graph is not None:
            return self.decode_graph(state)
        model = self.model
        return lambda tokens: decode_one_token(model, tokens, state)

    def owned_state(self, batch_size: int) -> Mamba2State:
        """A zeroed state for callers that bring none, reused from call to call so its
        graphs are captured once."""
        if batch_size not in self.states:
            with torch.inference_mode(False):  # a plain tensor: callers reset it in inference mode or out
                self.states[batch_size] = self.model.new_state(batch_size)
        state = self.states[batch_size]
        state.reset()
        return state


_RUNNERS: "weakref.WeakKeyDictionary[Mamba2LM, Runner]" = weakref.WeakKeyDictionary()


def runner_for(model: Mamba2LM) -> Runner:
    """The model's runner, made anew when its weights or device have changed."""
    runner = _RUNNERS.get(model)
    if runner is None or not runner.serves(model):
        runner = _RUNNERS[model] = Runner(model)
    return runner
