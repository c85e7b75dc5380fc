import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

# Triton's CPU interpreter must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

import checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bpe-tokenizer")
    checkpoints.train_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def mistral_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mistral-tokenizer")
    checkpoints.copy_mistral_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny HF-format model (two groups, seed 5) with the trained BPE tokenizer; read-only."""
    d = tmp_path_factory.mktemp("tiny-model")
    shape = checkpoints.tiny_shape()
    checkpoints.write_hf(d, shape, checkpoints.random_weights(shape, seed=5))
    checkpoints.train_tokenizer(d)
    return d


@pytest.fixture
def make_checkpoint(tmp_path, bpe_tokenizer_dir):
    """make_checkpoint(fmt, shape=None, seed=0, tokenizer_dir=None, **writer_kwargs) -> (dir, shape, sd)."""
    counter = iter(range(1000))

    def make(fmt="hf", shape=None, seed=0, tokenizer_dir=None, sd=None, D_has_hdim=False, **kw):
        shape = shape or checkpoints.tiny_shape()
        sd = sd if sd is not None else checkpoints.random_weights(shape, seed, D_has_hdim=D_has_hdim)
        out = tmp_path / f"{fmt}-{next(counter)}"
        writer = {"hf": checkpoints.write_hf, "mamba_ssm": checkpoints.write_mamba_ssm,
                  "mistral": checkpoints.write_mistral}[fmt]
        if fmt == "mamba_ssm":
            kw.setdefault("D_has_hdim", D_has_hdim)
        writer(out, shape, sd, **kw)
        for f in Path(tokenizer_dir or bpe_tokenizer_dir).iterdir():
            shutil.copy(f, out / f.name)
        return out, shape, sd

    return make


@pytest.fixture
def take_graphs(monkeypatch):
    """take_graphs(model, make_graph) -> the model's generation Runner, which then takes its
    CUDA-graph paths (a graph per batch size, the greedy graph) on this CPU:
    make_graph(model, state, greedy) builds an eager stand-in for each decode graph.
    monkeypatch.undo() ends it."""
    from mamba2_cli.generation import runner_for

    def take(model, make_graph):
        runner = runner_for(model)
        monkeypatch.setattr(runner, "make_decode_graph", make_graph)
        monkeypatch.setattr(runner, "decode_graphs", {})
        return runner
    return take
