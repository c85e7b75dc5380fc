"""Model names -> local directories: a path, an alias, or a Hugging Face repo id[@revision].

A repo id whose files are complete in the local Hugging Face cache is used with no network
access at all; one that is not is downloaded first (download.py) unless offline mode is on
(`--offline`, HF_HUB_OFFLINE=1). Aliases name real checkpoints; `--preset` names
random-weight shapes (config.PRESETS), and the two never stand in for each other.
"""

from __future__ import annotations

import json
import os
import re
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

_COMMIT = re.compile(r"[0-9a-f]{40}")


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
    return split_revision(full)


def offline_mode(offline: bool = False) -> bool:
    """`--offline`, or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set as huggingface_hub reads them."""
    if offline:
        return True
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE",
                                                                                    "TRANSFORMERS_OFFLINE"))


def hub_cache(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _repo_of_folder(name: str) -> str | None:
    parts = name.split("--")
    return f"{parts[1]}/{'--'.join(parts[2:])}" if len(parts) >= 3 and parts[0] == "models" else None


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path | None:
    """The cache's snapshot directory for a repo at a revision (complete or not), or None."""
    root = hub_cache(cache_dir) / repo_folder(repo_id)
    revision = revision or "main"
    if not _COMMIT.fullmatch(revision):
        ref = root / "refs" / revision
        try:
            revision = ref.read_text().strip()
        except OSError:
            return None
    snap = root / "snapshots" / revision
    return snap if snap.is_dir() else None


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
    snap = cached_snapshot(GPT_NEOX_TOKENIZER_REPO, None, cache_dir)
    if snap is not None and (snap / "tokenizer.json").is_file():
        return snap
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
    from .config import read_config

    root = hub_cache(cache_dir)
    out = []
    for repo_path in sorted(root.glob("models--*")) if root.is_dir() else []:
        repo_id = _repo_of_folder(repo_path.name)
        if repo_id is None:
            continue
        refs: dict[str, list[str]] = {}
        for ref in sorted((repo_path / "refs").glob("**/*")):
            if ref.is_file():
                try:
                    refs.setdefault(ref.read_text().strip(), []).append(ref.relative_to(repo_path / "refs").as_posix())
                except OSError:
                    pass
        for snap in sorted((repo_path / "snapshots").glob("*")):
            try:
                cfg = read_config(snap)
            except Mamba2Error:
                continue  # not a Mamba-2 checkpoint (a tokenizer repo, another model)
            out.append(CachedModel(repo_id, snap.name, refs.get(snap.name, []), snap, cfg.format,
                                   directory_size(snap), missing_files(snap)))
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
