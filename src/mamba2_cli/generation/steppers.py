"""The decode steppers: how the loop runs one decode step for its live sequences.

Every stepper has the same four calls, so the loop has one path whichever runs:

    begin(logits)   the prefill's logits [n, V]; the first collect samples from them
    keep(order)     only the sequences at these positions stay, in this order
    launch(live)    issue the step that feeds each live sequence the token collected last
    collect(live)   -> the next token of each live sequence, on the host (the step's one wait)

EagerSteps runs the forward over exactly the live sequences. GraphSteps replays a CUDA
graph per batch size. GreedyGraphSteps, for one greedy sequence, replays the graph that
takes the argmax itself and, when the caller does not keep the state, launches the step
after next before it waits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..model import Mamba2LM
from ..state import Mamba2State
from .sampling import sample
from .sequence import LiveSequence

if TYPE_CHECKING:
    from .runner import Runner


@torch.inference_mode()
def decode_one_token(model: Mamba2LM, tokens: torch.Tensor, state: Mamba2State) -> torch.Tensor:
    """tokens [B] -> logits [B, V] of the next position."""
    return model(tokens.view(-1, 1), state)[:, -1]


def sample_each(logits: torch.Tensor, live: list[LiveSequence]) -> torch.Tensor:
    """One token per sequence; sequences with their own settings or seeds sample on their own."""
    if len(live) == 1:
        s = live[0]
        return sample(logits, s.params, s.seen, s.generator)
    if all(s.params.greedy and s.seen is None for s in live):
        return logits.argmax(dim=-1)
    return torch.cat([sample(logits[j : j + 1], s.params, s.seen, s.generator) for j, s in enumerate(live)])


class Stepper:
    """The common part: logits not yet sampled, and the tokens the next launch feeds."""

    def __init__(self):
        self.logits: torch.Tensor | None = None  # [n, V], sampled by the next collect
        self.tokens: torch.Tensor | None = None  # [n] on the device, fed by the next launch

    def begin(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def keep(self, order: list[int]) -> None:
        held = self.logits if self.logits is not None else self.tokens
        index = torch.tensor(order, dtype=torch.long, device=held.device)
        if self.logits is not None:
            self.logits = self.logits[index]
        if self.tokens is not None:
            self.tokens = self.tokens[index]

    def launch(self, live: list[LiveSequence]) -> None:
        raise NotImplementedError

    def collect(self, live: list[LiveSequence]) -> list[int]:
        self.tokens = sample_each(self.logits, live)
        self.logits = None
        return self.tokens.tolist()  # the one host sync per step


class EagerSteps(Stepper):
    """The forward over exactly the live sequences (kept at the front of the state)."""

    def __init__(self, model: Mamba2LM, state: Mamba2State):
        super().__init__()
        self.model, self.state = model, state

    def launch(self, live: list[LiveSequence]) -> None:
        self.logits = decode_one_token(self.model, self.tokens, self.state.leading(len(live)))


class GraphSteps(Stepper):
    """A CUDA graph per batch size: as sequences leave, the step runs the next power of two
    at or above the live count (the positions past the live ones hold finished sequences;
    their extra steps are thrown away), so a batch of B captures at most log2(B) + 1 graphs,
    not B."""

    def __init__(self, runner: Runner, state: Mamba2State, live: list[LiveSequence]):
        super().__init__()
        self.runner, self.state = runner, state
        if any(s.max_tokens > 1 for s in live):
            runner.decode_graph(state)  # the full batch's graph, captured before the clock starts

    def launch(self, live: list[LiveSequence]) -> None:
        n = len(live)
        size = min(self.state.batch_size, 1 << (n - 1).bit_length())
        tokens = self.tokens
        if size > n:
            tokens = torch.cat([tokens, tokens.new_zeros(size - n)])
        self.logits = self.runner.decode_graph(self.state.leading(size))(tokens)[:n]


class GreedyGraphSteps(Stepper):
    """One greedy sequence: the decode graph takes the argmax itself (DecodeGraph's greedy
    form: one launch and one wait per step). keep_state False: nothing reads the state
    afterwards, so the step after next is launched before the host waits for the next token;
    none is launched past max_tokens, but a sequence that ends early (EOS, a stop string)
    leaves that step's token in the state."""

    def __init__(self, runner: Runner, state: Mamba2State, keep_state: bool):
        super().__init__()
        self.graph = runner.decode_graph(state, greedy=True)  # captured before the clock starts
        self.graph.forget()
        self.keep_state = keep_state
        if not keep_state:
            self.graph.capture_second_slot(runner.model)

    def launch(self, live: list[LiveSequence]) -> None:
        graph, s = self.graph, live[0]
        if not graph.in_flight:
            graph.launch(None if self.tokens is graph.tokens else self.tokens)
        if not self.keep_state and len(s.generated) + 2 <= s.max_tokens:
            graph.launch()  # the step after next, from the token the launched one picks

    def collect(self, live: list[LiveSequence]) -> list[int]:
        if self.logits is not None:  # the first token, from the prefill's logits
            return super().collect(live)
        self.tokens = self.graph.tokens
        return self.graph.collect()  # the one wait per step


def choose_stepper(runner: Runner, state: Mamba2State, live: list[LiveSequence], cuda_graph: bool,
                   keep_state: bool) -> Stepper:
    """The stepper for these sequences; any graph it needs is captured now, before the clock."""
    if not cuda_graph or runner.make_decode_graph is None:
        return EagerSteps(runner.model, state)
    s = live[0]
    if len(live) == 1 and s.params.greedy and s.seen is None and s.max_tokens > 1:
        return GreedyGraphSteps(runner, state, keep_state)
    return GraphSteps(runner, state, live)
