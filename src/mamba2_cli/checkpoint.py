"""Finding weight files, mapping their names, loading them straight to device and dtype.

The model is built on the meta device and filled with `load_state_dict(assign=True)` from
weights read by safetensors in parallel threads while the calling thread places them, with
the bytes in flight capped: no second copy of the weights on the host.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import queue
import re
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open

from .config import Mamba2Config, read_config
from .cpu_threads import free_cores_now
from .errors import Mamba2Error
from .model import Mamba2LM

# Parameters kept in fp32 whatever the model dtype.
FP32_PARAMS = ("dt_bias", "A_log", "D")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """'auto' | 'cpu' | '0' | 'cuda' | 'cuda:1' -> torch.device, or a Mamba2Error."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        raise Mamba2Error("device 'mps' is not supported (untested); use --device cpu")
    index = None
    if spec.isdigit():
        index = int(spec)
    elif spec == "cuda":
        index = 0
    elif spec.startswith("cuda:") and spec[5:].isdigit():
        index = int(spec[5:])
    if index is None:
        raise Mamba2Error(f"unknown device {spec!r}; use cpu, auto, a GPU number (0) or cuda:N")
    if not torch.cuda.is_available():
        raise Mamba2Error(f"device {spec!r} asked for, but no CUDA GPU is available; use --device cpu")
    if index >= torch.cuda.device_count():
        raise Mamba2Error(f"GPU {index} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return torch.device("cuda", index)


def available_memory(device: torch.device) -> int:
    """Bytes the device can still give: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def memory_needed(cfg: Mamba2Config, dtype: torch.dtype, batch_size: int = 1, quant=None) -> int:
    """Bytes of weights (projections quantized by `quant`, a QuantSpec, if given) and state."""
    from .quant import weight_bytes

    itemsize = torch.tensor([], dtype=dtype).element_size()
    return weight_bytes(cfg, itemsize, quant) + cfg.state_bytes(batch_size, itemsize)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def resolve_dtype(spec: str | torch.dtype | None, cfg: Mamba2Config, device: torch.device,
                  batch_size: int = 1, quant=None) -> torch.dtype:
    """'auto' picks bf16 on GPUs; on CPU fp32 when it fits, bf16 when only that fits.

    Also checks that weights + state fit the device; too little memory is an error."""
    if isinstance(spec, torch.dtype):
        dtype = spec
    else:
        spec = (spec or "auto").lower()
        if spec == "auto":
            if device.type == "cuda":
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            else:
                fits32 = memory_needed(cfg, torch.float32, batch_size, quant) <= available_memory(device)
                dtype = torch.float32 if fits32 else torch.bfloat16
        elif spec in DTYPES:
            dtype = DTYPES[spec]
        else:
            raise Mamba2Error(f"unknown dtype {spec!r}; choose auto, bfloat16, float16 or float32")
    need, have = memory_needed(cfg, dtype, batch_size, quant), available_memory(device)
    if need > have:
        raise Mamba2Error(
            f"not enough memory on {device}: the model needs {_gb(need)} (weights in "
            f"{str(dtype).removeprefix('torch.')} + state for batch {batch_size}), {_gb(have)} available"
        )
    return dtype


# ---------------------------------------------------------------------------------------
# Weight files and names


def _shard_path(d: Path, index: Path, name) -> Path:
    """A shard named in the index, as a path inside the model directory.

    The name must be a plain relative path: no absolute part, no `..`, no backslash or NUL;
    it is checked as written, before anything is opened. Symlinks are followed: in the hub
    cache every file of a snapshot is a link into the repository's blobs directory."""
    rel = PurePosixPath(name) if isinstance(name, str) else PurePosixPath()
    if not rel.parts or "\0" in name or "\\" in name or rel.is_absolute() or ".." in rel.parts:
        raise Mamba2Error(f"{index}: shard {name!r} is not a plain relative path inside the model directory")
    return d / name


def find_weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in the order they are tried."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Mamba2Error(f"{index}: not a valid safetensors index ({e})") from None
        except RecursionError:
            raise Mamba2Error(f"{index}: not a valid safetensors index (nested too deeply)") from None
        if not isinstance(weight_map, dict):
            raise Mamba2Error(f"{index}: weight_map must be an object of tensor name to shard file")
        files = sorted({_shard_path(d, index, name) for name in weight_map.values()})
        missing = [str(f.relative_to(d)) for f in files if not f.is_file()]
        if missing:
            raise Mamba2Error(f"{d}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return files
    for name in ("model.safetensors", "consolidated.safetensors", "pytorch_model.bin"):
        if (d / name).is_file():
            return [d / name]
    raise Mamba2Error(
        f"{d}: no weights found (model.safetensors, shards with model.safetensors.index.json, "
        "consolidated.safetensors or pytorch_model.bin)"
    )


def internal_name(name: str) -> str:
    """Map HF, mamba_ssm and Mistral parameter names onto the HF layout the model uses."""
    if name.startswith("model."):  # Mistral consolidated: "model." + mamba_ssm names
        name = name[len("model."):]
    if name == "backbone.embedding.weight":  # mamba_ssm: singular
        name = "backbone.embeddings.weight"
    return name


# How safe_open serves tensor bytes: "pread" reads each tensor into memory of its own (on
# CUDA devices pinned memory, copied to the GPU at once, with the GIL released while it
# reads); "mmap" maps the file, whose pages then count against the process beside the
# converted copies (a 130m-shaped fp16 checkpoint loaded as fp32 on CPU: peak 535 MB above
# the process with pread, 830 MB with mmap, in about the same time), and a whole
# Codestral would stay mapped until its files are closed.
SAFETENSORS_BACKEND = "pread"

# Stored dtypes the loader converts from (safetensors' names); others are refused.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

# safetensors validates the whole header when the file is opened (lengths, JSON, dtypes,
# offsets against shapes and the file size; a header over 100 MB is refused before it is
# read) and reports it as one SafetensorError; these are the reasons its messages give.
_HEADER_REASONS = (
    ("header too small", "bad header length"),
    ("invalid header length", "bad header length"),
    ("header too large", "bad header length"),
    ("incomplete metadata", "a tensor lies outside the file or has the wrong size (truncated?)"),
    ("invalid shape, data type, or offset", "a tensor lies outside the file or has the wrong size (truncated?)"),
    ("invalid offset", "a tensor lies outside the file or has the wrong size (truncated?)"),
    ("overflow", "a tensor lies outside the file or has the wrong size (truncated?)"),
)
# Errors in well-formed JSON of the wrong structure (its parser's words), as opposed to JSON
# that does not parse.
_ENTRY_ERRORS = ("invalid type", "invalid value", "invalid length", "missing field", "unknown field",
                 "duplicate field")


def _header_reason(text: str) -> str:
    """safetensors' reason for refusing a header, in a few words."""
    if "invalid JSON in header: " not in text:
        return next((r for key, r in _HEADER_REASONS if key in text), text.split(": ", 1)[-1])
    detail = re.sub(r" at line \d+ column \d+$", "", text.split("invalid JSON in header: ", 1)[1])
    if "struct HashMetadata" in detail:
        return "header is not an object"
    if "recursion limit" in detail:
        return "header nested too deeply"
    if m := re.match(r"unknown variant `([^`]*)`", detail):
        return f"unsupported or malformed entry: unknown dtype {m[1]}"
    if detail.startswith(_ENTRY_ERRORS):
        return f"unsupported or malformed entry: {detail.replace('usize', 'a non-negative integer')}"
    return "unreadable header"


@contextlib.contextmanager
def open_safetensors(path: Path, device: torch.device | str = "cpu"):
    """safe_open serving tensors on `device`, its header errors as one-line Mamba2Errors naming the file."""
    try:
        f = safe_open(path, framework="pt", device=str(device), backend=SAFETENSORS_BACKEND)
    except SafetensorError as e:
        raise Mamba2Error(f"{path}: not a valid safetensors file ({_header_reason(str(e))})") from None
    except OSError as e:
        raise Mamba2Error(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        yield f


def iter_bin_tensors(path: Path):
    """Yield (name, CPU tensor) from a weights-only PyTorch file.

    Zip files (torch.save's format since 1.6) are memory-mapped; the legacy format cannot be,
    and torch reads it whole, still weights-only."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:  # refused globals, or not a pickle at all
        m = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", str(e), re.S)
        why = " ".join(m[1].split()).split(". ")[0] if m and m[1].strip() else "not a PyTorch file"
        raise Mamba2Error(f"{path}: cannot load as a weights-only PyTorch file ({why})") from None
    except EOFError:
        raise Mamba2Error(f"{path}: cannot load as a weights-only PyTorch file (it ends early: truncated?)") from None
    except Exception as e:  # zip errors, bad magic numbers
        why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise Mamba2Error(f"{path}: cannot load as a weights-only PyTorch file ({why})") from None
    if not isinstance(sd, dict):
        raise Mamba2Error(f"{path}: holds no state dict")
    for n, t in sd.items():
        if isinstance(t, torch.Tensor):
            if t.dtype not in SAFETENSORS_DTYPES.values():
                raise Mamba2Error(f"{path}: tensor {n!r} has an unsupported dtype {str(t.dtype).removeprefix('torch.')}")
            yield n, t


def place(name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Move one tensor to its device and dtype, in the layout the matmuls there like best.

    On CPU, projection matrices are stored input-major ([in, out] memory, the same
    [out, in] shape): a single-token matvec then streams the weights about 1.5x faster
    (measured: 19 vs 13 GB/s on 2 cores), and prompt-sized matmuls run at the same speed.
    """
    leaf = name.rsplit(".", 1)[-1]
    if not t.is_floating_point():  # quantized weights keep their integer dtype
        return t.to(device=device)
    dtype = torch.float32 if leaf in FP32_PARAMS else dtype
    # The embedding too: tied checkpoints use it as lm_head, and a strided row gather costs nothing.
    if device.type == "cpu" and t.dim() == 2 and name.endswith(("proj.weight", "lm_head.weight", "embeddings.weight")):
        # Transposed in the narrower of the two dtypes (torch's same-dtype transpose is the
        # fast copy), then converted: the temporary is the size of the smaller copy.
        if t.element_size() <= dtype.itemsize:
            return t.t().contiguous().to(dtype).t()
        return t.to(dtype).t().contiguous().t()
    return t.to(device=device, dtype=dtype)


# Reading and placing run side by side: reader threads fetch tensors in file order while
# the calling thread casts and lays out those already read. Bytes read but not yet placed
# are capped, so the host memory a load adds stays bounded whatever the checkpoint's size
# (a tensor larger than the cap goes alone). On CUDA devices safetensors reads each tensor
# into pinned memory that torch's host allocator rounds up to a power of two and keeps for
# reuse; the cap counts those rounded blocks, and they are released after the load.
CUDA_INFLIGHT_BYTES = 1 << 30
CUDA_READERS = 8
# On CPU the read buffers are the host memory itself: at most the largest tensor in flight,
# so a load peaks no higher than reading and placing one tensor at a time.
CPU_READERS = 1


@dataclass
class LoadTimes:
    """Where a load's seconds went. read_s: waiting for tensors from the files (on a GPU,
    already copied to it); place_s: casting and laying them out (the two overlap: this is
    the time the placing thread spent, read_s the rest of the weights' wall time);
    setup_s: config, memory check, building the model, derived tensors, backend."""
    read_s: float = 0.0
    place_s: float = 0.0
    setup_s: float = 0.0


class InflightBudget:
    """Bytes handed from the readers to the placer and not yet placed: at most `cap`, or one
    tensor alone when it is larger. `peak` records the most ever held."""

    def __init__(self, cap: int):
        self.cap, self.used, self.peak, self.stopped = cap, 0, 0, False
        self._cond = threading.Condition()

    def acquire(self, n: int) -> bool:
        """Wait for room for n bytes; False once the load was stopped."""
        with self._cond:
            self._cond.wait_for(lambda: self.stopped or self.used == 0 or self.used + n <= self.cap)
            if self.stopped:
                return False
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()


@dataclass
class _Item:
    """One tensor to load: where it is, what it becomes, and how it is read."""
    path: Path
    raw: str
    name: str
    nbytes: int
    read: object  # () -> tensor (on the device for safetensors on CUDA, else on the CPU)


def _pinned_block(n: int) -> int:
    """The pinned block torch's host allocator hands out for n bytes (a power of two)."""
    return 1 << max(n - 1, 0).bit_length()


def _plan(files: list[Path], device: torch.device, expected: dict, optional: set, stack) -> list[_Item]:
    """Every tensor of every file, checked against the config before any is read."""
    items = []
    for path in files:
        if path.suffix == ".safetensors":
            f = stack.enter_context(open_safetensors(path, device if device.type == "cuda" else "cpu"))
            entries = []
            for raw in f.offset_keys():
                sl = f.get_slice(raw)
                stored = sl.get_dtype()
                if stored not in SAFETENSORS_DTYPES:
                    raise Mamba2Error(f"{path}: tensor {raw!r} has an unsupported dtype {stored}")
                shape = tuple(sl.get_shape())
                nbytes = math.prod(shape) * SAFETENSORS_DTYPES[stored].itemsize
                entries.append((raw, shape, nbytes, functools.partial(_read_safetensors, f, path, raw)))
        else:
            entries = [(raw, tuple(t.shape), t.nbytes, functools.partial(lambda t: t, t))
                       for raw, t in iter_bin_tensors(path)]
        for raw, shape, nbytes, read in entries:
            name = internal_name(raw)
            if name not in expected:
                raise Mamba2Error(f"{path.name}: unexpected tensor {raw!r} for this config")
            if shape != expected[name]:
                raise Mamba2Error(
                    f"{path.name}: tensor {raw!r} has shape {list(shape)}, the config needs {list(expected[name])}"
                )
            if name in optional:  # tied: the embedding serves as lm_head, and this copy is never read
                continue
            items.append(_Item(path, raw, name, nbytes, read))
    return items


def _read_safetensors(f, path: Path, raw: str) -> torch.Tensor:
    try:
        return f.get_tensor(raw)
    except (SafetensorError, OSError) as e:  # the file shrank or went away since it was opened
        raise Mamba2Error(f"{path}: cannot read tensor {raw!r} ({e})") from None


def read_tensors(items: list[_Item], budget: InflightBudget, readers: int, cost=lambda item: item.nbytes):
    """Yield (item, tensor) as reader threads produce them; the caller calls
    budget.release(cost(item)) once it is done with each tensor."""
    results: queue.Queue = queue.Queue()
    order = iter(items)
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                item = next(order, None)
            if item is None or not budget.acquire(cost(item)):
                return
            try:
                results.put((item, item.read()))
            except BaseException as e:  # handed to the caller, which stops the others
                budget.release(cost(item))
                results.put((None, e))
                return

    threads = [threading.Thread(target=work, daemon=True) for _ in range(max(1, min(readers, len(items))))]
    for t in threads:
        t.start()
    try:
        for _ in items:
            item, t = results.get()
            if item is None:
                raise t
            yield item, t
    finally:
        budget.stop()
        for t in threads:
            t.join()


def load_weights(model: Mamba2LM, files: list[Path], device: torch.device, dtype: torch.dtype,
                 convert=None) -> LoadTimes:
    """Fill a meta-device model from weight files; every tensor is checked against the config
    before the first is read. Returns where the time went.

    convert: None, or a hook (name, tensor on the device) -> {name: tensor} called on each
    tensor as it is placed (quant.converter: quantizing at load time, one tensor at a time);
    the files then hold the plain model's tensors and `model` has the converted structure."""
    cfg = model.cfg
    shapes = build_meta_model(cfg) if convert is not None else model
    expected = {k: tuple(v.shape) for k, v in shapes.state_dict().items()}
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    loaded: dict[str, torch.Tensor] = {}
    times = LoadTimes()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        items = _plan(files, device, expected, optional, stack)
        seen = {}
        for item in items:
            if item.name in seen:
                raise Mamba2Error(f"{item.path.name}: tensor {item.raw!r} is also in {seen[item.name].name}")
            seen[item.name] = item.path
        threads = torch.get_num_threads()
        if device.type == "cuda":
            budget, readers, cost = InflightBudget(CUDA_INFLIGHT_BYTES), CUDA_READERS, lambda i: _pinned_block(i.nbytes)
        else:
            largest = max((i.nbytes for i in items), default=0)
            budget, readers, cost = InflightBudget(largest), CPU_READERS, lambda i: i.nbytes
            # The layout copies take the cores left to them: the reader keeps one busy, and
            # a thread that shares its core with other work stalls every copy (a 130m-shaped
            # load on 2 busy cores: 1.7-1.9 s with one thread, 2.4 s with two).
            torch.set_num_threads(max(1, min(threads, free_cores_now(threads) - readers)))
        try:
            for item, t in read_tensors(items, budget, readers, cost):
                p0 = time.perf_counter()
                placed = place(item.name, t, device, dtype)
                loaded.update(convert(item.name, placed) if convert is not None else {item.name: placed})
                del placed
                del t
                budget.release(cost(item))
                times.place_s += time.perf_counter() - p0
        finally:
            torch.set_num_threads(threads)
        if device.type == "cuda":
            p0 = time.perf_counter()
            torch.cuda.synchronize(device)
            times.place_s += time.perf_counter() - p0
            getattr(torch._C, "_host_emptyCache", lambda: None)()  # the pinned read buffers go back to the system
    times.read_s = time.perf_counter() - t0 - times.place_s
    missing = [n for n in expected if n not in seen and n not in optional]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise Mamba2Error(f"checkpoint is missing tensor {missing[0]!r}{more}, shape {list(expected[missing[0]])}")
    if cfg.tie_embeddings and "lm_head.weight" in expected:
        head = loaded["backbone.embeddings.weight"]
        loaded.update(convert("lm_head.weight", head) if convert is not None else {"lm_head.weight": head})
    model.load_state_dict(loaded, strict=True, assign=True)
    return times


def build_meta_model(cfg: Mamba2Config) -> Mamba2LM:
    with torch.device("meta"):
        return Mamba2LM(cfg)


def random_model(cfg: Mamba2Config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Mamba2LM:
    """A model of the given shape with random weights drawn on the device (for benchmarks).

    Initialized like a trained Mamba-2 in the quantities that matter for numerics: decays
    exp(dt*A) in a realistic range, unit norms, projections scaled by 1/sqrt(fan_in).
    """
    model = build_meta_model(cfg)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        shape, leaf = p.shape, name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            t = torch.ones(shape, device=device)
        elif leaf == "A_log":
            t = torch.log(torch.empty(shape, device=device).uniform_(1.0, 16.0, generator=g))
        elif leaf == "dt_bias":
            dt = torch.exp(torch.empty(shape, device=device).uniform_(math.log(1e-3), math.log(0.1), generator=g))
            t = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif leaf == "D":
            t = torch.ones(shape, device=device)
        elif leaf == "bias":
            t = torch.zeros(shape, device=device)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            std = 0.02 if "embeddings" in name else 1.0 / math.sqrt(fan_in)
            if name.endswith("out_proj.weight"):
                # Each block adds a small update to the residual stream, as in trained models;
                # at full scale 64 random blocks amplify rounding (bf16 vs fp32 logits: 7 %).
                std /= math.sqrt(cfg.n_layer)
            t = torch.empty(shape, device=device).normal_(0.0, std, generator=g)  # fp32 draws: same weights in any dtype
        sd[name] = place(name, t, device, dtype)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["backbone.embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    return model.prepare()


def load_checkpoint(model_dir: Path, device: torch.device, dtype: str | torch.dtype = "auto",
                    backend: str = "auto", batch_size: int = 1, quant: str | None = None) -> Mamba2LM:
    """Read config, check memory, build on meta, fill from the weight files, pick the backend.

    quant: None, or 'int8' | 'int4' to quantize the projections as they load. A checkpoint
    whose config records a quantization loads quantized as it is."""
    from . import quant as q

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    stored, spec = q.load_plan(model_dir, cfg, quant)
    files = find_weight_files(model_dir)
    dtype = resolve_dtype(dtype, cfg, device, batch_size, spec)
    model = build_meta_model(cfg)
    if spec is not None:
        q.restructure(model, spec)
    times = load_weights(model, files, device, dtype, convert=q.converter(spec, dtype) if spec and not stored else None)
    if stored:
        q.check_loaded(model)
    model.prepare()
    model.set_backend(backend)
    times.setup_s = time.perf_counter() - t0 - times.read_s - times.place_s
    model.load_times = times
    return model
