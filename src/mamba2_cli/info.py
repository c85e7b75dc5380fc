"""What `mamba2 info` reports about a checkpoint: format, shape, parameters, bytes, dtype, and
the memory that weights and recurrent state need, read from the files without loading them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .config import read_config
from .errors import Mamba2Error
from .hub import directory_size
from .quant import read_spec, weight_bytes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def stored_dtypes(files: list[Path]) -> Counter:
    """Bytes per dtype in weight files: safetensors headers, or .bin files through torch, memory-mapped."""
    import math

    from .checkpoint import SAFETENSORS_DTYPES, iter_bin_tensors, open_safetensors

    counts: Counter = Counter()
    for path in files:
        if path.suffix == ".safetensors":
            with open_safetensors(path) as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
                    if dtype is None:  # a dtype the loader refuses: named, its size not counted
                        counts[view.get_dtype().lower()] += 0
                    else:
                        counts[str(dtype).removeprefix("torch.")] += math.prod(view.get_shape()) * dtype.itemsize
        else:
            for _, t in iter_bin_tensors(path):
                counts[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    return counts


def describe(model_dir: Path, batch_size: int = 1, dtype: str | None = None) -> dict:
    """Facts about a checkpoint directory; memory is for `dtype` (default: the stored one)."""
    from .checkpoint import find_weight_files

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    weights = find_weight_files(model_dir)
    dtypes = stored_dtypes(weights)
    quant = read_spec(model_dir, cfg)
    # A quantized checkpoint's integer weights are not its dtype: the scales and the rest are.
    floats = Counter({k: v for k, v in dtypes.items() if k in DTYPE_BYTES}) if quant else dtypes
    stored = floats.most_common(1)[0][0] if floats else None
    compute = _DTYPE_ALIASES.get(dtype, dtype) if dtype else (stored if stored in DTYPE_BYTES else "bfloat16")
    if compute not in DTYPE_BYTES:
        raise Mamba2Error(f"unknown dtype {dtype!r}; choose bfloat16, float16 or float32")
    itemsize = DTYPE_BYTES[compute]
    # Per sequence and layer: the conv window (K-1 inputs of the conv channels) in the model
    # dtype, and the SSM state (heads x headdim x d_state) in fp32 whatever the model dtype.
    conv = cfg.n_layer * cfg.conv_dim * (cfg.d_conv - 1) * itemsize
    ssm = cfg.n_layer * cfg.nheads * cfg.headdim * cfg.d_state * 4
    params = cfg.num_parameters()
    weight_mem = weight_bytes(cfg, itemsize, quant)
    return {
        "path": str(model_dir),
        "format": cfg.format,
        "config": cfg.to_dict(),
        "parameters": params,
        "bytes_on_disk": directory_size(model_dir),
        "weight_files": [p.name for p in weights],
        "weights_bytes_on_disk": sum(p.stat().st_size for p in weights),
        "stored_dtype": stored,
        "quantization": quant.to_dict() if quant else None,
        "state_per_sequence": {"conv": conv, "ssm": ssm, "total": conv + ssm},
        "memory": {"dtype": compute, "batch_size": batch_size, "weights": weight_mem,
                   "state": batch_size * (conv + ssm), "total": weight_mem + batch_size * (conv + ssm)},
    }
