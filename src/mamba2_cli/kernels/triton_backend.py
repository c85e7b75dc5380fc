"""The triton backend: the operations of `kernels` (see `torch_ref` for their contract) on
this project's Triton kernels. Imported only when backend 'triton' is chosen.

    ssd_prefill        ssd.py   one pass over the chunks, state carried in registers
    mixer_decode_step  step.py  conv + SSM update + gated norm of one token, one launch
    ssd_decode_step    step.py
    causal_conv1d      conv.py  (and conv1d_step)
    add_rmsnorm        norm.py  (and gated_rmsnorm)
    linear             gemv.py  matvec kernel for decode's few-row products, F.linear otherwise
    norm_linear        stream.py  add_rmsnorm + linear; for a row one launch when STREAM_CONFIG["norm_in"]
                                  (or gemv.FUSE_NORM)
    mixer_decode_out   stream.py  the step + out_proj; for one sequence one launch when
                                  STREAM_CONFIG["step_out"]
"""

from .conv import causal_conv1d, conv1d_step
from .gemv import linear
from .norm import add_rmsnorm, gated_rmsnorm
from .ssd import ssd_prefill
from .step import mixer_decode_step, ssd_decode_step
from .stream import mixer_decode_out, norm_linear

name = "triton"

__all__ = [
    "name", "linear", "ssd_prefill", "ssd_decode_step", "causal_conv1d", "conv1d_step",
    "gated_rmsnorm", "add_rmsnorm", "mixer_decode_step", "norm_linear",
    "mixer_decode_out",
]
