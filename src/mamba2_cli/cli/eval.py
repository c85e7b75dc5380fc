"""`mamba2 eval`: perplexity and bits per byte of a text file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .common import dumps, fail
from .options import MODEL_HELP, BackendOption, Device, DTypeOption, Offline, QuantOption, Threads, load


def eval(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    file: Annotated[Path, typer.Argument(help="UTF-8 text file to score.")],
    quant: QuantOption = None,
    piece: Annotated[int, typer.Option(
        "--piece", min=1, help="Tokens per forward pass; the state carries across pieces.")] = 1024,
    device: Device = "auto",
    dtype: DTypeOption = "auto",
    backend: BackendOption = "auto",
    threads: Threads = None,
    offline: Offline = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Perplexity and bits per byte of a text file, read in pieces with the state carried."""
    from ..evaluate import score_text

    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"{file} is not UTF-8 text")
    except OSError as e:
        fail(f"cannot read {file}: {e.strerror or e}")
    loaded = load(model, None, offline, device, dtype, backend, threads, quiet=True, quant=quant)
    m = loaded.model
    r = score_text(m, loaded.tokenizer, text, piece)
    r.update(model=model, file=str(file), quant=m.quant.scheme if m.quant else None,
             dtype=str(m.dtype).removeprefix("torch."), piece=piece)
    if as_json:
        sys.stdout.write(dumps(r, indent=1) + "\n")
        return
    weights = r["quant"] or r["dtype"]
    typer.echo(f"{file}: {r['tokens']:,} tokens, {r['bytes']:,} bytes · {model} ({weights} weights)")
    typer.echo(f"perplexity {r['perplexity']:.4f} · {r['bits_per_token']:.4f} bits/token · "
               f"{r['bits_per_byte']:.4f} bits/byte")
