"""Launch configurations of the Triton kernels, declared once, as data.

`TABLES[capability][kernel][entry]` is one launch configuration (a dict); each kernel's
wrapper picks the entry by shape or batch size (the rule sits beside the wrapper) and
reads it through `config_for`. Nothing is autotuned: a tuning run would apply the in-place
state updates several times, and fixed values give the same kernel on every run.

One capability is declared today, (9, 0): values tuned on an H200. Every CUDA device and
Triton's CPU interpreter use it; a device whose capability has its own table uses that
one instead. Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import torch

HOPPER = (9, 0)

# Matrix-vector products of decode (matvec.py), by rows of x and K (the input width).
MATVEC = {
    # One row, K up to 16384: every weight row loaded whole, all loads issued at once
    # (in_proj 35.2 µs per layer against 37.1 for K tiles).
    "rows1": {"kind": "whole_rows", "block_n": 1, "num_warps": 8, "evict_first": False, "pdl": True},
    # Codestral's out_proj (K 8192): 2 weight rows per program, 4 warps, weights evicted
    # first (16.85 µs against 17.08 without the eviction hint).
    "rows1_k8192": {"kind": "whole_rows", "block_n": 2, "num_warps": 4, "evict_first": True, "pdl": True},
    # One row longer than 16384 (a whole row would not fit in registers): K in tiles of 1024.
    "rows1_long": {"kind": "k_tiles", "block_n": 1, "block_k": 1024, "num_warps": 8, "pdl": True},
    # 2-8 rows: tensor cores on x padded to 16 rows, tiles through tensor descriptors
    # (in_proj 39.2 µs against 40.6 with 16-byte copies).
    "rows2-8": {"kind": "tensor_cores", "block_n": 64, "block_k": 256, "num_warps": 4, "num_stages": 4,
                "tma": True, "pdl": True, "early_tile": False},
    # K 8192 follows the step's short norm kernel: its first weight tile loaded before the
    # wait pays there (batch-8 decode 5683 against 5696 µs per step), not on K 4096.
    "rows2-8_k8192": {"kind": "tensor_cores", "block_n": 64, "block_k": 256, "num_warps": 4, "num_stages": 4,
                      "tma": True, "pdl": True, "early_tile": True},
}

# The mixer's decode step (decode_step.py), by batch size. BLOCK_P: rows of a head per
# program; split: the gated norm as a second kernel (norm_warps warps) rather than in each
# group's last program; pdl: programmatic dependent launch; bc_pre: a first kernel
# convolves each group's B and C once.
DECODE_STEP = {
    # 512 programs at batch 1; split + PDL: 6.39 µs per layer against 8.38 fused.
    "batch1": {"BLOCK_P": 16, "num_warps": 4, "split": True, "pdl": True, "norm_warps": 8, "bc_pre": False},
    # One program per head, split + PDL: 11.36 µs per layer at batch 2 against 12.09 fused.
    "batch2-3": {"BLOCK_P": 64, "num_warps": 2, "split": True, "pdl": True, "norm_warps": 8, "bc_pre": False},
    # The fused step without PDL: 16.36 µs per layer at batch 4 against 16.70 split.
    "batch4-7": {"BLOCK_P": 64, "num_warps": 2, "split": False, "pdl": False, "norm_warps": 4, "bc_pre": False},
    # B and C convolved first, one warp per 32 rows: 27.8 µs per layer at batch 8 against 32.1.
    "batch8+": {"BLOCK_P": 32, "num_warps": 1, "split": True, "pdl": True, "norm_warps": 8, "bc_pre": True},
    # ssd_decode_step on its own (the backend operation; decode runs the fused step).
    "ssd_step": {"BLOCK_P": 64, "num_warps": 4},
}

# The SSD prefill scan (ssd.py), by programs (sequence, head, 64-row block) and length.
SSD = {
    # Few programs, 16-bit inputs: C B^T from a pre-pass, once per group (batch 1 L16384
    # 0.92 ms against 1.44 computing it per head).
    "few": {"CHUNK": 64, "BLOCK_P": 32, "num_warps": 4, "num_stages": 2, "CB_PRECOMPUTED": True,
            "SEGMENTS": None, "SPLIT_PROGRAMS": 256, "SPLIT_MIN_CHUNKS": 16},
    # From 256 programs (or batch 1 cut into segments): C B^T in the scan, which is then
    # throughput-bound (batch 8 L4096 1.24 ms against 1.48 with the pre-pass).
    "many": {"CHUNK": 32, "BLOCK_P": 64, "num_warps": 4, "num_stages": 3, "CB_PRECOMPUTED": False},
    # fp32 inputs: tiles twice the bytes.
    "fp32": {"CHUNK": 64, "BLOCK_P": 64, "num_warps": 8, "num_stages": 1, "CB_PRECOMPUTED": True},
    # The states-only first pass of a sequence cut into segments.
    "states": {"BLOCK_P": 64, "num_warps": 4, "num_stages": 2, "STATE_T": True},
    # ... after "many" at batch 1: S [P, N] and 4 stages (0.779 ms at L16384 against 0.788).
    "many_states": {"num_stages": 4, "STATE_T": False},
    # The C B^T pre-pass.
    "cb": {"num_warps": 4, "num_stages": 2},
    # Batch 1 takes "many" cut into segments when that gives at least min_segments of
    # min_chunks chunks, about target programs in all (4 segments: 0.79 ms at Codestral's
    # L16384 against 0.92 whole).
    "rules": {"many_programs": 256, "split_target": 512, "split_min_segments": 4},
}

# Causal conv1d (conv.py).
CONV = {
    # Width 4: 16 positions of 256 channels per program walked row by row, each input loaded
    # once (4096 Codestral tokens: 54 µs; the tile kernel 103 or more).
    "rows": {"ROWS": 16, "BLOCK_C": 256, "num_warps": 2},
    # Other widths: a tile of positions x channels.
    "tile": {"BLOCK_L": 32, "BLOCK_C": 128, "num_warps": 4},
    "step": {"BLOCK_C": 256, "num_warps": 4},
}

# The norms (norm.py): ROWS rows per program; warps by the tile's width, as
# (widest tile, warps) pairs in order.
NORM = {
    "add": {"ROWS": 1, "warps_by_width": ((2048, 4), (8192, 8), (None, 16)),
            # PDL for decode's few rows: the norm weight is loaded before the wait.
            "pdl_max_rows": 8},
    "gated": {"ROWS": 1, "warps_by_width": ((2048, 4), (8192, 8), (None, 16))},
}

TABLES = {HOPPER: {"matvec": MATVEC, "decode_step": DECODE_STEP, "ssd": SSD, "conv": CONV, "norm": NORM}}

_CAPABILITY: dict = {}


def capability(device) -> tuple[int, int] | None:
    """The CUDA device's compute capability (None elsewhere), looked up once per device."""
    if getattr(device, "type", device) != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx]


def config_for(device, kernel: str, entry: str) -> dict:
    """The launch configuration `entry` of `kernel` for this device (read-only: copy to change)."""
    return TABLES.get(capability(device), TABLES[HOPPER])[kernel][entry]


def warps_for(pairs, width: int) -> int:
    """The warps of the first (widest tile, warps) pair whose width holds `width`."""
    for most, warps in pairs:
        if most is None or width <= most:
            return warps
    raise ValueError(width)
