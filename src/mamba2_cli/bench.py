"""The harness behind `mamba2 bench`: prefill and decode speed of the path `run` uses."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from .generation import peak_memory_bytes, prefill, runner_for, stream_generate
from .kernels import describe_device
from .model import Mamba2LM


def environment(device: torch.device) -> dict:
    """What a figure needs beside it to mean anything: hardware (on CUDA its architecture and
    the kernels' configuration table), versions, commit."""
    gpu = describe_device(device)
    env = {
        "device": gpu["gpu"] or platform.processor() or "cpu",
        "architecture": gpu["architecture"],
        "kernel_table": gpu["kernel_table"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["commit"] = build_commit()
    return env


def build_commit() -> str:
    """The git commit the package was built from: recorded at build time by setup.py.

    Run from a source checkout (PYTHONPATH=src, an editable install) there is no build
    record; git then answers for the checkout the package lives in, and only for it: a
    package installed inside some other repository (a venv in a project) never asks git.
    """
    try:
        from ._build_info import COMMIT

        return COMMIT
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[2]
    if not ((root / ".git").exists() and (root / "setup.py").is_file()
            and "mamba2-cli" in (root / "pyproject.toml").read_text(errors="replace")):
        return "unknown"

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"  # the tree measured is not that commit
        return commit or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def prefill_flops(model: Mamba2LM, batch_size: int, prompt_len: int) -> int:
    """2 x parameters x prompt tokens: the usual count of a prefill's work, scan work left out."""
    return 2 * model.cfg.num_parameters() * batch_size * prompt_len


def bytes_per_decode_step(model: Mamba2LM, batch_size: int) -> int:
    """Weights read once (one embedding row per sequence; quantized projections at their packed
    size with their scales) plus the fp32 state read and written."""
    from .quant import weight_bytes

    cfg = model.cfg
    itemsize = model.dtype.itemsize
    weights = weight_bytes(cfg, itemsize, model.quant)
    # The embedding table itself is not streamed, only its rows (tied and unquantized, it is lm_head).
    if not cfg.tie_embeddings or model.quant is not None:
        weights -= (cfg.padded_vocab_size - batch_size) * cfg.d_model * itemsize
    return weights + 2 * cfg.state_bytes(batch_size, itemsize)


@torch.inference_mode()
def kernels_per_token(model: Mamba2LM, batch_size: int = 1, cuda_graph: bool = True, steps: int = 4) -> float | None:
    """Kernels the GPU runs per decode step of `batch_size` sequences (embedding to logits: the
    graph's kernels when it replays, the eager launches otherwise), counted by CUPTI through
    torch.profiler over a few steps; copies and memsets are not kernels. None off CUDA, or
    where the profiler cannot count them."""
    if model.device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    runner = runner_for(model)
    state = runner.owned_state(batch_size)
    step = runner.decode_step(state, cuda_graph)
    tokens = torch.zeros(batch_size, dtype=torch.long, device=model.device)
    step(tokens)  # captures the graph if it is new
    torch.cuda.synchronize(model.device)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(tokens)
            torch.cuda.synchronize(model.device)
    except Exception:  # no CUPTI, or a profiler already running
        return None
    n = sum(1 for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CUDA
            and not e.name.lower().startswith(("memcpy", "memset")))
    return n / steps if n else None


@torch.inference_mode()
def bench_model(model: Mamba2LM, prompt_len: int, gen_len: int, batch_size: int = 1, repeats: int = 3,
                seed: int = 0, cuda_graph: bool = True, tokenizer=None, on_step=None) -> dict:
    """Median prefill and decode times over `repeats` runs after the warm-up runs.

    Batch 1 runs `stream_generate`, the loop `mamba2 run` uses (greedy, EOS ignored); larger
    batches run the same prefill and decode-step functions over a batched state. With CUDA
    graphs there are two warm-up runs: a prompt's prefill graph is captured at its second
    use (generation.PrefillGraphs), so the repeats measure the replayed graph, as later chat
    turns and repeated calls see it; the first call of a process prefills eagerly
    ("first_call_ttft_s", which includes compiling kernels if the cache is cold).
    """
    device = model.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (batch_size, prompt_len), generator=g)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    warmup = 2 if cuda_graph and device.type == "cuda" else 1
    for r in range(repeats + warmup):
        if batch_size == 1:
            result = None
            for event in stream_generate(model, tokenizer or _NullTokenizer(), ids[0].tolist(), max_tokens=gen_len + 1,
                                         ignore_eos=True, cuda_graph=cuda_graph):
                result = event.result or result
            st = result.stats
            runs.append((st["ttft_s"], st["decode_s"]))
        else:
            runner = runner_for(model)
            state = runner.owned_state(batch_size)
            step = runner.decode_step(state, cuda_graph)
            t0 = _now(device)
            token = prefill(model, ids, state, cuda_graph=cuda_graph).argmax(-1)
            token.tolist()
            t1 = _now(device)
            for _ in range(gen_len):
                token = step(token).argmax(-1)
                token.tolist()
            runs.append((t1 - t0, _now(device) - t1))
        if on_step:
            on_step()
    peak = peak_memory_bytes(device)  # before the count below, which reuses the state and graph
    kernels = kernels_per_token(model, batch_size, cuda_graph) if gen_len else None
    ttft = statistics.median(r[0] for r in runs[warmup:])
    decode_s = statistics.median(r[1] for r in runs[warmup:])
    return {
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "batch_size": batch_size,
        "repeats": repeats,
        "cuda_graph": bool(cuda_graph and device.type == "cuda"),
        "prefill_s": ttft,  # prompt in, first token on the host
        "ttft_s": ttft,
        "first_call_ttft_s": runs[0][0],
        "prefill_tok_s": batch_size * prompt_len / ttft,
        "decode_ms_per_step": 1e3 * decode_s / gen_len if gen_len else None,
        "decode_tok_s": gen_len / decode_s if gen_len else None,  # per sequence
        "kernels_per_token": kernels,  # GPU kernels per decode step (None off CUDA)
        "peak_memory_bytes": peak,
    }


class _NullTokenizer:
    """Token ids in, no text out: random-weight presets have no tokenizer worth running."""

    eos_ids: set = set()

    def stream(self, prefix):
        return self

    def step(self, token_id):
        return None

    def flush(self):
        return ""
