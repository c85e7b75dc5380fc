"""The weight seam: the projections (in_proj, out_proj, lm_head) as one type the backends take.

model.py hands a `Linear` to the backend's `linear` and `norm_linear`, never its tensors, so
how a weight is stored is the backends' business: this plain Linear holds `weight` [out, in]
and an optional `bias` [out] as parameters (the checkpoint's names, `...in_proj.weight`,
stay what they are, and lm_head's weight can be the embedding's). A quantized or sharded
weight is a sibling class in its own module, which the backends recognise by type.
"""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Module):
    """y = x @ weight^T + bias, computed by a backend (`kernels`), never by this module."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Uninitialized: the weights come from a checkpoint (or a test's random draw).
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features)) if bias else None)

    @classmethod
    def from_tensors(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Linear":
        """A Linear holding these tensors as they are (no copy; for tests and benchmarks)."""
        with torch.device("meta"):
            lin = cls(weight.shape[1], weight.shape[0], bias=bias is not None)
        lin.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias, requires_grad=False)
        return lin

    def rows(self, start: int, stop: int) -> "Linear":
        """Output features [start, stop) as a Linear whose tensors are views of this one's.

        Its tensors are plain attributes, not parameters, and its holder keeps it out of the
        module tree, so the state_dict does not change. The views follow this Linear's tensors
        only until those are replaced: take them again after loading weights or moving."""
        view = Linear.__new__(Linear)
        nn.Module.__init__(view)
        view.in_features, view.out_features = self.in_features, stop - start
        view.weight = self.weight[start:stop]
        view.bias = None if self.bias is None else self.bias[start:stop]
        return view

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
