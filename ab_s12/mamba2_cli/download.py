"""Fetching a model from the Hugging Face Hub: only the files mamba2 reads, resumable, verified.

Files land in the standard Hugging Face cache (blobs/<etag>, snapshots/<commit>/<path>,
refs/<branch>), so huggingface_hub, transformers and `hf` see them, or in a plain directory
(`local_dir`). What is fetched:

- the repo info (one call, with per-file sizes and the SHA-256 of each LFS file);
- the config first (config.json / params.json, and the shard index), to refuse a repo that
  is not a Mamba-2 model before fetching gigabytes of it;
- one checkpoint format: a repo that ships both HF shards and Mistral's
  consolidated.safetensors gets one of them, never both;
- for mamba_ssm checkpoints, which carry no tokenizer, GPT-NeoX's tokenizer files
  (mamba_ssm's own tools use EleutherAI/gpt-neox-20b's).

Transfers: files that the Hub stores with Xet go through huggingface_hub's `hf_hub_download`
(hf_xet). Plain HTTP transfers are done here: huggingface_hub 2.4 writes each download to a
process-unique temporary file and deletes it when the transfer fails, so an interrupted
download would start over; here the partial file (`<blob>.incomplete`) is kept and resumed
with a Range request, in this process after a dropped connection and in the next one after
an interrupt or a full disk. Its SHA-256 is computed while it streams, compared with the
Hub's before the file is moved into place, and remembered (`.mamba2/verified.json` beside
the blobs) so a finished file is never hashed again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

from . import __version__
from .errors import Mamba2Error
from .hub import GPT_NEOX_TOKENIZER_REPO, cached_snapshot, hub_cache, offline_mode, repo_folder

# Test hook: pretend the target file system has this many bytes free.
FAKE_FREE_BYTES_ENV = "MAMBA2_FAKE_FREE_BYTES"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
FORMATS = ("hf", "mistral")
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
_RETRIES = 5  # consecutive failed attempts (no byte received) before a transfer gives up
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------
# Which files


@dataclass
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None = None  # LFS files: the Hub's SHA-256 of the content (also their ETag)
    blob_id: str | None = None  # git object id (the ETag of a regular file)

    @property
    def etag(self) -> str | None:
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
# Where files go


class _Record:
    """What was verified: {key: {etag, sha256, size, mtime_ns}}, in one JSON file per target.

    A file counts as verified only while its size and mtime are those recorded, so a file
    changed on disk is hashed again. Writes merge with what is on disk, so two targets
    sharing the file (a model and its tokenizer in one --local-dir) keep each other's entries."""

    _lock = threading.Lock()

    def __init__(self, path: Path):
        self.path = path
        self.entries = self._read()

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def matches(self, key: str, path: Path, etag: str | None = None, sha256: str | None = None) -> bool:
        e = self.entries.get(key)
        try:
            st = path.stat()
        except OSError:
            return False
        return (isinstance(e, dict) and e.get("size") == st.st_size and e.get("mtime_ns") == st.st_mtime_ns
                and (etag is None or e.get("etag") == etag) and (sha256 is None or e.get("sha256") == sha256))

    def put(self, key: str, path: Path, etag: str | None, sha256: str | None) -> None:
        st = path.stat()
        with self._lock:
            self.entries = {**self._read(), key: {"etag": etag, "sha256": sha256, "size": st.st_size,
                                                  "mtime_ns": st.st_mtime_ns}}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
            os.replace(tmp, self.path)


class _CacheTarget:
    """The Hugging Face cache layout: blobs/<etag>, snapshots/<commit>/<path> -> ../../blobs/<etag>."""

    def __init__(self, cache_dir: Path, repo_id: str, commit: str):
        self.root = cache_dir / repo_folder(repo_id)
        self.dir = self.root / "snapshots" / commit
        self.commit = commit
        self.locks = cache_dir / ".locks" / repo_folder(repo_id)
        self.record = _Record(self.root / ".mamba2" / "verified.json")

    def path(self, f: RemoteFile) -> Path:
        return self.dir / f.path

    def key(self, f: RemoteFile) -> str:
        return os.path.relpath(os.path.realpath(self.path(f)), self.root)

    def has(self, f: RemoteFile) -> bool:
        return self.path(f).is_file()

    def final(self, etag: str, f: RemoteFile) -> Path:
        return self.root / "blobs" / etag

    def partial(self, etag: str, f: RemoteFile) -> Path:
        return self.root / "blobs" / f"{etag}.incomplete"

    def lock(self, etag: str, f: RemoteFile) -> Path:
        return self.locks / f"{etag}.lock"

    def adopt(self, etag: str | None, f: RemoteFile) -> bool:
        """Link a blob another revision already brought; True when there was one."""
        if etag and self.final(etag, f).is_file():
            self.place(etag, f, None)
            return True
        return False

    def place(self, etag: str, f: RemoteFile, part: Path | None) -> None:
        blob = self.final(etag, f)
        if part is not None:
            _publish(part, blob)
        link = self.path(f)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            os.symlink(os.path.relpath(blob, link.parent), link)
        except OSError:  # no symlinks on this file system
            shutil.copyfile(blob, link)

    def remove(self, f: RemoteFile) -> None:
        p = self.path(f)
        blob = Path(os.path.realpath(p))
        p.unlink(missing_ok=True)
        if blob != p:
            blob.unlink(missing_ok=True)

    def set_ref(self, revision: str | None) -> None:
        if not revision or revision == self.commit:
            return
        ref = self.root / "refs" / revision
        if ref.is_file() and ref.read_text() == self.commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(self.commit)
        os.replace(tmp, ref)


class _LocalDirTarget:
    """A plain directory: <dir>/<path>; partial files and records under <dir>/.cache/mamba2/."""

    def __init__(self, local_dir: Path, commit: str):
        self.dir = local_dir
        self.root = local_dir
        self.commit = commit
        self.work = local_dir / ".cache" / "mamba2"
        self.record = _Record(self.work / "files.json")

    def path(self, f: RemoteFile) -> Path:
        return self.dir / f.path

    def key(self, f: RemoteFile) -> str:
        return f.path

    def has(self, f: RemoteFile) -> bool:
        return self.record.matches(f.path, self.path(f), etag=f.etag)

    def final(self, etag: str, f: RemoteFile) -> Path:
        return self.path(f)

    def partial(self, etag: str, f: RemoteFile) -> Path:
        return self.work / "download" / f"{f.path}.{etag}.incomplete"

    def lock(self, etag: str, f: RemoteFile) -> Path:
        return self.work / "download" / f"{f.path}.lock"

    def adopt(self, etag: str | None, f: RemoteFile) -> bool:
        """Keep a file already here (put by another tool) when its SHA-256 is the Hub's."""
        p = self.path(f)
        if f.sha256 is None or not p.is_file() or p.stat().st_size != f.size:
            return False
        if _hash_file(p).hexdigest() != f.sha256:
            return False
        self.record.put(f.path, p, f.etag, f.sha256)
        return True

    def place(self, etag: str, f: RemoteFile, part: Path | None) -> None:
        if part is not None:
            _publish(part, self.path(f))

    def remove(self, f: RemoteFile) -> None:
        self.path(f).unlink(missing_ok=True)

    def set_ref(self, revision: str | None) -> None:
        pass


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _publish(part: Path, dest: Path) -> None:
    """Move a finished partial file into place with the permissions of a new file."""
    os.chmod(part, 0o666 & ~_UMASK)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, dest)


def free_bytes(path: Path) -> int:
    """Free space on the file system that will hold `path` (MAMBA2_FAKE_FREE_BYTES overrides it)."""
    fake = os.environ.get(FAKE_FREE_BYTES_ENV)
    if fake:
        return int(fake)
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


# ---------------------------------------------------------------------------------------
# Progress


class FileTask:
    """One file's bar: silent here; displays override."""

    def start(self, done: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def restart(self) -> None: ...
    def finish(self) -> None: ...


class Progress:
    """Silent progress; `progress_display()` picks a visible one."""

    def plan(self, files: int, total: int, done: int) -> None: ...
    def file(self, name: str, total: int | None, fetch: bool = True) -> FileTask:
        return FileTask()

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
                         TimeRemainingColumn(), console=console, transient=False)
        self.total = None
        self.started = False
        self._lock = threading.Lock()

    def _start(self):
        with self._lock:  # files start on several threads; the total must be the first task
            if not self.started:
                self.bars.start()
                # First, so it stays on top; shown once the plan is known.
                self.total = self.bars.add_task("total", total=None, visible=False)
                self.started = True

    def plan(self, files, total, done):
        self._start()
        self.bars.update(self.total, description=f"[bold]total ({files} files)", total=total, completed=done,
                         visible=True)

    def file(self, name, total, fetch=True):
        self._start()
        return _RichTask(self, name, total, fetch)

    def note(self, text):
        self.bars.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def close(self):
        if self.started:
            self.bars.stop()


class _RichTask(FileTask):
    def __init__(self, p: _RichProgress, name: str, total: int | None, fetch: bool):
        self.p, self.fetch = p, fetch
        self.id = p.bars.add_task(name if fetch else f"verify {name}", total=total, start=False)
        self.done = 0

    def start(self, done):
        self.p.bars.start_task(self.id)
        self.p.bars.update(self.id, completed=done)
        self.done = done

    def advance(self, n):
        self.done += n
        self.p.bars.advance(self.id, n)
        if self.fetch:
            self.p.bars.advance(self.p.total, n)

    def restart(self):
        if self.fetch:
            self.p.bars.advance(self.p.total, -self.done)
        self.done = 0
        self.p.bars.update(self.id, completed=0)

    def finish(self):
        self.p.bars.stop_task(self.id)


class _PlainProgress(Progress):
    """A line when a file starts and ends, and every `interval` seconds in between."""

    def __init__(self, stream, interval: float = 15.0):
        self.stream, self.interval = stream, interval
        self._lock = threading.Lock()

    def say(self, text: str):
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def plan(self, files, total, done):
        more = f" ({human_bytes(done)} already here)" if done else ""
        self.say(f"fetching {files} files, {human_bytes(total - done)}{more}")

    def file(self, name, total, fetch=True):
        return _PlainTask(self, name, total, fetch)

    def note(self, text):
        self.say(text)


class _PlainTask(FileTask):
    def __init__(self, p: _PlainProgress, name: str, total: int | None, fetch: bool):
        self.p, self.name, self.total, self.fetch = p, name, total, fetch
        self.done = self.first = 0
        self.t0 = self.last = time.monotonic()

    def start(self, done):
        self.done = self.first = done
        verb = "fetching" if self.fetch else "verifying"
        at = f", resuming at {human_bytes(done)}" if done else ""
        self.p.say(f"  {verb} {self.name} ({human_bytes(self.total)}{at})")

    def advance(self, n):
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.p.interval:
            self.last = now
            rate = (self.done - self.first) / max(now - self.t0, 1e-9)
            pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            self.p.say(f"  {self.name}: {human_bytes(self.done)} of {human_bytes(self.total)}{pct}, "
                       f"{human_bytes(rate)}/s")

    def restart(self):
        self.done = self.first = 0

    def finish(self):
        dt = time.monotonic() - self.t0
        got = self.done - self.first
        verb = "fetched" if self.fetch else "verified"
        self.p.say(f"  {verb} {self.name}: {human_bytes(got)} in {dt:.1f} s ({human_bytes(got / max(dt, 1e-9))}/s)")


class _XetBars:
    """The tqdm-like object huggingface_hub drives during an hf_xet download, feeding one FileTask.

    Having `update_transfer` makes huggingface_hub route both of its counters here; only
    `update` (bytes written to disk) moves the bar."""

    task: FileTask = FileTask()

    def __init__(self, *args, **kwargs):
        self.n = kwargs.get("initial", 0) or 0
        self.total = kwargs.get("total")
        self.format_dict: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.n += n or 0
        self.task.advance(int(n or 0))

    def update_transfer(self, n=1): ...
    def set_postfix_str(self, *a, **k): ...
    def set_transfer_postfix_str(self, *a, **k): ...
    def refresh(self, *a, **k): ...
    def close(self): ...


# ---------------------------------------------------------------------------------------
# Errors


def _is_hub_host(url: str, endpoint: str) -> bool:
    a, b = urlsplit(url), urlsplit(endpoint)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


@contextmanager
def hub_errors(repo_id: str, revision: str | None, endpoint: str):
    """huggingface_hub's and the network's exceptions -> one-line Mamba2Errors."""
    import httpx2
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    login = "log in with `hf auth login`, set HF_TOKEN, or pass --token"
    try:
        yield
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
    except OSError as e:  # from huggingface_hub's own transfers (hf_xet); this module's are caught closer
        if e.errno not in _DISK_FULL:
            raise
        raise Mamba2Error(f"disk full while downloading {repo_id} ({e.strerror}): free some space and run the "
                          "same command again") from None
    except (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError,
            httpx2.ProxyError) as e:
        reason = str(e).strip() or type(e).__name__
        raise Mamba2Error(f"cannot reach the Hub at {endpoint} ({reason}); check the network (models already in "
                          "the cache run without it)") from None


def _url_of(e) -> str:
    try:
        return str(e.response.request.url)
    except Exception:
        return "?"


# ---------------------------------------------------------------------------------------
# Transfers


def _xet_available() -> bool:
    """What huggingface_hub checks before an hf_xet transfer: the package, and no HF_HUB_DISABLE_XET."""
    import importlib.util

    from huggingface_hub import constants

    return not constants.HF_HUB_DISABLE_XET and importlib.util.find_spec("hf_xet") is not None


class _Stopped(Exception):
    """Another file failed or the user interrupted: stop, keeping the partial file."""


def _hash_file(path: Path, task: FileTask | None = None, h=None, stop: threading.Event | None = None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            if stop is not None and stop.is_set():
                raise _Stopped()
            h.update(chunk)
            if task is not None:
                task.advance(len(chunk))
    return h


def _transfer(url: str, headers: dict, part: Path, size: int | None, hashing: bool, task: FileTask,
              stop: threading.Event) -> tuple[str | None, int]:
    """GET `url` into `part`, resuming from what `part` holds; (SHA-256 hex or None, bytes fetched)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    part.parent.mkdir(parents=True, exist_ok=True)
    done = part.stat().st_size if part.exists() else 0
    if size is not None and done > size:
        part.unlink()
        done = 0
    h = hashlib.sha256() if hashing else None
    if h is not None and done:
        _hash_file(part, None, h, stop)  # resuming: the bytes on disk count towards the hash
    task.start(done)
    fetched = fails = 0
    timeout = httpx2.Timeout(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    with open(part, "ab") as out:
        while size is None or done < size:
            request_headers = dict(headers)
            if done:
                request_headers["Range"] = f"bytes={done}-"
            try:
                with get_session().stream("GET", url, headers=request_headers, timeout=timeout,
                                          follow_redirects=True) as r:
                    hf_raise_for_status(r)
                    if done and r.status_code != 206:  # the server ignored the Range: start over
                        out.truncate(0)
                        done = 0
                        h = hashlib.sha256() if hashing else None
                        task.restart()
                    for chunk in r.iter_bytes():
                        if stop.is_set():
                            raise _Stopped()
                        out.write(chunk)
                        if h is not None:
                            h.update(chunk)
                        done += len(chunk)
                        fetched += len(chunk)
                        fails = 0
                        task.advance(len(chunk))
                if size is None:
                    break
                if done < size:
                    raise httpx2.RemoteProtocolError(f"the server sent {done} of {size} bytes")
            except httpx2.TransportError:
                out.flush()
                fails += 1
                if fails > _RETRIES:
                    raise
                if stop.wait(min(0.5 * 2 ** (fails - 1), 8.0)):
                    raise _Stopped() from None
    if size is not None and done != size:
        raise Mamba2Error(f"{url}: the server sent {done} bytes, {size} expected")
    return (h.hexdigest() if h is not None else None), fetched


# ---------------------------------------------------------------------------------------
# The download


@dataclass
class _Job:
    """One repo's files going into one target."""

    repo_id: str
    commit: str
    target: _CacheTarget | _LocalDirTarget
    files: list[RemoteFile] = field(default_factory=list)


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

    def api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token, library_name="mamba2", library_version=__version__)

    def listing(self, repo_id: str, revision: str | None) -> tuple[str, dict[str, RemoteFile]]:
        with hub_errors(repo_id, revision, self.endpoint):
            info = self.api().model_info(repo_id, revision=revision, files_metadata=True)
        files = {}
        for s in info.siblings or []:
            lfs = s.lfs
            files[s.rfilename] = RemoteFile(s.rfilename, lfs.size if lfs else s.size,
                                            lfs.sha256 if lfs else None, s.blob_id)
        return info.sha, files

    # -- one file ------------------------------------------------------------------------
    def fetch(self, job: _Job, f: RemoteFile) -> None:
        with hub_errors(job.repo_id, job.commit, self.endpoint):
            self._fetch(job, f)

    def _fetch(self, job: _Job, f: RemoteFile) -> None:
        import httpx2
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import WeakFileLock, build_hf_headers

        t = job.target
        if t.has(f) or t.adopt(f.etag, f):
            return
        url = hf_hub_url(job.repo_id, f.path, revision=job.commit, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint, library_name="mamba2",
                                    library_version=__version__)
        etag = meta.etag or f.etag
        size = meta.size if meta.size is not None else f.size
        if meta.xet_file_data is not None and _xet_available():
            return self._fetch_xet(job, f, size)
        lock = t.lock(etag, f)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if t.adopt(etag, f):  # another process finished it while we waited
                return
            headers = build_hf_headers(token=self.token, library_name="mamba2", library_version=__version__)
            if not _is_hub_host(meta.location, self.endpoint):
                headers.pop("authorization", None)  # signed CDN URLs must not see the token
            headers["Accept-Encoding"] = "identity"  # exact sizes and byte ranges
            part = t.partial(etag, f)
            task = self.progress.file(f.path, size)
            try:
                digest, fetched = _transfer(meta.location, headers, part, size, f.sha256 is not None, task, self.stop)
            except httpx2.TransportError as e:
                have = part.stat().st_size if part.exists() else 0
                raise Mamba2Error(
                    f"downloading {f.path} failed {_RETRIES + 1} times in a row ({e}); the {human_bytes(have)} "
                    "received are kept: run the same command again to resume"
                ) from None
            except OSError as e:
                if e.errno in _DISK_FULL:
                    have = part.stat().st_size if part.exists() else 0
                    raise Mamba2Error(
                        f"disk full while writing {f.path} ({human_bytes(have)} of {human_bytes(size)} written, "
                        f"kept in {part}): free some space and run the same command again to resume"
                    ) from None
                raise
            finally:
                task.finish()
            with self._lock:
                self.fetched_bytes += fetched
                self.fetched_files += 1
            if f.sha256 is not None and digest != f.sha256:
                part.unlink(missing_ok=True)
                raise Mamba2Error(
                    f"{job.repo_id}/{f.path}: the downloaded bytes do not match the Hub's SHA-256 (got {digest[:16]}…, "
                    f"expected {f.sha256[:16]}…); the file was deleted, run the command again to fetch it anew"
                )
            t.place(etag, f, part)
            t.record.put(t.key(f), t.path(f), etag, digest)
            if digest is not None:
                with self._lock:
                    self.verified += 1

    def _fetch_xet(self, job: _Job, f: RemoteFile, size: int | None) -> None:
        from huggingface_hub import hf_hub_download

        t = job.target
        task = self.progress.file(f.path, size)
        task.start(0)
        bars = type("Bars", (_XetBars,), {"task": task})
        kwargs = {"local_dir": t.dir} if isinstance(t, _LocalDirTarget) else {"cache_dir": t.root.parent}
        try:
            hf_hub_download(job.repo_id, f.path, revision=job.commit, endpoint=self.endpoint, token=self.token,
                            tqdm_class=bars, library_name="mamba2", library_version=__version__, **kwargs)
        finally:
            task.finish()
        with self._lock:
            self.fetched_bytes += size or 0
            self.fetched_files += 1
        if f.sha256 is None:
            t.record.put(t.key(f), t.path(f), f.etag, None)
        # LFS files are hashed by verify() like any file not verified yet.

    def verify(self, job: _Job, f: RemoteFile) -> None:
        """SHA-256 of an LFS file not yet verified (fetched by hf_xet, or brought by another tool)."""
        t = job.target
        path = t.path(f)
        if f.sha256 is None or t.record.matches(t.key(f), path, sha256=f.sha256):
            return
        task = self.progress.file(f.path, path.stat().st_size, fetch=False)
        task.start(0)
        try:
            digest = _hash_file(path, task, stop=self.stop).hexdigest()
        finally:
            task.finish()
        if digest != f.sha256:
            t.remove(f)
            raise Mamba2Error(
                f"{job.repo_id}/{f.path}: the file's bytes do not match the Hub's SHA-256 (got {digest[:16]}…, "
                f"expected {f.sha256[:16]}…); the file was deleted, run the command again to fetch it anew"
            )
        t.record.put(t.key(f), path, f.etag, digest)
        with self._lock:
            self.verified += 1

    # -- many files ----------------------------------------------------------------------
    def run_all(self, fn, items: list) -> None:
        """fn(*item) for each item on a few threads; the first error stops the rest (partial files stay)."""
        if not items:
            return
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(items))))
        futures = [pool.submit(fn, *item) for item in items]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in futures if f.done() and f.exception() is not None]
            if errors:
                self.stop.set()
                wait(futures)
                first = next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
                raise first
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
    dl = _Downloader(endpoint, token, progress, workers)
    cache = hub_cache(cache_dir)
    try:
        return _download(dl, repo_id, revision, fmt, include, exclude,
                         Path(local_dir).expanduser() if local_dir is not None else None, cache)
    finally:
        progress.close()


def _download(dl: _Downloader, repo_id, revision, fmt, include, exclude, local_dir, cache) -> DownloadResult:
    commit, listing = dl.listing(repo_id, revision)

    def target(rid: str, sha: str):
        return _LocalDirTarget(local_dir, sha) if local_dir is not None else _CacheTarget(cache, rid, sha)

    job = _Job(repo_id, commit, target(repo_id, commit))
    job.target.set_ref(revision or "main")
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
        dl.run_all(dl.fetch, [(job, listing[n]) for n in meta])
        cfg = _check_config(job, repo_id)
        fmt = cfg.format if cfg is not None else fmt  # hf-style files may hold a mamba_ssm checkpoint
        index = job.target.dir / "model.safetensors.index.json"
        if index.is_file():
            rest = _shards_from_index(index, listing, repo_id) + [n for n in rest if not _SHARD.fullmatch(n)]
        names = meta + _filter(rest, None, exclude)
        if (cfg is not None and cfg.format == "mamba_ssm" and "tokenizer.json" not in listing
                and _filter(["tokenizer.json"], None, exclude)):
            tok_commit, tok_listing = dl.listing(GPT_NEOX_TOKENIZER_REPO, None)
            companion = _Job(GPT_NEOX_TOKENIZER_REPO, tok_commit, target(GPT_NEOX_TOKENIZER_REPO, tok_commit),
                             [tok_listing[n] for n in TOKENIZER_FILES if n in tok_listing])
            companion.target.set_ref("main")
            jobs.append(companion)
    if not names:
        raise Mamba2Error(f"{repo_id}: no file matches the --include/--exclude patterns")
    job.files = [listing[n] for n in names]

    # Free space for what is still missing, before any weights are fetched.
    todo = [(j, f) for j in jobs for f in j.files if not j.target.has(f)]
    partial = sum(_partial_size(j.target, f) for j, f in todo)
    needed = sum(f.size or 0 for _, f in todo) - partial
    where = local_dir if local_dir is not None else cache
    free = free_bytes(where)
    if needed > free:
        raise Mamba2Error(
            f"not enough disk space in {where}: {repo_id} needs {human_bytes(needed)} more, {human_bytes(free)} free"
        )
    if todo:
        dl.progress.plan(len(todo), needed + partial, partial)
    dl.run_all(dl.fetch, todo)
    dl.run_all(dl.verify, [(j, f) for j in jobs for f in j.files])
    return DownloadResult(
        path=job.target.dir, repo_id=repo_id, commit=commit, format=fmt, files=names,
        total_bytes=sum(f.size or 0 for j in jobs for f in j.files), fetched_bytes=dl.fetched_bytes,
        fetched_files=dl.fetched_files, verified_files=dl.verified,
        tokenizer_dir=companion.target.dir if companion else None,
        tokenizer_files=[f.path for f in companion.files] if companion else [],
    )


def _partial_size(t, f: RemoteFile) -> int:
    if not f.etag:
        return 0
    p = t.partial(f.etag, f)
    return p.stat().st_size if p.is_file() else 0


def _check_config(job: _Job, repo_id: str):
    from .config import read_config

    d = job.target.dir
    if not ((d / "config.json").is_file() or (d / "params.json").is_file()):
        return None  # excluded by the user
    try:
        return read_config(d)
    except Mamba2Error as e:
        reason = str(e).replace(f"{d}{os.sep}", "")
        raise Mamba2Error(f"{repo_id} is not a model mamba2 can run: {reason} (--include fetches files anyway)") from None


def _shards_from_index(index: Path, listing: dict, repo_id: str) -> list[str]:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise Mamba2Error(f"{repo_id}: model.safetensors.index.json is not a valid shard index") from None
    missing = [s for s in shards if s not in listing]
    if missing:
        raise Mamba2Error(f"{repo_id}: the shard index lists {missing[0]}, which the repo does not have")
    return shards

