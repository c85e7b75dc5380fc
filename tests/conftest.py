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
    """take_graphs(step_fn) -> the generate module, whose loop then takes its CUDA-graph paths
    (graph sizes, the greedy graph) on this CPU: _LiveRows says graphs are in use, and
    decode_step_fn is step_fn, an eager stand-in. monkeypatch.undo() ends it."""
    import importlib

    g = importlib.import_module("mamba2_cli.generate")  # the package's `generate` is the function

    def take(step_fn):
        init = g._LiveRows.__init__

        def with_graphs(self, model, state, cuda_graph):
            init(self, model, state, cuda_graph)
            self.graphs = True

        monkeypatch.setattr(g._LiveRows, "__init__", with_graphs)
        monkeypatch.setattr(g, "decode_step_fn", step_fn)
        return g
    return take
