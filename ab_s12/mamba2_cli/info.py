"""What `mamba2 info` reports about a checkpoint: format, shape, parameters, bytes, dtype, and
the memory that weights and recurrent state need, read from the files without loading them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .config import read_config
from .errors import Mamba2Error
from .hub import directory_size

_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def stored_dtypes(files: list[Path]) -> Counter:
    """Bytes per dtype in weight files (safetensors headers; .bin files through torch, memory-mapped)."""
    counts: Counter = Counter()
    for path in files:
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(n))
                except ValueError:
                    raise Mamba2Error(f"{path}: not a valid safetensors file (unreadable header)") from None
            for name, t in header.items():
                if name != "__metadata__" and isinstance(t, dict):
                    begin, end = t.get("data_offsets", (0, 0))
                    counts[_ST_NAMES.get(t.get("dtype"), str(t.get("dtype")).lower())] += end - begin
        else:
            import torch

            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            for t in sd.values():
                if isinstance(t, torch.Tensor):
                    counts[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    return counts


def describe(model_dir: Path, batch_size: int = 1, dtype: str | None = None) -> dict:
    """Facts about a checkpoint directory; memory is for `dtype` (default: the stored one)."""
    from .checkpoint import find_weight_files

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    weights = find_weight_files(model_dir)
    dtypes = stored_dtypes(weights)
    stored = dtypes.most_common(1)[0][0] if dtypes else None
    compute = _DTYPE_ALIASES.get(dtype, dtype) if dtype else (stored if stored in DTYPE_BYTES else "bfloat16")
    if compute not in DTYPE_BYTES:
        raise Mamba2Error(f"unknown dtype {dtype!r}; choose bfloat16, float16 or float32")
    itemsize = DTYPE_BYTES[compute]
    # Per sequence and layer: the conv window (K-1 inputs of the conv channels) in the model
    # dtype, and the SSM state (heads x headdim x d_state) in fp32 whatever the model dtype.
    conv = cfg.n_layer * cfg.conv_dim * (cfg.d_conv - 1) * itemsize
    ssm = cfg.n_layer * cfg.nheads * cfg.headdim * cfg.d_state * 4
    params = cfg.num_parameters()
    return {
        "path": str(model_dir),
        "format": cfg.format,
        "config": cfg.to_dict(),
        "parameters": params,
        "bytes_on_disk": directory_size(model_dir),
        "weight_files": [p.name for p in weights],
        "weights_bytes_on_disk": sum(p.stat().st_size for p in weights),
        "stored_dtype": stored,
        "state_per_sequence": {"conv": conv, "ssm": ssm, "total": conv + ssm},
        "memory": {"dtype": compute, "batch_size": batch_size, "weights": params * itemsize,
                   "state": batch_size * (conv + ssm), "total": params * itemsize + batch_size * (conv + ssm)},
    }
