"""State files: a Mamba2State on disk, with what is needed to trust it and to continue from it.

A state file is a plain safetensors file (any safetensors reader opens it) holding the
tensors `conv` and `ssm` in the layout of state.py, and in its metadata:

    format            "mamba2-state"; format_version "2"
    model_fingerprint see model_fingerprint(): tells models apart, same config or not
    model             the model's name when saved (for messages only)
    config            the model config as JSON (to say how two models differ)
    dtype             the model dtype (the dtype of `conv`; `ssm` is always fp32)
    tokens            how many tokens of text the state stands for
    last_token        the last of them, which the state has NOT yet consumed: continuing
                      feeds it first, so a saved state needs no saved logits
    block_bytes, crc32
                      CRC-32 of each block of the tensor data, to catch damaged files
    header_crc32      CRC-32 of the rest of the header (see _header_crc): tokens, last
                      token, block size, fingerprint, dtype, tensor entries, conversation
    mamba2_version    the version of the tool that wrote it
    chat              (chat sessions only) the conversation as JSON

Format 1 is format 2 without header_crc32: its files still load, their header values
bounded but not checksummed.

Writes are atomic: the file is written beside its destination under a fresh random name,
created exclusively (a file or link planted there is never written through), flushed to
disk and renamed over the destination, so a crash leaves the old file or the new one,
never half of either. A load reads header and data from one open file: a save renaming
another file over the path meanwhile does not change what the load reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import safetensors_format
from .errors import Mamba2Error
from .model import Mamba2LM
from .quant import SCHEMES
from .state import Mamba2State

FORMAT = "mamba2-state"
FORMAT_VERSION = 2
# Checksums per block, verified in parallel threads (zlib releases the GIL): a 266 MiB
# Codestral state checks in a few tens of ms instead of one long serial pass.
BLOCK_BYTES = 16 << 20
# The block sizes a load accepts: a smaller one means one thread task per few bytes.
MIN_BLOCK_BYTES, MAX_BLOCK_BYTES = 4 << 10, 1 << 30
# The most tokens a state may stand for: counts stay exact in any JSON reader (2**53).
MAX_TOKENS = 1 << 53
# Elements sampled from every weight tensor for the fingerprint: 4 KiB of fp32, 2 KiB of bf16.
FINGERPRINT_SAMPLES = 1024
# When a run saves its state: after the prompt, or after the generated text.
SAVE_POINTS = ("prompt", "generation")


@dataclass
class SavedState:
    """What a state file holds: the state and the text position it stands for."""

    state: Mamba2State
    tokens: int  # tokens of text the state stands for, last_token included
    last_token: int | None  # not yet consumed by `state`; None only when tokens == 0
    extra: dict = field(default_factory=dict)  # e.g. {"chat": {...}}
    metadata: dict = field(default_factory=dict)  # the file's metadata as read


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------
# Fingerprint


def _sample_positions(numel: int) -> torch.Tensor:
    """Fixed positions: evenly spaced plus pseudo-random ones (so no stride pattern of the
    weights can hide a difference), the same on every machine (CPU generator, fixed seed)."""
    if numel <= FINGERPRINT_SAMPLES:
        return torch.arange(numel)
    half = FINGERPRINT_SAMPLES // 2
    even = torch.linspace(0, numel - 1, half, dtype=torch.float64).long()
    g = torch.Generator().manual_seed(numel)
    return torch.cat([even, torch.randint(0, numel, (FINGERPRINT_SAMPLES - half,), generator=g)])


@torch.inference_mode()
def model_fingerprint(model: Mamba2LM) -> str:
    """A short hex digest of the model's config, tensor names/shapes/dtypes and a fixed
    sample of every weight tensor's values.

    Cheap whatever the model size (about a thousand elements per tensor, gathered on the
    device, one transfer), yet any retraining or fine-tuning changes it. Positions are
    logical indices, so the same weights give the same fingerprint in any memory layout
    and on any device.
    """
    h = hashlib.sha256()
    quant = getattr(model, "quant", None)
    h.update(json.dumps(model.cfg.to_dict() | {"format": None} | ({"quant": quant.to_dict()} if quant else {}),
                        sort_keys=True).encode())
    samples = []
    index_of: dict = {}  # layers share shapes: build each shape's sample index once
    for name, t in model.state_dict().items():
        h.update(f"{name}|{list(t.shape)}|{_dtype_name(t.dtype)};".encode())
        if t.numel() == 0:
            continue
        key = (tuple(t.shape), t.device)
        if key not in index_of:
            index_of[key] = torch.unravel_index(_sample_positions(t.numel()), t.shape)
            index_of[key] = tuple(i.to(t.device) for i in index_of[key])
        samples.append(t[index_of[key]].contiguous().view(torch.uint8))
    if samples:
        h.update(torch.cat(samples).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------
# Writing


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _read_blocks(fd: int, path: Path, offset: int, out: memoryview, block: int, verify: bool) -> list[int]:
    """Read len(out) bytes from `offset` of the open file `fd` (named `path`) into `out`, one
    block per thread, each checksummed as it lands (CRC-32 per block; [] without verify).
    Parallel reads spread the page faults of the fresh buffer and the copies from the page
    cache over the cores."""
    spans = [(i, min(i + block, len(out))) for i in range(0, len(out), block)]

    def one(span):
        lo, hi = span
        view = out[lo:hi]
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + lo + done)
            if n <= 0:
                raise EOFError
            done += n
        return zlib.crc32(view) if verify else 0

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(len(spans), os.cpu_count() or 1, 16))) as pool:
            crcs = list(pool.map(one, spans))
    except EOFError:
        raise Mamba2Error(f"{path}: truncated (the file ended inside the state); save the state again") from None
    except OSError as e:
        raise Mamba2Error(f"cannot read state file {path}: {e.strerror or e}") from None
    return crcs if verify else []


def _header_crc(header: dict) -> int:
    """CRC-32 of a state file's header in a canonical form (sorted keys, ASCII, no spaces),
    its own checksum left out: the same for the header as written and as parsed back."""
    meta = {k: v for k, v in header["__metadata__"].items() if k != "header_crc32"}
    canonical = json.dumps({**header, "__metadata__": meta}, sort_keys=True, ensure_ascii=True,
                           separators=(",", ":"))
    return zlib.crc32(canonical.encode("ascii"))


def _crc_blocks(data: memoryview, block: int = BLOCK_BYTES) -> list[int]:
    blocks = [data[i : i + block] for i in range(0, len(data), block)]
    if len(blocks) <= 1:
        return [zlib.crc32(b) for b in blocks]
    with ThreadPoolExecutor(max_workers=min(len(blocks), os.cpu_count() or 1, 16)) as pool:
        return list(pool.map(zlib.crc32, blocks))


def save_state(path: str | os.PathLike, model: Mamba2LM, state: Mamba2State, tokens: int,
               last_token: int | None, extra: dict | None = None, model_name: str | None = None) -> Path:
    """Write sequence 0 of `state` (a batch of one) to `path`, atomically.

    `tokens` counts the tokens of text the state stands for; `last_token`, the last of them,
    must not have been fed to the state yet (pass None only for an empty state).
    """
    path = Path(path)
    if state.batch_size != 1:
        raise Mamba2Error(f"a state file holds one sequence; this state has a batch of {state.batch_size}")
    if (last_token is None) != (tokens == 0):
        raise Mamba2Error("a saved state needs its last token (and an empty one has none)")
    tensors = {"conv": state.conv, "ssm": state.ssm}
    data = bytearray()
    header: dict = {}
    for name, t in tensors.items():
        b = _tensor_bytes(t)
        header[name] = {"dtype": safetensors_format.NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    view = memoryview(data)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_fingerprint": model_fingerprint(model),
        "model": model_name or "",
        "config": json.dumps(model.cfg.to_dict()),
        "dtype": _dtype_name(model.dtype),
        "weights": _weights_name(model),
        "tokens": str(int(tokens)),
        "last_token": "" if last_token is None else str(int(last_token)),
        "block_bytes": str(BLOCK_BYTES),
        "crc32": ",".join(f"{c:08x}" for c in _crc_blocks(view)),
        "mamba2_version": _version(),
    }
    for key, value in (extra or {}).items():
        meta[key] = json.dumps(value, ensure_ascii=False)
    header = {"__metadata__": meta, **header}
    meta["header_crc32"] = f"{_header_crc(header):08x}"
    head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    _write_atomic(path, [len(head).to_bytes(8, "little"), head, view])
    return path


def _version() -> str:
    from . import __version__

    return __version__


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, before any work, when `path` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise Mamba2Error(f"cannot write state file {path}: it is a directory")
    if not parent.is_dir():
        raise Mamba2Error(f"cannot write state file {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise Mamba2Error(f"cannot write state file {path}: directory {parent} is not writable")


def _temporary_name(path: Path) -> Path:
    """A name beside `path` that nobody can know in advance (64 random bits)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def _write_atomic(path: Path, pieces: list) -> None:
    check_writable(path)
    tmp = _temporary_name(path)
    # O_EXCL: a new file or nothing, never an existing file or a link planted at the name.
    # Not tempfile.mkstemp: its files are 0600 whatever the umask; a state file gets the
    # mode any new file gets.
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise Mamba2Error(f"cannot write state file {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for p in pieces:
                f.write(p)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise Mamba2Error(f"cannot write state file {path}: {e.strerror or e}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------
# Reading


@dataclass
class _Header:
    """A state file's header, checked: structure, header checksum, and the bounds of every
    value a load acts on (the vocabulary bound of last_token needs the model: load_state)."""

    meta: dict
    entries: dict  # "conv" and "ssm": their safetensors entries
    data_start: int  # offset of the tensor bytes in the file
    nbytes: int  # tensor bytes
    tokens: int
    last_token: int | None
    block: int
    crcs: list[int]


@contextmanager
def _open(path: Path):
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise Mamba2Error(f"state file {path} does not exist") from None
    except IsADirectoryError:
        raise Mamba2Error(f"state file {path} is a directory") from None
    except OSError as e:
        raise Mamba2Error(f"cannot read state file {path}: {e.strerror or e}") from None
    with f:
        yield f


def _read_header(f, path: Path) -> _Header:
    def damaged(why: str) -> Mamba2Error:
        return Mamba2Error(f"{path}: damaged state file ({why})")

    try:
        size = os.fstat(f.fileno()).st_size
        header, data_start = safetensors_format.read_header(f, size)
    except OSError as e:
        raise Mamba2Error(f"cannot read state file {path}: {e.strerror or e}") from None
    except safetensors_format.HeaderError as e:
        if e.kind == "length":
            raise Mamba2Error(f"{path}: not a mamba2 state file (no safetensors header; damaged or truncated?)") from None
        if e.kind == "json":
            raise Mamba2Error(f"{path}: not a mamba2 state file (unreadable header; damaged?)") from None
        header, data_start = None, 0  # JSON but not an object: reported below as missing metadata
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise Mamba2Error(f"{path}: not a mamba2 state file (a safetensors file without mamba2 state metadata)")
    try:
        version = int(meta.get("format_version", ""))
    except (TypeError, ValueError):
        raise damaged("bad format_version") from None
    if version < 1:
        raise damaged("bad format_version")
    if version > FORMAT_VERSION:
        raise Mamba2Error(f"{path} was written by mamba2 {meta.get('mamba2_version', '?')} in state format "
                          f"{version}; this mamba2 ({_version()}) reads format {FORMAT_VERSION}: upgrade it")
    if not all(isinstance(v, str) for v in meta.values()):
        raise damaged("metadata values that are not strings")
    if version >= 2:
        try:
            crc_ok = meta.get("header_crc32") == f"{_header_crc(header):08x}"
        except RecursionError:
            raise damaged("unreadable header") from None
        if not crc_ok:
            raise damaged("checksum mismatch in its header")
    entries, end = {}, 0
    for name in ("conv", "ssm"):
        entries[name] = e = header.get(name)
        try:
            _, _, begin, stop, nbytes = safetensors_format.entry(e)
        except safetensors_format.HeaderError:
            raise damaged(f"tensor {name!r} missing or malformed") from None
        if stop - begin != nbytes or begin < 0:
            raise damaged(f"tensor {name!r} has the wrong size")
        end = max(end, stop)
    if data_start + end > size:
        raise Mamba2Error(f"{path}: truncated ({size:,} bytes; its header promises {data_start + end:,}): "
                          "it was not written completely; save the state again")
    try:
        tokens = int(meta["tokens"])
        last_token = int(meta["last_token"]) if meta.get("last_token") else None
        block = int(meta.get("block_bytes", BLOCK_BYTES))
        hexes = [c for c in meta["crc32"].split(",") if c]
        if not all(re.fullmatch(r"[0-9a-f]{8}", c) for c in hexes):
            raise ValueError
        crcs = [int(c, 16) for c in hexes]
    except (KeyError, ValueError):
        raise damaged("unreadable metadata") from None
    if (last_token is None) != (tokens == 0) or not 0 <= tokens <= MAX_TOKENS:
        raise damaged("inconsistent token metadata")
    if not MIN_BLOCK_BYTES <= block <= MAX_BLOCK_BYTES:
        raise damaged(f"block size {block:,} is outside {MIN_BLOCK_BYTES >> 10} KiB..{MAX_BLOCK_BYTES >> 30} GiB")
    if len(crcs) != math.ceil(end / block):
        raise damaged("checksum list does not match the data")
    return _Header(meta, entries, data_start, end, tokens, last_token, block, crcs)


def read_metadata(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """(metadata, tensor entries, offset of the data) of a state file; checks the header."""
    path = Path(path)
    with _open(path) as f:
        h = _read_header(f, path)
    return h.meta, h.entries, h.data_start


def _describe_difference(saved_cfg: dict, cfg: dict) -> str:
    keys = [k for k in sorted(set(saved_cfg) | set(cfg)) if k != "format" and saved_cfg.get(k) != cfg.get(k)]
    if not keys:
        return "same config, different weights"
    shown = ", ".join(f"{k} {saved_cfg.get(k)} vs {cfg.get(k)}" for k in keys[:3])
    return f"a different config: {shown}" + (" ..." if len(keys) > 3 else "")


def _weights_name(model: Mamba2LM) -> str:
    """How the projections' weights are stored: the model dtype, or the quantization scheme."""
    quant = getattr(model, "quant", None)
    return quant.scheme if quant else _dtype_name(model.dtype)


def check_compatible(path: str | os.PathLike, meta: dict, model: Mamba2LM) -> None:
    """Refuse a state saved with another dtype, other weights (quantized or not) or another
    model (fingerprint)."""
    dtype = _dtype_name(model.dtype)
    saved_w, weights = meta.get("weights", meta.get("dtype")), _weights_name(model)
    if saved_w != weights and (saved_w in SCHEMES or weights in SCHEMES):
        how = f"--quant {saved_w}" if saved_w in SCHEMES else "the unquantized checkpoint"
        raise Mamba2Error(f"{path} holds a state computed with {saved_w} weights; this model has {weights} weights, "
                          f"whose states differ: load it with {how}")
    if meta.get("dtype") != dtype:
        raise Mamba2Error(f"{path} holds a state of a {meta.get('dtype')} model; this model runs in {dtype}: "
                          f"load it with --dtype {meta.get('dtype')}")
    if meta.get("model_fingerprint") != model_fingerprint(model):
        try:
            saved_cfg = json.loads(meta.get("config", "{}"))
        except ValueError:
            saved_cfg = {}
        made_by = f" ({meta['model']})" if meta.get("model") else ""
        raise Mamba2Error(f"{path} was saved from another model{made_by}: "
                          f"{_describe_difference(saved_cfg, model.cfg.to_dict())}")


def load_state(path: str | os.PathLike, model: Mamba2LM, into: Mamba2State | None = None,
               verify: bool = True, check_metadata: Callable[[dict], None] | None = None) -> SavedState:
    """Read a state file for `model`; the state goes into `into` (a batch of one) or a new one.

    Every check that needs no tensor data (header checksum, format, value bounds, dtype,
    model fingerprint, sizes, then the caller's `check_metadata` on the file's metadata,
    which raises to refuse it) runs before the data is read; the CRC-32 checks of the data
    run after (skip them with verify=False). Header and data come from one open file.
    """
    path = Path(path)
    with _open(path) as f:
        h = _read_header(f, path)
        check_compatible(path, h.meta, model)
        if h.last_token is not None and not 0 <= h.last_token < model.cfg.vocab_size:
            raise Mamba2Error(f"{path}: damaged state file (last token {h.last_token} is outside the vocabulary)")
        state = into if into is not None else model.new_state(1)
        if state.batch_size != 1:
            raise Mamba2Error(f"a state file holds one sequence; the target state has a batch of {state.batch_size}")
        for name, target in (("conv", state.conv), ("ssm", state.ssm)):
            e = h.entries[name]
            if list(e["shape"]) != list(target.shape) or safetensors_format.DTYPES[e["dtype"]] != target.dtype:
                raise Mamba2Error(f"{path}: tensor {name!r} is {e['dtype']} {e['shape']}, this model's state is "
                                  f"{safetensors_format.NAMES.get(target.dtype)} {list(target.shape)}")
        extra = {}
        for key in ("chat",):
            if key in h.meta:
                try:
                    extra[key] = json.loads(h.meta[key])
                except (ValueError, RecursionError):
                    raise Mamba2Error(f"{path}: damaged state file (unreadable {key} metadata)") from None
        if check_metadata is not None:
            check_metadata(h.meta)
        buf = torch.empty(h.nbytes, dtype=torch.uint8)
        got = _read_blocks(f.fileno(), path, h.data_start, memoryview(buf.numpy()), h.block, verify)
    if verify:
        bad = [i for i, (a, b) in enumerate(zip(got, h.crcs)) if a != b]
        if bad:
            lo = bad[0] * h.block
            raise Mamba2Error(f"{path}: damaged (checksum mismatch in bytes {lo:,}-{min(lo + h.block, h.nbytes):,} "
                              "of the state); save the state again")
    with torch.inference_mode():  # the target may be an inference tensor (made inside the generation loop)
        # One host-to-device copy of the whole file, then two device-side copies into place.
        staged = buf.to(state.ssm.device, non_blocking=False) if state.ssm.device.type != "cpu" else buf
        for name, target in (("conv", state.conv), ("ssm", state.ssm)):
            begin, stop = (int(o) for o in h.entries[name]["data_offsets"])
            target.copy_(staged[begin:stop].view(target.dtype).view(target.shape))
    return SavedState(state, h.tokens, h.last_token, extra, h.meta)


# ---------------------------------------------------------------------------------------
# One generation run that continues a state file, saves one, or both


class StateRun:
    """The state-file bookkeeping of one generation run of a single sequence.

    Continuing (`load_from`): `state` and `last_token` are the file's, for the generation
    loop. Saving (`save_to`) after the prompt: `on_prompt` is the loop's hook that keeps a
    copy of the state before the prompt's last token (a file needs one token unconsumed);
    after the generation: the state the loop leaves, with the last generated token
    unconsumed. A run of no tokens has none to leave unconsumed, so it saves at the prompt.
    save() then counts the tokens the saved state stands for.
    """

    def __init__(self, model: Mamba2LM, load_from: str | os.PathLike | None = None,
                 save_to: str | os.PathLike | None = None, save_after: str = "prompt", max_tokens: int = 1):
        if save_after not in SAVE_POINTS:
            raise Mamba2Error(f"a state is saved after the prompt or the generation, not {save_after!r}")
        self.model = model
        self.load_from = None if load_from is None else Path(load_from)
        self.save_to = None if save_to is None else Path(save_to)
        self.loaded: SavedState | None = None
        self.load_s = 0.0
        if self.load_from is not None:
            t0 = time.perf_counter()
            self.loaded = load_state(self.load_from, model)
            self.load_s = time.perf_counter() - t0
        self.state = self.loaded.state if self.loaded is not None else model.new_state(1)
        self.last_token = self.loaded.last_token if self.loaded is not None else None
        at_prompt = self.save_to is not None and (save_after == "prompt" or max_tokens == 0)
        self.on_prompt = self._keep_prompt_state if at_prompt else None
        self._at_prompt: tuple[Mamba2State, int] | None = None
        self.saved_tokens: int | None = None

    @property
    def keeps_state(self) -> bool:
        """Whether the state the loop leaves is read afterwards (it is when saving)."""
        return self.save_to is not None

    def _keep_prompt_state(self, state: Mamba2State, prompt_ids) -> None:
        self._at_prompt = (state.clone(), prompt_ids[-1])

    def save(self, result, model_name: str | None = None) -> int | None:
        """Write the state file for the run's GenerationResult; the tokens it stands for (None: nothing to save)."""
        if self.save_to is None:
            return None
        before = self.loaded.tokens - 1 if self.loaded is not None else 0  # the loaded last token is in prompt_tokens
        if self._at_prompt is not None:
            state, last = self._at_prompt
            tokens = before + result.prompt_tokens
        else:
            state, last = self.state, result.token_ids[-1]
            tokens = before + result.prompt_tokens + len(result.token_ids)
        save_state(self.save_to, self.model, state, tokens, last, model_name=model_name)
        self.saved_tokens = tokens
        return tokens
