"""Prefill runs long prompts in bounded pieces: peak memory does not grow with prompt length."""

import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).parents[1] / "src")

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from mamba2_cli.checkpoint import random_model
    from mamba2_cli.config import Mamba2Config
    from mamba2_cli.generation import prefill
    cfg = Mamba2Config(d_model=256, n_layer=2, vocab_size=1000, d_state=64)
    model = random_model(cfg, torch.device("cpu"), torch.float32)
    model.set_backend("torch")
    state = model.new_state(1)
    piece = int(sys.argv[2])
    prefill(model, torch.randint(0, 1000, (1, 512)), state)  # warm-up: allocator, code pages
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids = torch.randint(0, 1000, (1, int(sys.argv[1])))
    logits = prefill(model, ids, state, chunk_tokens=piece)
    assert logits.shape == (1, 1000)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
""")


def growth(n_tokens: int, piece: int = 512) -> int:
    # An intermediate Python keeps this process's high-water mark out of the child's ru_maxrss.
    launcher = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", launcher, sys.executable, "-c", SCRIPT, str(n_tokens), str(piece)],
                         capture_output=True, text=True, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
                         check=True, timeout=600)
    return int(out.stdout.strip())


def test_peak_memory_does_not_grow_with_prompt_length():
    short, long = growth(1024), growth(16384)
    # 16x the tokens; the whole prompt at once would take ~150 MB more (checked below).
    assert long < short + 16e6, f"1024 tokens grew {short / 1e6:.0f} MB, 16384 grew {long / 1e6:.0f} MB"


def test_the_memory_check_can_fail():
    # The same measurement with the whole prompt in one piece does grow.
    assert growth(16384, piece=16384) > growth(1024, piece=16384) + 50e6
