"""Batches: prompts of any lengths generated together give what each gives alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import TEXT
from mamba2_cli import Mamba2Error, generate, load_model
from mamba2_cli.generation import Request, generate_batch, stream_batch

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "COLUMNS": "200"}
ENV.pop("CUDA_VISIBLE_DEVICES", None)

# 1 token, a few, and several hundred (many scan chunks and prefill pieces).
PROMPTS = ["x", "def fibonacci(n):", TEXT[:900]]


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load_model(str(model_dir), device="cpu", dtype="float32")


def test_greedy_batch_equals_each_prompt_alone(tiny):
    model, tok = tiny
    assert len(tok.encode(PROMPTS[2])) > 200 * len(tok.encode(PROMPTS[0]))
    results = generate_batch(model, tok, PROMPTS, max_tokens=25, prefill_chunk=64)
    for prompt, r in zip(PROMPTS, results):
        alone = generate(model, tok, prompt, max_tokens=25)
        assert r.token_ids == alone.token_ids and r.text == alone.text and len(r.token_ids) == 25


def test_sequences_that_finish_early_leave_the_others_unchanged(tiny):
    model, tok = tiny
    free = generate(model, tok, PROMPTS[1], max_tokens=30)
    requests = [
        Request(PROMPTS[0], max_tokens=3),
        Request(PROMPTS[1], max_tokens=30, stop=[free.text[8:11]]),  # cut by a stop string
        Request(PROMPTS[2], max_tokens=0),
        Request(PROMPTS[2], max_tokens=30, temperature=0.8, seed=4, top_k=20),  # its own sampler and seed
        Request(PROMPTS[0], max_tokens=17, repetition_penalty=1.3),
    ]
    got = [None] * len(requests)
    for i, event in stream_batch(model, tok, requests):
        assert got[i] is None  # nothing after a request's result
        got[i] = event.result
    for req, r in zip(requests, got):
        settings = {k: v for k, v in vars(req).items() if k != "prompt"}
        assert r.token_ids == generate(model, tok, req.prompt, **settings).token_ids
    assert got[1].finish_reason == "stop" and got[2].token_ids == [] and len(got[4].token_ids) == 17


def test_requests_are_checked_before_any_work(tiny):
    model, tok = tiny
    with pytest.raises(Mamba2Error, match="empty"):
        generate_batch(model, tok, [Request("ok"), Request("")])
    with pytest.raises(Mamba2Error, match="line 2: unknown key 'temp'"):
        Request.from_json({"prompt": "x", "temp": 1}, {}, "line 2")
    with pytest.raises(Mamba2Error, match="'max_tokens' must be int"):
        Request.from_json({"prompt": "x", "max_tokens": "5"}, {}, "line 1")


def mamba2(*args, input=None):
    return subprocess.run([sys.executable, "-m", "mamba2_cli", *args], input=input, capture_output=True,
                          env=ENV, timeout=120)


def test_cli_batch_from_lines_and_jsonl(model_dir, tiny, tmp_path):
    model, tok = tiny
    lines = [PROMPTS[2].replace("\n", " "), "x = 1", "import os"]
    p = mamba2("run", "-m", str(model_dir), "--device", "cpu", "-n", "12", "--batch", "--json",
               input="\n".join(lines).encode() + b"\n\n")
    assert p.returncode == 0, p.stderr.decode()
    rows = [json.loads(line) for line in p.stdout.decode().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["prompt"] for r in rows] == lines
    for line, r in zip(lines, rows):
        assert r["token_ids"] == generate(model, tok, line, max_tokens=12).token_ids
    text = mamba2("run", "-m", str(model_dir), "--device", "cpu", "-n", "12", "-q", "--batch",
                  input="\n".join(lines).encode())
    assert text.stdout.decode() == "".join(r["text"] + "\0\n" for r in rows)

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(o) for o in [
        {"prompt": lines[0], "max_tokens": 4},
        {"prompt": lines[1], "temperature": 0.7, "seed": 3, "stop": "\n"},
        {"prompt": lines[2]},
    ]))
    p = mamba2("run", "-m", str(model_dir), "--device", "cpu", "-n", "9", "--input", str(jsonl), "--json")
    assert p.returncode == 0, p.stderr.decode()
    rows = [json.loads(line) for line in p.stdout.decode().splitlines()]
    assert [len(r["token_ids"]) for r in rows][::2] == [4, 9] and rows[1]["seed"] == 3
    assert rows[1]["token_ids"] == generate(model, tok, lines[1], max_tokens=9, temperature=0.7, seed=3,
                                            stop=["\n"]).token_ids

    jsonl.write_text('{"prompt": "x"}\n{"prompt": "y", "tempurature": 1}\n')
    bad = mamba2("run", "-m", str(model_dir), "--input", str(jsonl))
    assert bad.returncode == 1 and b"prompts.jsonl line 2: unknown key 'tempurature'" in bad.stderr
    assert b"Traceback" not in bad.stderr


def test_padded_steps_for_cuda_graph_sizes_leave_live_sequences_unchanged(tiny, monkeypatch, take_graphs):
    # On GPUs the live sequences run in a batch of the next power of two (one CUDA graph per size);
    # here the same padding runs eagerly.
    from mamba2_cli.generation import decode_one_token

    model, tok = tiny
    sizes = []

    def make_graph(model, state, greedy=False):
        sizes.append(state.batch_size)
        return lambda tokens: decode_one_token(model, tokens, state)

    take_graphs(model, make_graph)
    lengths = [3, 20, 7, 12, 5]
    requests = [Request(PROMPTS[i % 3], max_tokens=n) for i, n in enumerate(lengths)]
    got = generate_batch(model, tok, requests)
    monkeypatch.undo()
    assert set(sizes) == {5, 4, 2, 1}
    for req, r in zip(requests, got):
        assert r.token_ids == generate(model, tok, req.prompt, max_tokens=req.max_tokens).token_ids
