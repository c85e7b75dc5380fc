"""`mamba2 info`: what a model is and what it needs in memory."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from .common import count, dumps, progress, revision_of, size
from .options import MODEL_HELP, Offline, WeightDType, value


def _gpu() -> dict:
    """The first CUDA device, its architecture and the kernels' configuration table."""
    import torch

    from ..kernels import describe_device

    return describe_device(torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


def info(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Sequences in flight, for the memory figure.")] = 1,
    dtype: Annotated[Optional[WeightDType], typer.Option(
        "--dtype", case_sensitive=False, metavar="<bfloat16|float16|float32>",
        help="The dtype of the memory figure (default: as stored).")] = None,
    offline: Offline = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Format, shape, parameters, size, dtype, and the memory for weights and state of a model."""
    from ..hub import resolve_model
    from ..info import describe

    model_dir = resolve_model(model, offline=offline, progress=progress(as_json))
    d = describe(model_dir, batch_size, value(dtype))
    d["model"] = model
    d["revision"] = revision_of(model_dir)
    d["gpu"] = _gpu()
    if as_json:
        sys.stdout.write(dumps(d, indent=1) + "\n")
        return
    c, st, mem = d["config"], d["state_per_sequence"], d["memory"]
    rev = f" @ {d['revision'][:12]}" if d["revision"] else ""
    rows = [
        ("model", f"{model}{rev}  ({d['path']})"),
        ("format", d["format"]),
        ("config", f"d_model {c['d_model']} · {c['n_layer']} layers · {c['expand'] * c['d_model'] // c['headdim']} heads × "
                   f"headdim {c['headdim']} · {c['ngroups']} group(s) · d_state {c['d_state']} · d_conv {c['d_conv']} · "
                   f"chunk {c['chunk_size']} · vocab {c['vocab_size']}" + (" · tied embeddings" if c["tie_embeddings"] else "")),
        ("parameters", f"{d['parameters']:,} ({count(d['parameters'])})"),
        ("on disk", f"{size(d['bytes_on_disk'])} ({len(d['weight_files'])} weight file(s), "
                    f"{size(d['weights_bytes_on_disk'])})"),
        ("dtype", f"{d['stored_dtype'] or '?'} (as stored)"),
        *([("quantization", _quant_line(d["quantization"]))] if d["quantization"] else []),
        ("state", f"{size(st['total'])} per sequence: conv {size(st['conv'])} ({mem['dtype']}) + "
                  f"SSM {size(st['ssm'])} (float32), whatever the context length"),
        ("memory", f"{size(mem['total'])} at batch {mem['batch_size']}: weights {size(mem['weights'])} "
                   f"({_weights(d, mem)}) + state {size(mem['state'])}"),
    ]
    g = d["gpu"]
    rows.append(("gpu", f"{g['gpu']} · {g['architecture']} · Triton kernels: {g['kernel_table'] or 'no triton'}"
                 if g["gpu"] else "none (no CUDA device)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{width}}  {v}")


def _quant_line(q: dict) -> str:
    """The quantization of a checkpoint, in words."""
    if q["scheme"] == "int8":
        return "int8 in_proj, out_proj and lm_head: one scale per output channel"
    groups = ", ".join(f"{p} {g}" for p, g in q["group_size"].items())
    return f"int4 in_proj, out_proj and lm_head, two to a byte: one scale per group of inputs ({groups})"


def _weights(d: dict, mem: dict) -> str:
    q = d["quantization"]
    return f"{q['scheme']} projections, the rest {mem['dtype']}" if q else mem["dtype"]
