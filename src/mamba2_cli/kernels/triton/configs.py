"""Launch configurations of the Triton kernels, declared once, as data, per GPU architecture.

`TABLES[capability][kernel][entry]` is one launch configuration (a dict); each kernel's
wrapper picks the entry by shape or batch size (the rule sits beside the wrapper) and
reads it through `config_for`. Nothing is autotuned: a tuning run would apply the in-place
state updates several times, and fixed values give the same kernel on every run.

Every decision that depends on the GPU is in the table of its compute capability: PDL and
tensor descriptors (per entry, "pdl" and "tma"), pipeline stages, block sizes, warps, the
batch-size entries, and `TABLES[cap]["gpu"]` (the shared memory the matvec pipeline may
fill, whether the architecture has PDL at all). Tables:

    (9, 0)  Hopper (H100, H200): tuned on an H200. Triton's CPU interpreter uses it too.
    (8, 0)  A100, A30: 163 KB of shared memory per block.
    (8, 6)  RTX 30xx, A10, A40, RTX A6000: 99 KB per block.
    (8, 9)  RTX 40xx, L4, L40, RTX 6000 Ada: 99 KB per block.
    FALLBACK  any other capability (Blackwell's 10.0 and 12.0 among them): the 8.6 values,
            which use no Hopper-only instruction (griddepcontrol for PDL, TMA descriptors)
            and fit 99 KB of shared memory, the least of any GPU Triton targets from sm_80.

No Ampere or Ada card has been measured: their tables change from Hopper's only what the
hardware forces (no PDL, no tensor descriptors, smaller shared memory) and keep Hopper's
blocks and warps where the register file allows (64K 32-bit registers per SM on every one
of them; 64 resident warps per SM on sm_80 and sm_90, 48 on sm_86 and sm_89).
tests/test_compile_targets.py compiles every kernel at every entry for each target and
checks shared memory, registers and spills against that architecture's limits.
Hopper figures: benchmarks/RESULTS.md.
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

# Products with int8/int4 weights (quant_matvec.py), by scheme and rows of x: fma, one row
# over K in tiles with a register double buffer; dot, 2-8 rows on tensor cores, the weight
# dequantized in registers. "dequantize": the prompts' kernel, the weight into x's dtype.
# The values are untuned first guesses, each program streaming a few KB per step.
QUANT_MATVEC = {
    "int8_rows1": {"kind": "fma", "block_n": 4, "block_k": 1024, "num_warps": 4, "pdl": True},
    "int8_rows2-8": {"kind": "dot", "block_n": 64, "block_k": 256, "num_warps": 4, "num_stages": 4, "pdl": True},
    "int4_rows1": {"kind": "fma", "block_n": 4, "block_k": 2048, "num_warps": 4, "pdl": True},
    "int4_rows2-8": {"kind": "dot", "block_n": 64, "num_warps": 4, "num_stages": 4, "pdl": True},
    "dequantize": {"block_n": 16, "block_k": 256, "num_warps": 4},
}

# What the architecture allows, for every kernel. dot_smem_bytes: the shared memory the
# matvec's tensor-core pipeline may fill (matvec.dot_stages lowers the stages to fit it);
# an H100/H200 block gets at most 227 KB. pdl: programmatic dependent launch exists
# (griddepcontrol, sm_90 and later); an entry's "pdl" asks for it, this allows it.
GPU = {"pdl": True, "dot_smem_bytes": 192 * 1024}

HOPPER_TABLE = {"gpu": GPU, "matvec": MATVEC, "decode_step": DECODE_STEP, "ssd": SSD, "conv": CONV, "norm": NORM,
                "quant_matvec": QUANT_MATVEC}


def _without_hopper(table: dict, dot_smem_bytes: int, dot_stages: int) -> dict:
    """Hopper's table less what only Hopper has, for a GPU whose block gets less shared memory.

    - No PDL: griddepcontrol needs sm_90 (ptxas refuses it below), so every "pdl" is off.
    - No tensor descriptors (TMA is sm_90's copy engine): the matvec's tiles arrive as
      16-byte copies (cp.async), and the early tile, which only pays under PDL, is off.
    - The matvec pipeline: `dot_stages` stages of its 40 KB tiles (64 + 16 rows x 256 x 2
      bytes) within dot_smem_bytes (which leaves the rest of the block's shared memory to the
      layout conversions).
    - The decode step without PDL: the fused form (the norm in each group's last program),
      which beats the split one once the norm's launch is no longer hidden (Hopper without
      PDL, batch 4: 16.36 µs per layer against 16.70 split); batch 8 keeps its B and C
      pre-kernel, whose gain (27.8 against 32.1 µs) does not come from PDL.
    - The norms: no PDL rows.
    - The quantized products: no PDL, and the tensor-core ("dot") kernels take the matvec's
      `dot_stages` (their tiles are smaller: 64 x 256 int8 weights and 16 rows of x).
    The scan's, the conv's and the norms' blocks and warps stay: tests/test_compile_targets.py
    shows them within 99 KB of shared memory on sm_80, sm_86 and sm_89, spilling at most
    512 bytes per thread more than on sm_90 (the scan's batch-1 entry: 448 against 168).
    """
    matvec = {}
    for name, cfg in table["matvec"].items():
        cfg = {**cfg, "pdl": False}
        if cfg["kind"] == "tensor_cores":
            cfg.update(tma=False, early_tile=False, num_stages=dot_stages)
        matvec[name] = cfg
    step = {}
    for name, cfg in table["decode_step"].items():
        if "split" in cfg:
            cfg = {**cfg, "pdl": False, "split": bool(cfg["bc_pre"])}
        step[name] = cfg
    norm = {**table["norm"], "add": {**table["norm"]["add"], "pdl_max_rows": 0}}
    quant = {}
    for name, cfg in table["quant_matvec"].items():
        if "pdl" in cfg:
            cfg = {**cfg, "pdl": False}
        if cfg.get("kind") == "dot":
            cfg = {**cfg, "num_stages": dot_stages}
        quant[name] = cfg
    return {"gpu": {"pdl": False, "dot_smem_bytes": dot_smem_bytes}, "matvec": matvec, "decode_step": step,
            "ssd": table["ssd"], "conv": table["conv"], "norm": norm, "quant_matvec": quant}


# The stages are counted as Hopper's tensor-descriptor pipeline spends them, one 40 KB tile
# each (4 stages: 160 KB there); Triton's 16-byte-copy pipeline, used here, holds one tile
# fewer, so these tables leave room to spare: measured by the compile test, 3 stages take
# 80 KB of sm_80's 163 KB and 2 stages 40 KB of sm_86's and sm_89's 99 KB.
AMPERE_SM80 = _without_hopper(HOPPER_TABLE, dot_smem_bytes=144 * 1024, dot_stages=3)
AMPERE_SM86 = _without_hopper(HOPPER_TABLE, dot_smem_bytes=88 * 1024, dot_stages=2)
FALLBACK = AMPERE_SM86

TABLES = {
    HOPPER: HOPPER_TABLE,
    (8, 0): AMPERE_SM80,
    (8, 6): AMPERE_SM86,
    (8, 9): AMPERE_SM86,
}

_CAPABILITY: dict = {}


def capability(device) -> tuple[int, int] | None:
    """The CUDA device's compute capability (None elsewhere), looked up once per device."""
    if getattr(device, "type", device) != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = tuple(torch.cuda.get_device_capability(idx))
    return _CAPABILITY[idx]


def table_key(cap: tuple[int, int] | None) -> tuple[int, int] | None:
    """The TABLES key for a capability: its own, Hopper's for the interpreter (None), or
    None for the fallback."""
    if cap is None:
        return HOPPER
    return cap if cap in TABLES else None


def table_for_capability(cap: tuple[int, int] | None) -> dict:
    key = table_key(cap)
    return TABLES[key] if key is not None else FALLBACK


def config_for(device, kernel: str, entry: str) -> dict:
    """The launch configuration `entry` of `kernel` for this device (read-only: copy to change)."""
    return table_for_capability(capability(device))[kernel][entry]


ARCHITECTURES = {7: "Volta", 8: "Ampere", 9: "Hopper", 10: "Blackwell", 11: "Blackwell", 12: "Blackwell"}


def architecture(cap: tuple[int, int]) -> str:
    """'sm_90 (Hopper)' for (9, 0); Ada is sm_89 within the 8.x family; Turing is 7.5."""
    name = "Ada" if cap == (8, 9) else "Turing" if cap == (7, 5) else ARCHITECTURES.get(cap[0], "unknown")
    return f"sm_{cap[0]}{cap[1]} ({name})"


def table_name(cap: tuple[int, int] | None) -> str:
    """The table a capability uses, as the CLI names it: 'table 9.0' or 'fallback'."""
    key = table_key(cap)
    return f"table {key[0]}.{key[1]}" if key is not None else "fallback"


def warps_for(pairs, width: int) -> int:
    """The warps of the first (widest tile, warps) pair whose width holds `width`."""
    for most, warps in pairs:
        if most is None or width <= most:
            return warps
    raise ValueError(width)
