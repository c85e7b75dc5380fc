"""`mamba2 serve` through real clients: the official `openai` client and raw HTTP against a
server started as a subprocess with the built-in tiny-code model, compared with the same
requests generated in-process, one at a time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from mamba2_cli import generate, load_model
from mamba2_cli.chat import ChatTemplate

KEY = "test-key"
MODEL = "tiny-code"
MAX_PROMPT = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path, *args: str, key: str | None = KEY):
    """`mamba2 serve ARGS` on a free port; (process, URL) once /health says it is ready."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    env.pop("MAMBA2_API_KEY", None)
    if key:
        env["MAMBA2_API_KEY"] = key
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mamba2_cli", "serve", "--port", str(port), "--threads", "1",
                                 *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(log.read_text())
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, url = start_server(log, "-m", MODEL, "--max-batch", "8", "--max-prompt-tokens", str(MAX_PROMPT))
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local():
    torch.set_num_threads(1)
    return load_model(MODEL, device="cpu")


def alone_defaults() -> dict:
    from mamba2_cli.hub import builtin_dir
    from mamba2_cli.server.defaults import sampling_defaults

    return {**sampling_defaults(builtin_dir(MODEL)), "temperature": 0.0}


def alone(local, prompt, **kw):
    """The request's output generated in this process: greedy unless `kw` says otherwise (the
    requests here ask for temperature 0), with the other sampling defaults the server takes from
    the model's generation_config.json where the request gives none."""
    m, tok = local
    return generate(m, tok, prompt, **{**alone_defaults(), **kw})


def health(url) -> dict:
    return httpx.get(f"{url}/health").json()


def post(url, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120, **kw)


def test_model_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_as_alone(client, local):
    want = alone(local, "def fib(n):", max_tokens=24)
    r = client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=24, temperature=0)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, 24)
    assert r.usage.total_tokens == want.prompt_tokens + 24
    chunks = list(client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == want.prompt_tokens  # the same prompt again


def test_chat_as_alone(client, local):
    m, tok = local
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "sort a list"}]
    ids = ChatTemplate(tok).prompt_ids(messages)
    want = alone(local, ids, max_tokens=20, stop=ChatTemplate(tok).stop)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings(client, local):
    want = alone(local, "def add(a, b):", max_tokens=40, stop=["\n"])
    r = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=40, temperature=0, stop="\n")
    assert r.choices[0].text == want.text and "\n" not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client, local):
    kw = dict(model=MODEL, prompt="import os\n", max_tokens=24, temperature=1.0)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b != c
    assert a == alone(local, "import os\n", max_tokens=24, temperature=1.0, seed=7).text
    # The extra body fields of this tool reach the sampler.
    d = client.completions.create(seed=7, extra_body={"top_k": 1}, **kw).choices[0].text
    assert d == alone(local, "import os\n", max_tokens=24).text  # top_k 1 is greedy


def _stream_text(url, body, on_chunk=None, key=KEY) -> str:
    text = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                text.append(chunk["choices"][0]["text"])
                if on_chunk is not None:
                    on_chunk()
    return "".join(text)


class Poller:
    """Reads /health in a thread; the most sequences seen running at once."""

    def __init__(self, url):
        self.url, self.most, self.stop = url, 0, threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self):
        while not self.stop.is_set():
            self.most = max(self.most, health(self.url)["running"])
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _throughput(url, model, tokens, key=KEY) -> tuple[float, float, int]:
    """tok/s of one stream alone, of 8 at once, and the most /health saw running at once."""
    body = {"model": model, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    _stream_text(url, {**body, "prompt": "class Stack:"}, key=key)
    one = tokens / (time.perf_counter() - t0)
    with Poller(url) as poller, ThreadPoolExecutor(8) as pool:
        t0 = time.perf_counter()
        texts = list(pool.map(lambda i: _stream_text(url, {**body, "prompt": f"class Stack{i}:"}, key=key), range(8)))
        total = 8 * tokens / (time.perf_counter() - t0)
    assert all(texts)
    return one, total, poller.most


def test_batching_runs_streams_together(server):
    one, total, most = _throughput(server, MODEL, 32)
    assert most > 1


def test_batching_pays(tmp_path):
    """8 streams at once give at least twice one stream's tokens per second. On CPU a batched
    step of tiny-code costs several times a single one, and the test's own clients share the
    cores, so this runs on the tiny preset, whose step costs about the same at batch 1 and 8."""
    proc, url = start_server(tmp_path / "server.log", "--preset", "tiny", "--max-batch", "8", key=None)
    try:
        one, total, most = _throughput(url, "preset:tiny", 200, key=None)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"one stream {one:.1f} tok/s, 8 streams {total:.1f} tok/s, {most} running at once")
    assert most > 1
    assert total >= 2 * one, (one, total)


def test_32_concurrent_clients_each_as_alone(server, local):
    prompts = [(f"def f{i}(x):\n    return x {'+-*'[i % 3]} {i}\n", 4 + (i * 7) % 21) for i in range(32)]
    want = [alone(local, p, max_tokens=n).text for p, n in prompts]
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda pn: _stream_text(server, {"model": MODEL, "prompt": pn[0], "max_tokens": pn[1],
                                                             "temperature": 0}), prompts))
    assert got == want


def test_disconnect_frees_the_row(server, client):
    seen = []

    def hang_up():
        seen.append(1)
        if len(seen) == 5:
            raise ConnectionAbortedError

    with pytest.raises(ConnectionAbortedError):
        _stream_text(server, {"model": MODEL, "prompt": "while True:", "max_tokens": 100000, "ignore_eos": True},
                     hang_up)
    deadline = time.monotonic() + 20
    while health(server)["running"]:
        assert time.monotonic() < deadline, health(server)
        time.sleep(0.05)
    r = client.completions.create(model=MODEL, prompt="x = ", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_prefix_cache_exact_and_reported(client, local):
    m, tok = local
    first = tok.encode("def parse(line):\n    fields = line.split(',')\n")
    more = first + tok.encode("    return", add_bos=False)
    r1 = client.completions.create(model=MODEL, prompt=first, max_tokens=8, temperature=0)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    r2 = client.completions.create(model=MODEL, prompt=more, max_tokens=16, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens == len(first)
    assert r2.choices[0].text == alone(local, more, max_tokens=16).text


def test_chat_turn_reads_only_the_new_turn(client, local):
    m, tok = local
    template = ChatTemplate(tok)
    turn1 = [{"role": "user", "content": "print hello"}]
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=12, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "now in a loop"}]
    r2 = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=12, temperature=0)
    # The first turn's prompt and reply (all but its last token, which the state has not read) are cached.
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    ids = template.prompt_ids(turn2)
    assert r2.choices[0].message.content == alone(local, ids, max_tokens=12, stop=template.stop).text


def test_bad_input_answers_while_others_are_served(server):
    body = {"model": MODEL, "prompt": "def main():", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    background = ThreadPoolExecutor(1).submit(_stream_text, server, body)
    while not health(server)["running"]:
        time.sleep(0.02)
    ok = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = [
        (httpx.post(f"{server}/v1/completions", content=b'{"model": "tiny-code", "prompt": ', headers=headers),
         400, None),
        (post(server, "/v1/completions", {**ok, "max_tokens": "many"}), 400, "max_tokens"),
        (post(server, "/v1/completions", {**ok, "prompt": 5}), 400, "prompt"),
        (post(server, "/v1/chat/completions", {"model": MODEL, "messages": "hi"}), 400, "messages"),
        (post(server, "/v1/completions", {**ok, "temperature": -1}), 400, None),
        (post(server, "/v1/completions", {**ok, "model": "gpt-4"}), 404, "model"),
        (post(server, "/v1/completions", {**ok, "max_tokens": -1}), 400, "max_tokens"),
        (post(server, "/v1/completions", {**ok, "prompt": list(range(1, MAX_PROMPT + 2))}), 400, "prompt"),
        (post(server, "/v1/completions", ok, key="wrong"), 401, None),
        (post(server, "/v1/completions", ok, key=None), 401, None),
        (post(server, "/v1/completions", {**ok, "prompt": "x" * (9 << 20)}), 413, None),
        (post(server, "/v1/nothing", ok), 404, None),
    ]
    for r, status, param in cases:
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert error["param"] == param, error
    assert cases[7][0].json()["error"]["code"] == "context_length_exceeded"
    assert cases[8][0].json()["error"]["code"] == "invalid_api_key"
    # The openai client turns them into its exceptions.
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    good = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        good.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert health(server)["status"] == "ready"
    assert len(background.result(timeout=300)) > 0  # the stream served meanwhile ran to its end


def cli(*args, input=None, env=None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "MAMBA2_API_KEY": KEY, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mamba2_cli", *args], input=input, capture_output=True, text=True,
                          env=env, timeout=300)


def test_run_with_server_prints_the_same(server, local):
    p = cli("run", "--server", server, "-n", "20", "-t", "0", "-q", "def fib(n):")
    assert p.returncode == 0, p.stderr
    assert p.stdout == alone(local, "def fib(n):", max_tokens=20).text
    p = cli("run", "-n", "20", "-t", "0", "--json", "def fib(n):", env={"MAMBA2_SERVER": server})
    assert p.returncode == 0, p.stderr
    obj = json.loads(p.stdout)
    assert obj["text"] == alone(local, "def fib(n):", max_tokens=20).text and obj["generated_tokens"] == 20
    assert obj["cached_tokens"] == obj["prompt_tokens"]  # the first call left the prompt's state behind
    p = cli("run", "--server", server, "-m", "tiny-code", "x")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "--model" in p.stderr
    p = cli("run", "--server", server, "x", env={"MAMBA2_API_KEY": "wrong"})
    assert p.returncode == 1 and "401" in p.stderr and "Traceback" not in p.stderr


def test_chat_with_server_prints_the_same(server, local):
    from mamba2_cli.chat import ChatSession

    m, tok = local
    session = ChatSession(m, tok, max_tokens=10, repetition_penalty=alone_defaults()["repetition_penalty"])
    want = ["".join(e.text for e in session.send(t)).lstrip() for t in ("hello", "write a loop")]
    p = cli("chat", "--server", server, "-n", "10", "-t", "0", "-q", input="hello\nwrite a loop\n/stats\n")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    assert "\n".join(want) in p.stdout, (p.stdout, want)
    assert "(from the carried state)" in lines[-3] or "carried state" in p.stdout
