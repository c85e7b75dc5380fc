"""The triton backend: the operations of `kernels` (see `torch_ref` for their contract) on
this project's Triton kernels. Imported only when backend 'triton' is chosen.

    ssd_prefill        ssd.py   one pass over the chunks, state carried in registers
    mixer_decode_step  step.py  conv + SSM update + gated norm of one token, in one to three launches
    ssd_decode_step    step.py
    causal_conv1d      conv.py  (and conv1d_step)
    add_rmsnorm        norm.py  (and gated_rmsnorm)
    linear             gemv.py  matvec kernel for decode's few-row products, F.linear otherwise
    norm_linear        gemv.py  add_rmsnorm + linear; one fused launch for a row when gemv.FUSE_NORM
"""

from .conv import causal_conv1d, conv1d_step
from .gemv import linear, norm_linear
from .norm import add_rmsnorm, gated_rmsnorm
from .ssd import ssd_prefill
from .step import mixer_decode_step, ssd_decode_step

name = "triton"

__all__ = [
    "name", "linear", "ssd_prefill", "ssd_decode_step", "causal_conv1d", "conv1d_step",
    "gated_rmsnorm", "add_rmsnorm", "mixer_decode_step", "norm_linear",
]
