"""`mamba2 quantize`: write a checkpoint with int8 or int4 projections."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import fail, progress, size
from .options import MODEL_HELP, Device, Offline, QuantScheme, WeightDType, value


def quantize(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    to: Annotated[QuantScheme, typer.Option("--to", help="int8: one scale per output channel; int4: one per "
                                            "group of up to 128 inputs, two weights to a byte.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="New directory to write the checkpoint to.")],
    device: Device = "auto",
    dtype: Annotated[Optional[WeightDType], typer.Option(
        "--dtype", case_sensitive=False, metavar="<bfloat16|float16|float32>",
        help="dtype of the scales and of the weights that stay (default: as stored).")] = None,
    offline: Offline = False,
):
    """Quantize in_proj, out_proj and lm_head of a checkpoint into a new directory that `run -m` loads."""
    from ..checkpoint import find_weight_files, load_checkpoint, resolve_device
    from ..config import read_config
    from ..hub import resolve_model, tokenizer_dir
    from ..info import stored_dtypes
    from ..quant import write_checkpoint

    out_dir = Path(output)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):  # before the long load
        fail(f"{out_dir} exists and is not an empty directory")
    model_dir = resolve_model(model, offline=offline, progress=progress(False))
    cfg = read_config(model_dir)
    files = find_weight_files(model_dir)
    stored = stored_dtypes(files).most_common(1)
    dt = value(dtype) or (stored[0][0] if stored and stored[0][0] in ("float32", "bfloat16", "float16") else "bfloat16")
    m = load_checkpoint(model_dir, resolve_device(device), dt, "torch", quant=value(to))
    out = write_checkpoint(m, model_dir, tokenizer_dir(model_dir, cfg, offline=offline), output)
    before = sum(f.stat().st_size for f in files)
    after = (out / "model.safetensors").stat().st_size
    typer.echo(f"wrote {out}: {value(to)} weights, {size(after)} (from {size(before)})")
