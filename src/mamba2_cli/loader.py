"""load_model: a model name to (model, tokenizer), ready to generate."""

from __future__ import annotations

import torch

from .checkpoint import load_checkpoint, random_model, resolve_device, resolve_dtype
from .config import preset_config, read_config
from .hub import resolve_model_dir, tokenizer_dir
from .model import Mamba2LM
from .tokenizer import Tokenizer, byte_level_tokenizer


def load_model(model: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               backend: str = "auto", batch_size: int = 1, *, offline: bool = False,
               progress=True, quant: str | None = None) -> tuple[Mamba2LM, Tokenizer]:
    """Load a checkpoint directory, an alias or a HF repo id[@revision] onto `device` in `dtype`.

    A repo id not in the local cache is downloaded first (with `progress` on stderr) unless
    `offline` or HF_HUB_OFFLINE=1. dtype 'auto': bf16 on GPUs; on CPU fp32 when it fits,
    else bf16. backend 'auto': triton on CUDA GPUs, torch elsewhere. quant: None, or 'int8' |
    'int4' to quantize in_proj, out_proj and lm_head as they load (quant.py); a quantized
    checkpoint loads quantized without it.
    """
    dev = resolve_device(device)
    model_dir = resolve_model_dir(model, offline=offline, progress=progress)
    cfg = read_config(model_dir)  # a bad config is the first thing to report
    tokenizer = Tokenizer.from_dir(tokenizer_dir(model_dir, cfg, offline=offline, progress=progress))
    m = load_checkpoint(model_dir, dev, dtype, backend, batch_size, quant=quant)
    return m, tokenizer


def load_preset(name: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                backend: str = "auto", seed: int = 0, batch_size: int = 1,
                quant: str | None = None) -> tuple[Mamba2LM, Tokenizer]:
    """A random-weight model of a known shape with a byte-level tokenizer (benchmarks, demos);
    quant: its projections quantized after the draw."""
    cfg = preset_config(name)
    dev = resolve_device(device)
    spec = None
    if quant is not None:
        from .quant import spec_for

        spec = spec_for(cfg, quant)
    m = random_model(cfg, dev, resolve_dtype(dtype, cfg, dev, batch_size, spec), seed)
    if quant is not None:
        from .quant import quantize_model

        quantize_model(m, quant)
    m.set_backend(backend)
    return m, byte_level_tokenizer()
