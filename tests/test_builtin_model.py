"""The built-in model (assets/tiny-code): what ships, what `run` does without -m, and the evaluation rules."""

import ast
import json
import sys
import textwrap
from pathlib import Path

import pytest

from test_cli import mamba2, no_traceback, ok

from mamba2_cli.config import read_config
from mamba2_cli.hub import BUILTIN, DEFAULT_MODEL, resolve_model_dir
from mamba2_cli.safetensors_format import read_header

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import eval_tiny  # noqa: E402
import tiny_corpus  # noqa: E402

ASSET = BUILTIN[DEFAULT_MODEL]


def test_shipped_files_are_a_small_fp16_mamba2_with_its_tokenizer():
    assert resolve_model_dir("tiny-code") == ASSET == resolve_model_dir("TINY-CODE")
    cfg = read_config(ASSET)
    assert cfg.format == "hf" and 3e6 <= cfg.num_parameters() <= 8e6
    files = sorted(ASSET.glob("*.safetensors"))
    assert files
    for f in files:
        assert f.stat().st_size <= 16 * 2**20
        with open(f, "rb") as fh:
            header = read_header(fh, f.stat().st_size)[0]
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        assert dtypes == {"F16"}, dtypes
    tcfg = json.loads((ASSET / "tokenizer_config.json").read_text())
    assert tcfg["bos_token"] and tcfg["eos_token"]
    card = (ASSET / "README.md").read_text()
    for needed in ("python scripts/train_tiny.py --seed", "bits per byte", "gzip -9", "PSF", "parameters"):
        assert needed in card


def _function_end(prompt: str, text: str) -> str:
    return eval_tiny.cut(prompt, text, finished=True)


def test_run_without_a_model_uses_it():
    p = ok(mamba2("run", "--device", "cpu", "-n", "24", "--json", input=b"def add(a, b):"))
    assert "built-in tiny-code" in no_traceback(p)
    out = json.loads(p.stdout)
    assert out["model"] == "tiny-code" and out["generated_tokens"] == 24 and out["text"].strip()


def test_it_completes_functions():
    """Sampled as the evaluation samples (seeded, so this is deterministic): most completions of a
    simple signature are functions with a real body."""
    import torch

    from mamba2_cli.generation import Request, generate_batch
    from mamba2_cli.loader import load_model

    m, tok = load_model("tiny-code", "cpu", "float32", "torch")
    sig = "def add(a, b):"
    reqs = [Request(sig, max_tokens=96, temperature=0.7, seed=i) for i in range(8)]
    with torch.inference_mode():
        results = generate_batch(m, tok, reqs)
    good = [eval_tiny.judge(eval_tiny.cut(sig, r.text, r.finish_reason != "length"))[1] for r in results]
    assert sum(good) >= 4, [r.text for r in results]


def test_download_says_it_is_built_in():
    p = ok(mamba2("download", "tiny-code"))
    assert p.stdout.decode().strip() == str(ASSET) and b"built into mamba2" in p.stderr


def test_models_lists_it():
    out = json.loads(ok(mamba2("models", "--json")).stdout)
    assert [b["name"] for b in out["builtin"] if b["default"]] == ["tiny-code"]


def test_committed_lists_agree():
    rows = tiny_corpus.listed()
    held = [rel for _, split, rel in rows if split == "heldout"]
    assert held == (tiny_corpus.DATA / "heldout.txt").read_text().split()
    assert len({d for d, _, _ in rows}) == len(rows)  # deduplicated
    sigs = tiny_corpus.signatures()
    assert len(sigs) == 100 and all(s["module"] in held for s in sigs)
    for s in sigs:
        ast.parse(textwrap.dedent(s["signature"]) + "\n    pass\n")


@pytest.mark.parametrize("body, parses, nontrivial", [
    ("    return a + b", True, True),
    ("    pass", True, False),
    ("    ...", True, False),
    ('    """Only a docstring."""', True, False),
    ("    raise NotImplementedError", True, False),
    ("    raise NotImplementedError('later')", True, False),
    ('    """Doc."""\n    x = 1', True, True),
    ("    raise ValueError('no')", True, True),
    ("    return (a +", False, False),
])
def test_judge(body, parses, nontrivial):
    assert eval_tiny.judge("def f(a, b):\n" + body) == (parses, nontrivial)


def test_cut_ends_the_function_where_its_block_ends():
    sig = "def f(x):"
    text = "\n        y = x\n        return y\n    def g(self):\n        pass\nclass A:\n"
    assert eval_tiny.cut(sig, text, True) == "def f(x):\n        y = x\n        return y"
    assert eval_tiny.cut(sig, text, True, strict=True).endswith("        pass")
    # out of tokens: the last, maybe partial, line goes
    assert eval_tiny.cut(sig, "\n    y = x\n    return (y +", False) == "def f(x):\n    y = x"
    # blank lines inside the body stay; a column-0 line ends it
    assert eval_tiny.cut(sig, "\n    a = 1\n\n    b = 2\nprint(f)", True) == "def f(x):\n    a = 1\n\n    b = 2"
