"""Compile the prefill scan for sm_90 with and without the conv fold (ssd.CONV_FOLD) and read
the machine code: registers, spills, loads. No device.

    PYTHONPATH=src python3 benchmarks/sass_fold.py   # at 9b6930d, which has the fold

Codestral's layer (H 128, P 64, G 8, N 128, bf16), as the 65k prefill runs it: batch 1 in
segments, SCAN_CONFIG_MANY for the main pass and its states pass (SPLIT_STATES).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from triton.backends.compiler import GPUTarget  # noqa: E402

from mamba2_cli.kernels import ssd  # noqa: E402
from sass_round5 import compile_one, sass_stats  # noqa: E402

PTRS = ["x_ptr", "dt_ptr", "A_ptr", "B_ptr", "C_ptr", "D_ptr", "dt_bias_ptr", "cb_ptr", "init_ptr", "y_ptr",
        "final_ptr", "len_ptr", "seg_state_ptr", "seg_decay_ptr", "cw_ptr", "cbias_ptr", "xs_ptr"]
F32 = {"A_ptr", "D_ptr", "dt_bias_ptr", "init_ptr", "final_ptr", "len_ptr", "seg_state_ptr", "seg_decay_ptr"}
INTS = ["L", "H", "P", "N", "G", "heads_per_group", "nchunks", "seg_chunks", "nseg",
        "stride_x_b", "stride_x_l", "stride_x_h", "stride_dt_b", "stride_dt_l", "stride_dt_h",
        "stride_B_b", "stride_B_l", "stride_B_g", "stride_C_b", "stride_C_l", "stride_C_g",
        "stride_D_h", "stride_D_p", "stride_y_b", "stride_y_l", "stride_y_h",
        "stride_s_b", "stride_s_h", "stride_s_p", "stride_xs_b", "stride_xs_k"]
NOT16 = {"heads_per_group", "nchunks", "seg_chunks", "nseg", "G", "stride_D_h", "stride_D_p"}


def build(states_only: bool, conv_x: int):
    cfg = dict(ssd.SCAN_CONFIG_MANY)
    if states_only:
        cfg.update(ssd.SPLIT_STATES_CONFIG, **ssd.SPLIT_STATES)
    sig = {p: ("*fp32" if p in F32 else "*bf16") for p in PTRS}
    sig.update({i: "i32" for i in INTS})
    sig.update(dt_lo="fp32", dt_hi="fp32")
    consts = dict(CHUNK=cfg["CHUNK"], BLOCK_P=cfg["BLOCK_P"], BLOCK_N=128, CB_PRECOMPUTED=False, HAS_INIT=True,
                  DT_CLAMP=False, DOT_PRECISION="tf32", PREFETCH=cfg["PREFETCH"], FOLD_DECAY=False,
                  STATE_T=cfg["STATE_T"], D_IN_SCORES=not states_only and cfg["D_IN_SCORES"], HAS_LEN=False,
                  STATES_ONLY=states_only, SPLIT=True, CONV_X=conv_x, HAS_CBIAS=conv_x > 0)
    div16 = set(PTRS) | {i for i in INTS if i not in NOT16}
    return compile_one(ssd._ssd_scan_kernel, sig, consts, div16, GPUTarget("cuda", 90, 32),
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def main() -> int:
    for states_only in (False, True):
        for conv_x in (0, 1, 2, 3):
            k = build(states_only, conv_x)
            print(f"{'states' if states_only else 'main  '} CONV_X={conv_x}: {sass_stats(k)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
