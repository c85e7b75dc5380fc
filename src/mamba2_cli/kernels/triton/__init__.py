"""The triton backend: the operations of `kernels` (see `kernels.pytorch` for their
contract) on this project's Triton kernels. Imported only when backend 'triton' is chosen.

    ssd_prefill        ssd.py          one pass over the chunks, state carried in registers
    mixer_decode_step  decode_step.py  conv + SSM update + gated norm of one token, in one to three launches
    ssd_decode_step    decode_step.py
    causal_conv1d      conv.py         (and conv1d_step)
    add_rmsnorm        norm.py         (and gated_rmsnorm)
    linear             matvec.py       matvec kernels for decode's 1-8 rows, F.linear (cuBLAS) otherwise
    norm_linear        matvec.py       add_rmsnorm, then linear

Launch configurations: configs.py. Programmatic dependent launch: pdl.py.
"""

from .conv import causal_conv1d, conv1d_step
from .decode_step import mixer_decode_step, ssd_decode_step
from .matvec import linear, norm_linear
from .norm import add_rmsnorm, gated_rmsnorm
from .ssd import ssd_prefill

name = "triton"

__all__ = [
    "name", "linear", "ssd_prefill", "ssd_decode_step", "causal_conv1d", "conv1d_step",
    "gated_rmsnorm", "add_rmsnorm", "mixer_decode_step", "norm_linear",
]
