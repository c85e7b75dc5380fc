"""Model names -> local directories: a path, an alias, or a Hugging Face repo id[@revision].

A repo id whose files are complete in the local Hugging Face cache is used with no network
access at all; one that is not is downloaded first (download.py) unless offline mode is on
(`--offline`, HF_HUB_OFFLINE=1). Aliases name real checkpoints; `--preset` names
random-weight shapes (config.PRESETS), and the two never stand in for each other.

The cache is huggingface_hub's: its offline switch, cache lookup and cache scan are used as
they are, imported only where a repo id is looked up (`--preset` and the built-in model never
import huggingface_hub).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import Mamba2Error

ALIASES = {
    "codestral": "mistralai/Mamba-Codestral-7B-v0.1",
    "mamba2-130m": "state-spaces/mamba2-130m",
    "mamba2-370m": "state-spaces/mamba2-370m",
    "mamba2-780m": "state-spaces/mamba2-780m",
    "mamba2-1.3b": "state-spaces/mamba2-1.3b",
    "mamba2-2.7b": "state-spaces/mamba2-2.7b",
}

# Models that ship inside the package (see scripts/train_tiny.py); `run` uses the first by default.
BUILTIN = {"tiny-code": Path(__file__).resolve().parent / "assets" / "tiny-code"}
DEFAULT_MODEL = "tiny-code"


def builtin_dir(name: str) -> Path | None:
    """The directory of a built-in model, None when `name` names none."""
    path = BUILTIN.get(name.lower())
    if path is None:
        return None
    if not (path / "config.json").is_file():
        raise Mamba2Error(f"the built-in model {name!r} is missing from this installation ({path}); reinstall mamba2")
    return path


# mamba_ssm checkpoints carry no tokenizer; mamba_ssm's own scripts load this one.
GPT_NEOX_TOKENIZER_REPO = "EleutherAI/gpt-neox-20b"

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


def expand_alias(spec: str) -> str:
    """'codestral' -> 'mistralai/Mamba-Codestral-7B-v0.1' (a revision suffix is kept)."""
    name, rev = split_revision(spec)
    repo = ALIASES.get(name.lower())
    if repo is None:
        return spec
    return f"{repo}@{rev}" if rev else repo


def parse_repo_spec(spec: str, what: str = "not an alias or a Hugging Face repo id (org/name)") -> tuple[str, str | None]:
    """An alias or 'org/name[@revision]' -> (repo id, revision); a preset name is refused with a hint."""
    from .config import PRESETS

    name = split_revision(spec)[0]
    if name in PRESETS and name.lower() not in ALIASES:
        real = " (-m codestral is the real Mamba-Codestral)" if name.startswith("codestral") else ""
        raise Mamba2Error(f"{spec!r} is a random-weight preset, not a checkpoint: use --preset {name}{real}")
    full = expand_alias(spec)
    if not looks_like_repo_id(full):
        raise Mamba2Error(f"{spec}: {what}")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo, revision = split_revision(full)
    try:
        validate_repo_id(repo)  # what huggingface_hub refuses beyond the shape checked above ('--', '..')
    except HFValidationError:
        raise Mamba2Error(f"{spec}: {what}") from None
    return repo, revision


def offline_mode(offline: bool = False) -> bool:
    """`--offline`, or huggingface_hub's offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    if offline:
        return True
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def hub_cache(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_file(repo_id: str, filename: str, revision: str | None = None,
                cache_dir: str | Path | None = None) -> Path | None:
    """A file of a repo at a revision (a branch, tag or commit; default main) in the cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache(cache_dir), revision=revision)
    return Path(found) if isinstance(found, str) else None


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path | None:
    """The cache's snapshot directory for a repo at a revision, when it holds a config (complete or not)."""
    for name in ("config.json", "params.json"):
        found = cached_file(repo_id, name, revision, cache_dir)
        if found is not None:
            return found.parent
    return None


def missing_files(model_dir: Path) -> list[str]:
    """What a checkpoint directory still lacks to be loaded ([] when complete).

    A mamba_ssm checkpoint without tokenizer.json is complete: its tokenizer is GPT-NeoX's,
    looked up separately (tokenizer_dir)."""
    d = Path(model_dir)
    if not (d / "config.json").is_file() and not (d / "params.json").is_file():
        return ["config.json"]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []  # unreadable: let the loader say what is wrong with it
        missing = [s for s in shards if not (d / s).is_file()]
    elif any((d / n).is_file() for n in ("model.safetensors", "consolidated.safetensors", "pytorch_model.bin")):
        missing = []
    else:
        missing = ["model.safetensors"]
    if not (d / "tokenizer.json").is_file() and not _is_mamba_ssm(d):
        missing.append("tokenizer.json")
    return missing


def _is_mamba_ssm(d: Path) -> bool:
    from .config import read_config

    try:
        return read_config(d).format == "mamba_ssm"
    except Mamba2Error:
        return False


def resolve_model_dir(spec: str, *, offline: bool = False, progress=True, cache_dir: str | Path | None = None) -> Path:
    """A model directory for `spec`: an existing directory, else an alias or repo id from the cache,
    downloaded first when missing there (not in offline mode)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise Mamba2Error(f"{spec}: is a file; give the model's directory")
        return path
    builtin = builtin_dir(spec)
    if builtin is not None:
        return builtin
    repo, revision = parse_repo_spec(spec, "no such model directory, alias or Hugging Face repo id (org/name)")
    label = spec if split_revision(spec)[0] == repo else f"{spec} ({repo})"
    snap = cached_snapshot(repo, revision, cache_dir)
    missing = missing_files(snap) if snap is not None else None
    if missing == []:
        return snap
    at = f" --revision {revision}" if revision else ""
    if offline_mode(offline):
        state = (f"only partly in the Hugging Face cache (missing {', '.join(missing[:3])})" if snap is not None
                 else "not in the Hugging Face cache")
        raise Mamba2Error(f"{label} is {state} and offline mode is on; fetch it first with "
                          f"`mamba2 download {repo}{at}`")
    from .download import download, progress_display

    display = progress_display() if progress is True else progress or None
    if display is not None:
        display.note(f"{label} is not in the local cache yet: downloading it (`mamba2 download {repo}{at}` does "
                     f"the same)")
    return download(repo, revision, cache_dir=cache_dir, progress=display or False).path


def tokenizer_dir(model_dir: Path, cfg, *, offline: bool = False, progress=True,
                  cache_dir: str | Path | None = None) -> Path:
    """Where the tokenizer of a checkpoint is: its own directory, or, for a mamba_ssm checkpoint
    without tokenizer.json, GPT-NeoX's from the cache (downloaded when missing)."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file() or cfg.format != "mamba_ssm":
        return model_dir
    found = cached_file(GPT_NEOX_TOKENIZER_REPO, "tokenizer.json", None, cache_dir)
    if found is not None:
        return found.parent
    if offline_mode(offline):
        raise Mamba2Error(
            f"{model_dir}: mamba_ssm checkpoints use GPT-NeoX's tokenizer, which is not in the Hugging Face cache "
            f"and offline mode is on; fetch it first with `mamba2 download {GPT_NEOX_TOKENIZER_REPO}`"
        )
    from .download import download

    return download(GPT_NEOX_TOKENIZER_REPO, cache_dir=cache_dir, progress=progress).path


def resolve_model(spec: str, *, offline: bool = False, progress=True, cache_dir: str | Path | None = None) -> Path:
    """resolve_model_dir, and the tokenizer too: afterwards loading `spec` needs no network.

    The CLI calls this before anything that draws on the terminal, so download progress has
    the terminal to itself."""
    from .config import read_config

    model_dir = resolve_model_dir(spec, offline=offline, progress=progress, cache_dir=cache_dir)
    try:
        cfg = read_config(model_dir)
    except Mamba2Error:
        return model_dir  # the loader reports it
    tokenizer_dir(model_dir, cfg, offline=offline, progress=progress, cache_dir=cache_dir)
    return model_dir


@dataclass
class CachedModel:
    repo_id: str
    commit: str
    refs: list[str]
    path: Path
    format: str
    size: int  # bytes of the files in the snapshot
    missing: list[str]  # [] = complete


def cached_models(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """The Mamba-2 checkpoints in the Hugging Face cache, one per cached snapshot."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from .config import read_config

    try:
        scan = scan_cache_dir(hub_cache(cache_dir))
    except CacheNotFound:
        return []
    out = []
    for repo in sorted(scan.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.commit_hash):
            try:
                cfg = read_config(rev.snapshot_path)
            except Mamba2Error:
                continue  # not a Mamba-2 checkpoint (a tokenizer repo, another model)
            out.append(CachedModel(repo.repo_id, rev.commit_hash, sorted(rev.refs), rev.snapshot_path, cfg.format,
                                   rev.size_on_disk, missing_files(rev.snapshot_path)))
    return out


def directory_size(d: Path) -> int:
    """Bytes of the files under `d`, following the cache's symlinks, each blob counted once."""
    seen, total = set(), 0
    for p in Path(d).rglob("*"):
        try:
            real = os.path.realpath(p)
            if real in seen or not os.path.isfile(real):
                continue
            seen.add(real)
            total += os.path.getsize(real)
        except OSError:
            pass
    return total
