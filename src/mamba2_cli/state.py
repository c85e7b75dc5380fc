"""The recurrent state of a Mamba-2 model: the whole context, in a fixed size.

Layout (this is also the layout of state files):
    conv  [n_layer, batch, conv_dim, d_conv - 1]  model dtype; the last d_conv-1 inputs of
          the causal conv (x, B, C channels before the conv), oldest first.
    ssm   [n_layer, batch, nheads, headdim, d_state]  fp32 always: a 16-bit state loses quality.

Both are allocated once and updated in place, so their addresses stay fixed (a CUDA graph
can own them). `state.conv[i]`, `state.ssm[i]` are layer i's views. statefile.py saves and
loads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Mamba2Config


@dataclass
class Mamba2State:
    conv: torch.Tensor
    ssm: torch.Tensor

    @classmethod
    def zeros(cls, cfg: Mamba2Config, batch_size: int, device, dtype: torch.dtype) -> "Mamba2State":
        conv = torch.zeros(cfg.n_layer, batch_size, cfg.conv_dim, cfg.d_conv - 1, device=device, dtype=dtype)
        ssm = torch.zeros(
            cfg.n_layer, batch_size, cfg.nheads, cfg.headdim, cfg.d_state, device=device, dtype=torch.float32
        )
        return cls(conv, ssm)

    @property
    def batch_size(self) -> int:
        return self.ssm.shape[1]

    def reset(self) -> None:
        self.conv.zero_()
        self.ssm.zero_()

    def clone(self) -> "Mamba2State":
        return Mamba2State(self.conv.clone(), self.ssm.clone())

    def copy_(self, other: "Mamba2State") -> "Mamba2State":
        self.conv.copy_(other.conv)
        self.ssm.copy_(other.ssm)
        return self

    def sequence(self, i: int) -> "Mamba2State":
        """A view of sequence i of the batch, as a batch of one (writes go through)."""
        return Mamba2State(self.conv[:, i : i + 1], self.ssm[:, i : i + 1])

    def leading(self, n: int) -> "Mamba2State":
        """The first n sequences, as a view."""
        return self if n == self.batch_size else Mamba2State(self.conv[:, :n], self.ssm[:, :n])

    def drop(self, n: int, finished: list[int]) -> list[int]:
        """Remove the `finished` sequences from the first n by moving the last live ones into
        their places (one copy per finished sequence). Returns, for each position that
        remains, the position its sequence came from."""
        order = list(range(n))
        for j in sorted(finished, reverse=True):
            last = order.pop()
            if j < len(order):
                order[j] = last
        for j, o in enumerate(order):  # sources lie past the new end, destinations before it
            if o != j:
                self.conv[:, j].copy_(self.conv[:, o])
                self.ssm[:, j].copy_(self.ssm[:, o])
        return order

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()
