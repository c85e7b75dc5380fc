"""Fetching a model from the Hugging Face Hub: only the files mamba2 reads, each one verified.

huggingface_hub owns the transfers and the cache layout: every file goes through
`hf_hub_download`, into the standard cache (or a plain `local_dir`), where huggingface_hub,
transformers and `hf` find it. What this module adds:

- the choice of files: the config first (config.json / params.json, and the shard index), to
  refuse a repo that is not a Mamba-2 model before fetching gigabytes of it; one checkpoint
  format (a repo that ships both HF shards and Mistral's consolidated.safetensors gets one of
  them); for mamba_ssm checkpoints, which carry no tokenizer, GPT-NeoX's tokenizer files;
- a disk-space check for the whole download before any weights are fetched;
- verification before placement: every fetched file lands in a staging directory, is hashed
  against the repo listing (the SHA-256 of an LFS file, the git blob id of any other), and
  only bytes that match are moved under their real name (a blob, or a file of `local_dir`);
- distrust of the endpoint: names and ids that come from the network (file names, shard
  names, the commit id, the ETag, the listing's hashes) never reach a path outside the cache
  or `local_dir`, a file's ETag must be the hash the listing gives it (so a snapshot link
  never points at another file's blob), and a transfer stops at the size the listing gives
  and after 5 restarts that bring nothing new;
- progress (rich bars on a terminal, plain lines otherwise) and one-line errors.

An interrupted transfer starts its file over on the next run: its staging directory is
deleted on failure, so nothing partial or unverified ever appears under a real name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Iterable

from . import __version__
from .errors import Mamba2Error
from .hub import GPT_NEOX_TOKENIZER_REPO, cached_snapshot, hub_cache, offline_mode

# Test hook: pretend the target file system has this many bytes free.
FAKE_FREE_BYTES_ENV = "MAMBA2_FAKE_FREE_BYTES"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
FORMATS = ("hf", "mistral")
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RESTARTS = 5  # transfers started over in a row without a byte beyond the furthest point reached
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def format_size(n: int | float | None) -> str:
    """Bytes in decimal units with two decimals (1.23 GB), "?" when unknown: the one size
    format of downloads and the CLI."""
    from rich.filesize import decimal

    return "?" if n is None else decimal(int(n), precision=2)



# ---------------------------------------------------------------------------------------
# Which files


@dataclass
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None = None  # LFS files: the Hub's SHA-256 of the content
    blob_id: str | None = None  # the git object id (of the LFS pointer, for LFS files)

    @property
    def etag(self) -> str:
        """What the Hub's ETag for the file is, and so the name of its blob in the cache."""
        return self.sha256 or self.blob_id


def select_files(names: Iterable[str], fmt: str | None = None, repo_id: str = "the repo") -> tuple[str, list[str], list[str]]:
    """(format, metadata files, weight + tokenizer files) of one checkpoint format in a repo listing.

    Metadata files (config, shard index) are fetched first; shards are then taken from the
    index when there is one, so the weight list here is provisional for sharded repos.
    """
    names = set(names)
    if "model.safetensors.index.json" in names:
        hf_weights = sorted(n for n in names if _SHARD.fullmatch(n))
    elif "model.safetensors" in names:
        hf_weights = ["model.safetensors"]
    elif "pytorch_model.bin" in names:
        hf_weights = ["pytorch_model.bin"]
    else:
        hf_weights = []
    has = {"hf": "config.json" in names and bool(hf_weights),
           "mistral": {"params.json", "consolidated.safetensors"} <= names}
    if fmt is not None and fmt not in FORMATS:
        raise Mamba2Error(f"unknown format {fmt!r}; choose hf or mistral")
    if fmt is None:
        fmt = next((f for f in FORMATS if has[f]), None)
        if fmt is None:
            raise Mamba2Error(
                f"{repo_id} holds no Mamba-2 checkpoint mamba2 can read (config.json with model.safetensors, shards "
                "or pytorch_model.bin; or params.json with consolidated.safetensors); --include fetches files by name"
            )
    elif not has[fmt]:
        other = next(f for f in FORMATS if f != fmt)
        hint = f"; it has the {other} format (--format {other})" if has[other] else ""
        raise Mamba2Error(f"{repo_id} has no {fmt}-format checkpoint{hint}")
    tokenizer = [n for n in TOKENIZER_FILES if n in names]
    if fmt == "hf":
        meta = ["config.json"] + (["model.safetensors.index.json"] if "model.safetensors.index.json" in names else [])
        return fmt, meta, hf_weights + tokenizer
    if "tokenizer.json" not in names:
        raise Mamba2Error(
            f"{repo_id}: the Mistral format's tokenizer is tokenizer.model.v3, which the `tokenizers` library "
            "cannot read, and the repo has no tokenizer.json"
        )
    return fmt, ["params.json"], ["consolidated.safetensors"] + tokenizer


def _filter(names: Iterable[str], include: list[str] | None, exclude: list[str] | None) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(list(names), allow_patterns=include or None, ignore_patterns=exclude or None))


# ---------------------------------------------------------------------------------------
# Names from the network


def is_repo_path(name) -> bool:
    """A relative '/'-separated path that stays where it is joined: no '..', '.' or empty part,
    no absolute or drive part, no backslash, no NUL."""
    return (isinstance(name, str) and bool(name) and "\\" not in name and "\0" not in name
            and not name.startswith("/") and not PureWindowsPath(name).drive
            and all(part not in ("", ".", "..") for part in name.split("/")))


def _inside(path: Path, root: Path) -> bool:
    """Whether `path` lies under `root` once the links of its directories are resolved (the path
    itself may be a cache link into blobs/)."""
    real = os.path.join(os.path.realpath(path.parent), path.name)
    return real.startswith(os.path.realpath(root).rstrip(os.sep) + os.sep)


def _refuse_name(repo_id: str, what: str, name) -> Mamba2Error:
    return Mamba2Error(f"{repo_id}: the Hub gave {what} {name!r}, which would lead outside the download's directory; "
                       "refusing it (check HF_ENDPOINT and any mirror or proxy)")


class _Refused(Exception):
    """A response that breaks what the listing promised, raised from inside huggingface_hub's calls."""


_guard = threading.local()  # .commit, .etag: what the current thread's file requests must answer with


def _check_response(response) -> None:
    """An httpx response hook: the header values huggingface_hub turns into paths are checked first.

    huggingface_hub 2.4 joins the ETag of a file's HEAD answer unchecked into blobs/<etag>,
    .locks/<repo>/<etag>.lock and local_dir's <hash>.<etag>.incomplete, and an X-Repo-Commit
    into .no_exist/<commit>/; a hostile endpoint could name a path anywhere on disk with them.
    So the ETag must be the hash the listing gives the file (40 or 64 hex digits, checked with
    the listing): any other, even another file's, would link the snapshot file to that blob.
    Only requests made inside `_guarded` are checked, so no other user of the session is affected."""
    commit = getattr(_guard, "commit", None)
    if commit is None or response.request.method != "HEAD":
        return
    h = response.headers
    got = h.get("X-Repo-Commit")
    if got is not None and got != commit:
        raise _Refused(f"its answer names commit {got!r}, not {commit}")
    etag = h.get("X-Linked-Etag") or h.get("ETag")  # the one huggingface_hub uses
    if etag is not None and etag.removeprefix("W/").strip('"') != _guard.etag:
        raise _Refused(f"its answer has the ETag {etag!r}, not the listing's {_guard.etag}")


@contextmanager
def _guarded(commit: str, f: RemoteFile):
    from huggingface_hub.utils import get_session

    hooks = get_session().event_hooks["response"]
    if _check_response not in hooks:  # the session is shared and may have been replaced
        hooks.append(_check_response)
    _guard.commit, _guard.etag = commit, f.etag
    try:
        yield
    finally:
        _guard.commit = _guard.etag = None


# ---------------------------------------------------------------------------------------
# Where files go


def free_bytes(path: Path) -> int:
    """Free space on the file system that will hold `path` (MAMBA2_FAKE_FREE_BYTES overrides it)."""
    fake = os.environ.get(FAKE_FREE_BYTES_ENV)
    if fake:
        return int(fake)
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


@dataclass
class _Job:
    """One repo's files at one commit going into the cache or into local_dir."""

    repo_id: str
    commit: str
    cache: Path
    local_dir: Path | None
    files: list[RemoteFile] = field(default_factory=list)
    todo: set[str] = field(default_factory=set)  # files that are not there yet
    done: set[str] = field(default_factory=set)  # files in place, fetched or not

    @property
    def root(self) -> Path:
        """The repo's folder in the cache, or local_dir."""
        if self.local_dir is not None:
            return self.local_dir
        from huggingface_hub.file_download import repo_folder_name

        return self.cache / repo_folder_name(repo_id=self.repo_id, repo_type="model")

    @property
    def dir(self) -> Path:
        """Where the files are read from: the snapshot of the commit, or local_dir."""
        return self.local_dir if self.local_dir is not None else self.root / "snapshots" / self.commit

    def where(self) -> dict:
        return {"local_dir": self.local_dir} if self.local_dir is not None else {"cache_dir": self.cache}

    def set_ref(self, revision: str | None) -> None:
        """refs/<revision> -> the commit, as huggingface_hub writes it (cache only, once the snapshot exists)."""
        if self.local_dir is not None or not revision or revision == self.commit or not self.dir.is_dir():
            return
        refs = self.root / "refs"
        ref = refs / revision
        if not is_repo_path(revision) or not _inside(ref, refs):
            raise Mamba2Error(f"{revision!r} is not a revision name that can be stored in the cache")
        if ref.is_file() and ref.read_text() == self.commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=ref.parent, prefix=f".{ref.name}.", suffix=".tmp")  # created exclusively
        with os.fdopen(fd, "w") as out:
            out.write(self.commit)
        os.replace(tmp, ref)

    def staging(self) -> Path:
        """A new, private directory on the destination's file system (so a verified file moves
        into place with a rename) that huggingface_hub's cache scan does not look into."""
        parent = self.root if self.local_dir is None else self.local_dir / ".cache" / "huggingface"
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=parent, prefix=".staging-"))


# ---------------------------------------------------------------------------------------
# Progress


class Progress:
    """Silent progress; `progress_display()` picks a visible one. `start` returns a file's task,
    which `advance` and `finish` take."""

    def plan(self, files: int, total: int) -> None: ...
    def start(self, name: str, total: int | None, fetch: bool = True): ...
    def advance(self, task, n: int) -> None: ...
    def finish(self, task) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


def progress_display(quiet: bool = False, console=None) -> Progress:
    """rich bars (one per file and a total) on a terminal, plain lines otherwise, nothing when quiet."""
    if quiet:
        return Progress()
    from rich.console import Console

    console = console or Console(stderr=True, highlight=False)
    return _RichProgress(console) if console.is_terminal else _PlainProgress(console.file)


class _RichProgress(Progress):
    def __init__(self, console):
        from rich.progress import (BarColumn, DownloadColumn, Progress as Bars, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.bars = Bars(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                         TimeRemainingColumn(), console=console)
        self.total = None
        self._lock = threading.Lock()

    def _started(self):
        with self._lock:  # files start on several threads; the total must be the first task, to stay on top
            if self.total is None:
                self.bars.start()
                self.total = self.bars.add_task("total", total=None, visible=False)  # shown once planned

    def plan(self, files, total):
        self._started()
        self.bars.update(self.total, description=f"[bold]total ({files} files)", total=total, visible=True)

    def start(self, name, total, fetch=True):
        self._started()
        return self.bars.add_task(name if fetch else f"verify {name}", total=total), fetch

    def advance(self, task, n):
        self.bars.advance(task[0], n)
        if task[1]:
            self.bars.advance(self.total, n)

    def finish(self, task):
        self.bars.stop_task(task[0])

    def note(self, text):
        self.bars.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def close(self):
        if self.total is not None:
            self.bars.stop()


@dataclass
class _Line:
    name: str
    total: int | None
    fetch: bool
    done: int = 0
    t0: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)


class _PlainProgress(Progress):
    """A line when a file starts and ends, and every `interval` seconds in between."""

    def __init__(self, stream, interval: float = 15.0):
        self.stream, self.interval = stream, interval
        self._lock = threading.Lock()

    def note(self, text: str):
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def plan(self, files, total):
        self.note(f"fetching {files} files, {format_size(total)}")

    def start(self, name, total, fetch=True):
        self.note(f"  {'fetching' if fetch else 'verifying'} {name} ({format_size(total)})")
        return _Line(name, total, fetch)

    def advance(self, t, n):
        t.done += n
        now = time.monotonic()
        if now - t.last >= self.interval:
            t.last = now
            pct = f" ({100 * t.done / t.total:.0f}%)" if t.total else ""
            self.note(f"  {t.name}: {format_size(t.done)} of {format_size(t.total)}{pct}, {format_size(t.done / (now - t.t0))}/s")

    def finish(self, t):
        dt = time.monotonic() - t.t0
        verb = "stopped" if t.total and t.done < t.total else "fetched" if t.fetch else "verified"
        self.note(f"  {verb} {t.name}: {format_size(t.done)} in {dt:.1f} s ({format_size(t.done / max(dt, 1e-9))}/s)")


class _Bar:
    """The tqdm stand-in huggingface_hub drives during one file's transfer (plain HTTP or hf_xet),
    feeding a Progress task. Subclassed per file (`_bar_for`).

    It also holds the transfer to the listing: huggingface_hub checks a file's size only once
    the transfer ends and retries a server that ignores Range and drops the connection for
    ever (every byte resets its retry count); raising here ends the transfer, and
    huggingface_hub deletes its temporary file."""

    progress: Progress
    name: str
    limit: int | None  # the size the listing gives
    stop: threading.Event
    instances: list  # the bars made for this file (one, unless huggingface_hub starts over)

    def __init__(self, *args, total=None, initial=0, **kwargs):
        self.instances.append(self)
        self.n = self.high = initial or 0
        self.total, self.restarts, self.received = total, 0, 0
        if self.limit is not None and total is not None and total != self.limit:
            raise _Refused(f"the server announces {total} bytes, the listing {self.limit}")
        self.task = self.progress.start(self.name, self.limit)

    def update(self, n=1):
        n = int(n or 0)
        if self.stop.is_set():
            raise _Stopped()
        self.n += n
        if n < 0:  # the server ignored a Range request: the file starts over
            self.restarts += 1
            if self.restarts > _RESTARTS:
                raise _Refused(f"the transfer started over {self.restarts} times without getting further")
        elif self.n > self.high:
            self.high, self.restarts = self.n, 0
            if self.limit is not None and self.n > self.limit:
                raise _Refused(f"the server sent more than the {self.limit} bytes listed")
        self.received += max(n, 0)
        self.progress.advance(self.task, n)

    def close(self):
        self.progress.finish(self.task)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update_transfer(self, n=1): ...  # hf_xet's network bytes; the bar follows bytes written
    def set_postfix_str(self, *a, **k): ...
    def set_transfer_postfix_str(self, *a, **k): ...
    def refresh(self, *a, **k): ...


def _bar_for(progress: Progress, name: str, limit: int | None, stop: threading.Event) -> type[_Bar]:
    return type("Bar", (_Bar,), {"progress": progress, "name": name, "limit": limit, "stop": stop, "instances": []})


class _Unplanned(Exception):
    """huggingface_hub was about to transfer a file that was to be taken from the cache."""


class _NoTransfer:
    """The bar for huggingface_hub calls that must find or link a file, never fetch one: a transfer
    starts by making its bar, and this one stops it before a byte is written."""

    def __init__(self, *args, **kwargs):
        raise _Unplanned()


# ---------------------------------------------------------------------------------------
# Errors


@contextmanager
def hub_errors(repo_id: str, revision: str | None, endpoint: str, file: str | None = None):
    """huggingface_hub's, the network's and the file system's exceptions -> one-line Mamba2Errors."""
    import httpx2
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    login = "log in with `hf auth login`, set HF_TOKEN, or pass --token"
    unreachable = f"cannot reach the Hub at {endpoint}"
    hint = "check the network (models already in the cache run without it)"
    try:
        yield
    except _Refused as e:
        raise Mamba2Error(f"{repo_id}/{file}: refusing the Hub's answer: {e}; nothing was kept") from None
    except GatedRepoError:
        raise Mamba2Error(
            f"{repo_id} is gated: accept its conditions at {endpoint}/{repo_id} with your account, then {login}"
        ) from None
    except RepositoryNotFoundError:
        raise Mamba2Error(f"{repo_id}: no such model on {endpoint} (if it is private, {login})") from None
    except RevisionNotFoundError:
        raise Mamba2Error(f"{repo_id} has no revision {revision!r} (a branch, tag or commit hash)") from None
    except RemoteEntryNotFoundError as e:
        raise Mamba2Error(f"{repo_id}: a file is missing on the Hub ({_url_of(e)})") from None
    except OfflineModeIsEnabled:
        raise Mamba2Error("offline mode is on (HF_HUB_OFFLINE=1): cannot reach the Hub") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        if status == 401:
            raise Mamba2Error(f"the Hub refused the token (401 Unauthorized) for {repo_id}: {login}") from None
        if status == 403:
            raise Mamba2Error(f"the Hub refused access to {repo_id} (403 Forbidden): {login}") from None
        raise Mamba2Error(f"the Hub answered HTTP {status} for {_url_of(e)}; try again later") from None
    except LocalEntryNotFoundError as e:  # huggingface_hub's word for a failed request it fell back from
        cause = e.__cause__
        reason = f" ({str(cause).strip() or type(cause).__name__})" if cause is not None else ""
        raise Mamba2Error(f"{unreachable}{reason}; {hint}") from None
    except (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError,
            httpx2.ProxyError) as e:
        reason = str(e).strip() or type(e).__name__
        raise Mamba2Error(f"{unreachable} ({reason}); {hint}") from None
    except OSError as e:  # last: huggingface_hub's HTTP errors are OSErrors too; its temporary file is gone
        if e.errno in _DISK_FULL:
            raise Mamba2Error(f"disk full while writing {file} ({e.strerror}): free some space and run the same "
                              "command again") from None
        if e.errno is None and "Consistency check failed" in str(e):
            raise Mamba2Error(f"{repo_id}/{file}: the server sent a different number of bytes than it announced; "
                              "run the command again") from None
        raise


def _url_of(e) -> str:
    try:
        return str(e.response.request.url)
    except Exception:
        return "?"


class _Stopped(Exception):
    """Another file failed or the user interrupted: stop."""


def _hash_file(path: Path, h, stop: threading.Event, advance=None) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            if stop.is_set():
                raise _Stopped()
            h.update(chunk)
            if advance is not None:
                advance(len(chunk))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# The download


@dataclass
class DownloadResult:
    path: Path  # the model directory: the cache snapshot, or local_dir
    repo_id: str
    commit: str
    format: str | None  # hf | mamba_ssm | mistral; None for --include downloads
    files: list[str]
    total_bytes: int  # of the files selected
    fetched_bytes: int  # over the network this time
    fetched_files: int
    verified_files: int  # SHA-256 computed this time
    tokenizer_dir: Path | None = None  # where GPT-NeoX's tokenizer went (mamba_ssm checkpoints)
    tokenizer_files: list[str] = field(default_factory=list)


class _Downloader:
    def __init__(self, endpoint: str, token: str | None, progress: Progress, workers: int):
        self.endpoint, self.token, self.progress, self.workers = endpoint, token, progress, workers
        self.stop = threading.Event()
        self.fetched_bytes = self.fetched_files = self.verified = 0
        self._lock = threading.Lock()

    def listing(self, repo_id: str, revision: str | None) -> tuple[str, dict[str, RemoteFile]]:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token, library_name="mamba2", library_version=__version__)
        with hub_errors(repo_id, revision, self.endpoint):
            info = api.model_info(repo_id, revision=revision, files_metadata=True)
        if not isinstance(info.sha, str) or not _COMMIT.fullmatch(info.sha):
            raise _refuse_name(repo_id, "the commit id", info.sha)
        files = {}
        for s in info.siblings or []:
            lfs = s.lfs
            f = RemoteFile(s.rfilename, lfs.size if lfs else s.size, lfs.sha256 if lfs else None, s.blob_id)
            # The hash a file is checked against also names its blob and lock file.
            want, pattern = (f.sha256, _SHA256) if lfs else (f.blob_id, _COMMIT)
            if not isinstance(want, str) or not pattern.fullmatch(want):
                raise Mamba2Error(f"{repo_id}: the Hub's listing gives {s.rfilename!r} no "
                                  f"{'SHA-256' if lfs else 'git blob id'} to check it against; refusing the repo")
            files[s.rfilename] = f
        return info.sha, files

    def _hf_hub_download(self, job: _Job, f: RemoteFile, where: dict | None = None, **kwargs):
        from huggingface_hub import hf_hub_download

        with hub_errors(job.repo_id, job.commit, self.endpoint, f.path), _guarded(job.commit, f):
            return hf_hub_download(job.repo_id, f.path, revision=job.commit, endpoint=self.endpoint,
                                   token=self.token, library_name="mamba2", library_version=__version__,
                                   **(where or job.where()), **kwargs)

    def plan(self, job: _Job, f: RemoteFile) -> None:
        """Whether `f` is still to be fetched (a file of another revision with the same content is not)."""
        self._check_path(job, f)
        if self._hf_hub_download(job, f, dry_run=True).will_download:
            with self._lock:
                job.todo.add(f.path)

    def _check_path(self, job: _Job, f: RemoteFile) -> None:
        if not is_repo_path(f.path) or not _inside(job.dir / f.path, job.dir):
            raise _refuse_name(job.repo_id, "the file name", f.path)

    # Every byte from the network is verified before it gets a real name. hf_hub_download moves a
    # finished transfer under its real name (the blob, or the file of local_dir) inside one call,
    # with no hook in between: its progress bar closes before the file is even flushed. So a file
    # to fetch goes through hf_hub_download into a staging directory (a cache or local_dir of its
    # own, on the same file system), is hashed there, and only matching bytes are renamed into
    # place. This keeps all of huggingface_hub's transfer: its HEAD and redirect handling (the
    # token stays off CDN hosts), Xet when the server offers it (hf_xet writes into the staging
    # directory too, so Xet files are hashed the same way), retries and resumption within a run,
    # its error classes; only the final rename is ours. Fetching with its http_get/xet_get
    # directly would instead copy that HEAD and redirect logic. What staging gives up: a file
    # fetched over Xet is not published to huggingface_hub's shared blob store (files already
    # there are still linked from it, as are blobs already in the cache); the cross-process lock
    # is taken here, on huggingface_hub's own lock file.
    def fetch(self, job: _Job, f: RemoteFile) -> None:
        self._check_path(job, f)
        if f.path not in job.todo:
            try:
                self._hf_hub_download(job, f, tqdm_class=_NoTransfer)  # already there, or a link to a blob
            except _Unplanned:  # gone since it was planned
                with self._lock:
                    job.todo.add(f.path)
        if f.path in job.todo:
            self._fetch_verified(job, f)
        with self._lock:
            job.done.add(f.path)

    def _fetch_verified(self, job: _Job, f: RemoteFile) -> None:
        from huggingface_hub.utils import WeakFileLock

        if job.local_dir is None:
            blob = job.root / "blobs" / f.etag
            lock = job.cache / ".locks" / job.root.name / f"{f.etag}.lock"
            lock.parent.mkdir(parents=True, exist_ok=True)
        else:
            from huggingface_hub._local_folder import get_local_download_paths

            blob, lock = None, get_local_download_paths(job.local_dir, f.path).lock_path
        with WeakFileLock(lock):
            if blob is None or not blob.exists():  # another process may have placed it meanwhile
                staging = job.staging()
                try:
                    path = self._stage(job, f, staging)
                    self.verify(job, f, path)
                    self._place(job, f, path, staging)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        if blob is not None:  # the snapshot link to the blob, made by huggingface_hub (its lock, its rules)
            try:
                self._hf_hub_download(job, f, tqdm_class=_NoTransfer)
            except _Unplanned:
                raise Mamba2Error(f"{job.repo_id}/{f.path}: the Hub's answers changed during the download; "
                                  "run the command again") from None

    def _stage(self, job: _Job, f: RemoteFile, staging: Path) -> Path:
        """Fetch `f` into the staging directory; the real file behind what huggingface_hub returns."""
        bar = _bar_for(self.progress, f.path, f.size, self.stop)
        where = {"cache_dir": staging} if job.local_dir is None else {"local_dir": staging}
        try:
            path = Path(os.path.realpath(self._hf_hub_download(job, f, where, tqdm_class=bar)))
        finally:
            with self._lock:
                self.fetched_bytes += sum(b.received for b in bar.instances)
        with self._lock:
            self.fetched_files += 1
        if not path.is_relative_to(os.path.realpath(staging)) or not path.is_file():
            raise Mamba2Error(f"{job.repo_id}/{f.path}: huggingface_hub did not leave the file in the staging "
                              "directory; nothing was kept")
        return path

    def _place(self, job: _Job, f: RemoteFile, path: Path, staging: Path) -> None:
        """Rename a verified file to its real name: the repo's blob (named by its hash, as
        huggingface_hub names it), or the file of local_dir with huggingface_hub's metadata file
        beside it, which says the file is of this commit."""
        if job.local_dir is None:
            blob = job.root / "blobs" / f.etag
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, blob)
            return
        from huggingface_hub._local_folder import get_local_download_paths

        dest = job.local_dir / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        meta = get_local_download_paths(staging, f.path).metadata_path
        os.replace(meta, get_local_download_paths(job.local_dir, f.path).metadata_path)

    def verify(self, job: _Job, f: RemoteFile, path: Path) -> None:
        """Hash a fetched file against the listing: the SHA-256 of an LFS file, the git blob id of any other."""
        if f.sha256 is not None:
            task = self.progress.start(f.path, f.size, fetch=False)
            try:
                got = _hash_file(path, hashlib.sha256(), self.stop, lambda n: self.progress.advance(task, n))
            finally:
                self.progress.finish(task)
            want, what = f.sha256, "SHA-256"
        else:
            h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
            got, want, what = _hash_file(path, h, self.stop), f.blob_id, "git blob id"
        if got != want:
            raise Mamba2Error(
                f"{job.repo_id}/{f.path}: the downloaded bytes do not match the Hub's {what} (got {got[:16]}…, "
                f"expected {want[:16]}…); nothing was kept, run the command again to fetch it anew"
            )
        if f.sha256 is not None:
            with self._lock:
                self.verified += 1

    def run_all(self, fn, items: list) -> None:
        """fn(*item) for each item on a few threads; the first error stops the rest."""
        if not items:
            return
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(items))))
        futures = [pool.submit(fn, *item) for item in items]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in futures if f.done() and f.exception() is not None]
            if errors:
                self.stop.set()
                wait(futures)
                raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
        except BaseException:
            self.stop.set()  # Ctrl-C: the workers stop at their next chunk
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def download(repo_id: str, revision: str | None = None, *, fmt: str | None = None, include: list[str] | None = None,
             exclude: list[str] | None = None, local_dir: str | Path | None = None, token: str | None = None,
             cache_dir: str | Path | None = None, endpoint: str | None = None, progress: Progress | bool = True,
             workers: int = 4) -> DownloadResult:
    """Fetch the files mamba2 needs from a Hub model repo; a no-op for files already there.

    `fmt` picks hf or mistral for repos that ship both (default hf). `include` globs select
    files by name instead of by format; `exclude` globs drop files either way.
    """
    from huggingface_hub import constants

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    if progress is True:
        progress = progress_display()
    elif not progress:
        progress = Progress()
    if offline_mode():
        cached = cached_snapshot(repo_id, revision, cache_dir) if local_dir is None else None
        where = f"; the cache holds {cached}" if cached else ""
        raise Mamba2Error(f"offline mode is on (HF_HUB_OFFLINE=1): cannot download {repo_id}{where}")
    if revision is not None and not is_repo_path(revision):
        raise Mamba2Error(f"{revision!r} is not a revision name (a branch, tag or commit hash)")
    dl = _Downloader(endpoint, token, progress, workers)
    cache = hub_cache(cache_dir)
    try:
        return _download(dl, repo_id, revision, fmt, include, exclude,
                         Path(local_dir).expanduser().absolute() if local_dir is not None else None, cache)
    finally:
        progress.close()


def _download(dl: _Downloader, repo_id, revision, fmt, include, exclude, local_dir, cache) -> DownloadResult:
    commit, listing = dl.listing(repo_id, revision)
    job = _Job(repo_id, commit, cache, local_dir)
    jobs = [job]
    companion = None
    if include:
        fmt = None
        names = _filter(listing, include, exclude)
    elif repo_id == GPT_NEOX_TOKENIZER_REPO:  # only its tokenizer is of use here
        fmt = None
        names = _filter([n for n in TOKENIZER_FILES if n in listing], None, exclude)
    else:
        fmt, meta, rest = select_files(listing, fmt, repo_id)
        meta = _filter(meta, None, exclude)
        # The config first: a repo that is not a Mamba-2 model is refused before its weights.
        dl.run_all(dl.plan, [(job, listing[n]) for n in meta])
        dl.run_all(dl.fetch, [(job, listing[n]) for n in meta])
        job.set_ref(revision or "main")
        cfg = _check_config(job)
        fmt = cfg.format if cfg is not None else fmt  # hf-style files may hold a mamba_ssm checkpoint
        index = job.dir / "model.safetensors.index.json"
        if index.is_file():
            rest = _shards_from_index(index, listing, repo_id) + [n for n in rest if not _SHARD.fullmatch(n)]
        names = meta + _filter(rest, None, exclude)
        if (cfg is not None and cfg.format == "mamba_ssm" and "tokenizer.json" not in listing
                and _filter(["tokenizer.json"], None, exclude)):
            tok_commit, tok_listing = dl.listing(GPT_NEOX_TOKENIZER_REPO, None)
            companion = _Job(GPT_NEOX_TOKENIZER_REPO, tok_commit, cache, local_dir,
                             [tok_listing[n] for n in TOKENIZER_FILES if n in tok_listing])
            jobs.append(companion)
    if not names:
        raise Mamba2Error(f"{repo_id}: no file matches the --include/--exclude patterns")
    job.files = [listing[n] for n in names]

    # Free space for what is still missing, before any weights are fetched.
    rest = [(j, f) for j in jobs for f in j.files if f.path not in j.done]
    dl.run_all(dl.plan, rest)
    todo = [f for j, f in rest if f.path in j.todo]
    needed = sum(f.size or 0 for f in todo)
    where = local_dir if local_dir is not None else cache
    free = free_bytes(where)
    if needed > free:
        raise Mamba2Error(f"not enough disk space in {where}: {repo_id} needs {format_size(needed)} more, {format_size(free)} free")
    if todo:
        dl.progress.plan(len(todo), needed)
    dl.run_all(dl.fetch, rest)
    job.set_ref(revision or "main")
    if companion is not None:
        companion.set_ref("main")
    return DownloadResult(
        path=job.dir, repo_id=repo_id, commit=commit, format=fmt, files=names,
        total_bytes=sum(f.size or 0 for j in jobs for f in j.files), fetched_bytes=dl.fetched_bytes,
        fetched_files=dl.fetched_files, verified_files=dl.verified,
        tokenizer_dir=companion.dir if companion else None,
        tokenizer_files=[f.path for f in companion.files] if companion else [],
    )


def _check_config(job: _Job):
    from .config import read_config

    d = job.dir
    if not ((d / "config.json").is_file() or (d / "params.json").is_file()):
        return None  # excluded by the user
    try:
        return read_config(d)
    except Mamba2Error as e:
        reason = str(e).replace(f"{d}{os.sep}", "")
        raise Mamba2Error(f"{job.repo_id} is not a model mamba2 can run: {reason} (--include fetches files "
                          "anyway)") from None


def _shards_from_index(index: Path, listing: dict, repo_id: str) -> list[str]:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise Mamba2Error(f"{repo_id}: model.safetensors.index.json is not a valid shard index") from None
    for s in shards:
        if not is_repo_path(s):
            raise _refuse_name(repo_id, "the shard name", s)
    missing = [s for s in shards if s not in listing]
    if missing:
        raise Mamba2Error(f"{repo_id}: the shard index lists {missing[0]}, which the repo does not have")
    return shards
