"""`mamba2 download`: fetch the files of a model that mamba2 reads and print where they are."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .common import fail, progress, size, stderr_console
from .options import choices, value

CheckpointFormat = choices("CheckpointFormat", "hf", "mistral")


def download(
    repo_id: Annotated[str, typer.Argument(
        help="org/name, org/name@revision, or an alias (`mamba2 models` lists them).")],
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit (default main).")] = None,
    fmt: Annotated[Optional[CheckpointFormat], typer.Option(
        "--format", help="Which format of a repo that ships both (default hf).")] = None,
    include: Annotated[Optional[List[str]], typer.Option(
        "--include", help="Only files matching this glob (repeatable), instead of the format's files.")] = None,
    exclude: Annotated[Optional[List[str]], typer.Option(
        "--exclude", help="Skip files matching this glob (repeatable).")] = None,
    local_dir: Annotated[Optional[Path], typer.Option(
        "--local-dir", help="Put the files in this directory instead of the Hugging Face cache.")] = None,
    token: Annotated[Optional[str], typer.Option(
        "--token", help="Hugging Face token (default: HF_TOKEN, or the one `hf auth login` saved).")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress on stderr.")] = False,
):
    """Download the files of a model that mamba2 reads; print the directory they are in."""
    from ..download import download as fetch
    from ..hub import builtin_dir, parse_repo_spec

    builtin = builtin_dir(repo_id)
    if builtin is not None:  # nothing to fetch: print where it is, as for a download
        if not quiet:
            stderr_console().print(f"{repo_id} is built into mamba2: nothing to download", highlight=False)
        typer.echo(str(builtin))
        return
    repo, at = parse_repo_spec(repo_id)
    if at and revision and at != revision:
        fail(f"two revisions given: @{at} and --revision {revision}")
    r = fetch(repo, revision or at, fmt=value(fmt), include=include, exclude=exclude, local_dir=local_dir, token=token,
              progress=progress(quiet))
    if not quiet:
        what = f"{r.format} checkpoint, {len(r.files)} files" if r.format else f"{len(r.files)} files"
        if r.tokenizer_files:
            what += f" + GPT-NeoX tokenizer ({len(r.tokenizer_files)} files)"
        fetched = f"fetched {r.fetched_files} files, {size(r.fetched_bytes)}" if r.fetched_files else "nothing to fetch"
        checked = f"; SHA-256 verified for {r.verified_files}" if r.verified_files else ""
        stderr_console().print(f"{repo} @ {r.commit[:12]}: {what}, {size(r.total_bytes)}; {fetched}{checked}",
                               highlight=False, markup=False, soft_wrap=True)
    typer.echo(str(r.path))
