"""The harness behind `mamba2 bench`: prefill and decode speed of the path `run` uses."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from .generate import decode_one_token, peak_memory_bytes, prefill
from .model import Mamba2LM


def environment(device: torch.device) -> dict:
    """What a figure needs beside it to mean anything: hardware, versions, commit."""
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def bench_model(model: Mamba2LM, prompt_len: int, gen_len: int, batch_size: int = 1, repeats: int = 3,
                seed: int = 0, on_step=None) -> dict:
    """Median prefill and decode times over `repeats` runs after one warm-up run.

    Decode runs the same `decode_one_token` the generation loop runs, greedy, reading each
    token back to the host as streaming does.
    """
    device = model.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (batch_size, prompt_len), generator=g).to(device)
    state = model.new_state(batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill_times, decode_times = [], []
    for r in range(repeats + 1):  # run 0 is the warm-up
        state.reset()
        t0 = _now(device)
        logits = prefill(model, ids, state)
        token = logits.argmax(-1)
        token.tolist()
        t1 = _now(device)
        for _ in range(gen_len):
            logits = decode_one_token(model, token, state)
            token = logits.argmax(-1)
            token.tolist()
        t2 = _now(device)
        if r:
            prefill_times.append(t1 - t0)
            decode_times.append(t2 - t1)
        if on_step:
            on_step()
    prefill_s = statistics.median(prefill_times)
    decode_s = statistics.median(decode_times)
    return {
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "batch_size": batch_size,
        "repeats": repeats,
        "prefill_s": prefill_s,
        "prefill_tok_s": batch_size * prompt_len / prefill_s,
        "decode_ms_per_step": 1e3 * decode_s / gen_len if gen_len else None,
        "decode_tok_s": gen_len / decode_s if gen_len else None,  # per sequence
        "peak_memory_bytes": peak_memory_bytes(device),
    }
