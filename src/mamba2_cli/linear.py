"""The weight seam: the projections (in_proj, out_proj, lm_head) as one type the backends take.

model.py hands a `Linear` to the backend's `linear` and `norm_linear`, never its tensors, so
how a weight is stored is the backends' business: this plain Linear holds `weight` [out, in]
and an optional `bias` [out] as parameters (the checkpoint's names, `...in_proj.weight`,
stay what they are, and lm_head's weight can be the embedding's). The quantized forms
(`Int8Linear`, `Int4Linear`: quant.py has the schemes) are siblings the backends recognise
by type (`QuantizedLinear`); a sharded weight would be another.
"""

from __future__ import annotations

import torch
from torch import nn

from . import quant


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


class QuantizedLinear(nn.Module):
    """y = x @ dequantize(qweight, scales)^T + bias, computed by a backend. `qweight` and
    `scales` are buffers (integers take no gradient), named so in the state dict."""

    scheme = ""
    QDTYPE = torch.int8

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.empty(self._qshape(), dtype=self.QDTYPE))
        self.register_buffer("scales", torch.empty(self._sshape()))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features)) if bias else None)

    def rows(self, start: int, stop: int) -> "QuantizedLinear":
        """Output features [start, stop), as views (see Linear.rows)."""
        view = type(self).__new__(type(self))
        nn.Module.__init__(view)
        view.in_features, view.out_features, view.group_size = self.in_features, stop - start, self.group_size
        view.qweight = self.qweight[start:stop]
        view.scales = self.scales[start:stop]
        view.bias = None if self.bias is None else self.bias[start:stop]
        return view

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 0,
                    dtype: torch.dtype | None = None) -> "QuantizedLinear":
        """Quantize a [out, in] weight (tests and benchmarks); scales in `dtype` (default: the weight's)."""
        with torch.device("meta"):
            lin = cls(weight.shape[1], weight.shape[0], bias is not None, group_size)
        lin.qweight, lin.scales = cls.quantize(weight, group_size, dtype or weight.dtype)
        if bias is not None:
            lin.bias = nn.Parameter(bias, requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return (f"{self.scheme}, in_features={self.in_features}, out_features={self.out_features}{g}, "
                f"bias={self.bias is not None}")


class Int8Linear(QuantizedLinear):
    """int8 weights [out, in], one scale per output channel."""

    scheme = "int8"
    QDTYPE = torch.int8

    def _qshape(self):
        return (self.out_features, self.in_features)

    def _sshape(self):
        return (self.out_features,)

    @staticmethod
    def quantize(weight, group_size, dtype):
        return quant.quantize_int8(weight, dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return quant.dequantize_int8(self.qweight, self.scales, dtype)


class Int4Linear(QuantizedLinear):
    """int4 weights two to a byte [out, in / 2], one scale per group of `group_size` inputs."""

    scheme = "int4"
    QDTYPE = torch.uint8

    def _qshape(self):
        return (self.out_features, self.in_features // 2)

    def _sshape(self):
        return (self.out_features, self.in_features // self.group_size)

    @staticmethod
    def quantize(weight, group_size, dtype):
        return quant.quantize_int4(weight, group_size, dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return quant.dequantize_int4(self.qweight, self.scales, dtype)


def quantized_class(scheme: str) -> type[QuantizedLinear]:
    return {"int8": Int8Linear, "int4": Int4Linear}[scheme]
