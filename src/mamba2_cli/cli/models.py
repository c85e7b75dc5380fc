"""`mamba2 models`: the built-in models, the Mamba-2 models in the local cache, and the aliases."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .common import dumps, size


def models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False):
    """List the Mamba-2 models in the local Hugging Face cache, and the aliases for real checkpoints."""
    from ..hub import ALIASES, BUILTIN, DEFAULT_MODEL, cached_models

    cached = cached_models()
    aliased = {m.repo_id for m in cached if not m.missing}
    builtin = [{"name": n, "path": str(p), "default": n == DEFAULT_MODEL,
                "size": sum(f.stat().st_size for f in p.glob("*.safetensors"))} for n, p in BUILTIN.items()]
    if as_json:
        obj = {"builtin": builtin, "cached": [{"repo_id": m.repo_id, "commit": m.commit, "refs": m.refs, "path": str(m.path),
                           "format": m.format, "size": m.size, "complete": not m.missing, "missing": m.missing}
                          for m in cached],
               "aliases": [{"alias": a, "repo_id": r, "cached": r in aliased} for a, r in ALIASES.items()]}
        sys.stdout.write(dumps(obj, indent=1) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    t = Table(title="built into mamba2 (no download)")
    for col in ("model", "weights", "note"):
        t.add_column(col)
    for b in builtin:
        t.add_row(b["name"], size(b["size"]), "default for run and chat; writes Python" if b["default"] else "")
    out.print(t)
    if cached:
        t = Table(title="Mamba-2 models in the local cache")
        for col in ("model", "revision", "format", "size", "status"):
            t.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
        for m in cached:
            rev = ", ".join(m.refs) + f" ({m.commit[:8]})" if m.refs else m.commit[:12]
            status = "complete" if not m.missing else f"partial: missing {', '.join(m.missing[:2])}"
            t.add_row(m.repo_id, rev, m.format, size(m.size), status)
        out.print(t)
    else:
        out.print("no Mamba-2 models in the local cache")
    t = Table(title="aliases (for -m; --preset names random-weight shapes)")
    for col in ("alias", "repo", "cached"):
        t.add_column(col)
    for a, r in ALIASES.items():
        t.add_row(a, r, "yes" if r in aliased else "no")
    out.print(t)
