"""Model names -> local directories: a path, or a Hugging Face repo id already in the local cache."""

from __future__ import annotations

from pathlib import Path

from .errors import Mamba2Error


def split_revision(spec: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev')."""
    if "@" in spec:
        repo, rev = spec.rsplit("@", 1)
        return repo, rev or None
    return spec, None


def looks_like_repo_id(spec: str) -> bool:
    repo, _ = split_revision(spec)
    parts = repo.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not spec.startswith((".", "/", "~"))
        and all(c.isalnum() or c in "-_." for c in repo.replace("/", ""))
    )


def resolve_model_dir(spec: str) -> Path:
    """A model directory for `spec`: an existing directory, or a repo id found in the HF cache."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise Mamba2Error(f"{spec}: is a file; give the model's directory")
        return path
    if not looks_like_repo_id(spec):
        raise Mamba2Error(f"{spec}: no such model directory")
    repo, revision = split_revision(spec)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        raise Mamba2Error(
            f"{spec}: not a local directory, and not in the Hugging Face cache; "
            f"fetch it first with `mamba2 download {repo}`"
        ) from None
