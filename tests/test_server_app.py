"""The server's pieces in-process: loading and queue-full answers through the app, the
prefix cache's rules, the sampling defaults."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from starlette.testclient import TestClient

from mamba2_cli.errors import Mamba2Error
from mamba2_cli.loader import load_preset
from mamba2_cli.server.app import create_app
from mamba2_cli.server.defaults import sampling_defaults
from mamba2_cli.server.prefix_cache import PrefixCache
from mamba2_cli.server.scheduler import Scheduler

BODY = {"model": "m", "prompt": "hi", "max_tokens": 2}


def _wait(scheduler, status):
    deadline = time.monotonic() + 60
    while scheduler.status != status:
        assert time.monotonic() < deadline, scheduler.health()
        time.sleep(0.01)


def test_loading_answers_503_then_serves():
    go = threading.Event()

    def load():
        go.wait(30)
        return load_preset("tiny", "cpu", "float32")

    scheduler = Scheduler(load, max_batch=2, max_queue=4, cache_bytes=0)
    scheduler.start()
    try:
        with TestClient(create_app(scheduler, "m")) as http:
            r = http.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = http.post("/v1/completions", json=BODY)
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
            assert http.get("/v1/models").json()["data"][0]["id"] == "m"
            go.set()
            _wait(scheduler, "ready")
            r = http.post("/v1/completions", json=BODY)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
            assert http.get("/health").json()["running"] == 0
    finally:
        scheduler.stop()


def test_failed_load_is_reported():
    def load():
        raise Mamba2Error("no such model")

    failures = []
    scheduler = Scheduler(load, max_batch=2, max_queue=4, cache_bytes=0)
    scheduler.on_failure = failures.append
    scheduler.start()
    _wait(scheduler, "failed")
    assert failures == ["no such model"]
    with TestClient(create_app(scheduler, "m")) as http:
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["error"] == "no such model"
        assert http.post("/v1/completions", json=BODY).status_code == 503


def test_full_queue_answers_429():
    scheduler = Scheduler(lambda: load_preset("tiny", "cpu", "float32"), max_batch=2, max_queue=0, cache_bytes=0)
    scheduler.start()
    try:
        _wait(scheduler, "ready")
        with TestClient(create_app(scheduler, "m")) as http:
            r = http.post("/v1/completions", json=BODY)
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        scheduler.stop()


def _state(value: float):
    from mamba2_cli.state import Mamba2State

    return Mamba2State(torch.full((2, 1, 3, 3), value), torch.full((2, 1, 4, 2, 2), value))


def test_prefix_cache_longest_prefix_exact_match_and_budget():
    one = _state(0).nbytes()
    cache = PrefixCache(torch.device("cpu"), budget_bytes=2 * one + 100)
    cache.put([1, 2], _state(1))
    cache.put([1, 2, 3, 4], _state(2), logits=torch.zeros(1, 10))
    n, entry = cache.lookup([1, 2, 3, 4, 5])
    assert n == 4 and entry.ssm[0, 0, 0, 0, 0] == 2
    n, entry = cache.lookup([1, 2, 3, 4])  # exactly a key: it has logits, so it serves
    assert n == 4
    n, entry = cache.lookup([1, 2, 3])
    assert n == 2 and entry.ssm[0, 0, 0, 0, 0] == 1
    assert cache.lookup([1, 2]) is None  # exactly a key without logits: the next token is unknown
    assert cache.lookup([2, 1]) is None
    cache.put([7], _state(3), logits=torch.zeros(1, 10))  # over the budget: the least recently used goes
    assert cache.stats()["entries"] == 2 and cache.stats()["bytes"] <= cache.budget
    assert cache.lookup([7, 7])[0] == 1 and cache.lookup([1, 2, 9])[0] == 2  # [1, 2] was used last
    assert cache.lookup([1, 2, 3, 4, 5])[0] == 2


def test_prefix_cache_off():
    cache = PrefixCache(torch.device("cpu"), budget_bytes=0)
    cache.put([1, 2], _state(1))
    assert cache.lookup([1, 2, 3]) is None and cache.stats()["entries"] == 0


def test_sampling_defaults(tmp_path):
    assert sampling_defaults(None) == {"temperature": 1.0, "top_p": 1.0}
    assert sampling_defaults(tmp_path) == {"temperature": 1.0, "top_p": 1.0}
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.7, "top_k": 40, "eos_token_id": 2}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.7, "top_k": 40}
    # As transformers reads it: without do_sample, greedy (the penalty still applies).
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "repetition_penalty": 1.1}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.0, "repetition_penalty": 1.1}


def _run_jobs(scheduler, requests, keep_reply=False):
    """The results of `requests` submitted at once to a running scheduler."""
    import asyncio

    from mamba2_cli.server.scheduler import Job

    async def main():
        loop = asyncio.get_running_loop()
        jobs = []
        for r in requests:
            r.prompt = scheduler.prompt_ids(r)
            jobs.append(Job(r, keep_reply, loop))
            scheduler.submit(jobs[-1])
        results = []
        for job in jobs:
            while (event := await job.queue.get()).result is None:
                pass
            results.append((event.result, job.cached_tokens))
        return results

    return asyncio.run(main())


def test_scheduler_graph_buckets_give_each_request_its_tokens_alone(take_graphs):
    """On the CUDA-graph path (eager stand-ins here) the step runs a power-of-two bucket of
    rows; the rows past the running ones are spare, and a request's greedy tokens are its own."""
    from mamba2_cli.generation import Request, generate
    from mamba2_cli.generation.steppers import decode_one_token

    model, tok = load_preset("tiny", "cpu", "float32")
    sizes = []

    def make_graph(m, state, greedy):
        sizes.append(state.batch_size)
        return lambda tokens: decode_one_token(m, tokens, state)

    take_graphs(model, make_graph)
    scheduler = Scheduler(lambda: (model, tok), max_batch=4, max_queue=16, cache_bytes=10**8)
    scheduler.start()
    try:
        _wait(scheduler, "ready")
        assert sorted(sizes) == [1, 2, 4]  # captured before serving
        prompts = [[(7 * i + j) % 200 + 1 for j in range(3 + i)] for i in range(6)]
        lengths = [9, 3, 14, 6, 1, 11]
        got = _run_jobs(scheduler, [Request(p, max_tokens=n, ignore_eos=True) for p, n in zip(prompts, lengths)])
        assert scheduler.peak_running == 4
        for p, n, (result, cached) in zip(prompts, lengths, got):
            alone = generate(model, tok, p, max_tokens=n, ignore_eos=True, cuda_graph=False)
            assert result.token_ids == alone.token_ids
            assert cached == 0
        # The same prompts again: every state comes from the cache, the tokens stay the same.
        again = _run_jobs(scheduler, [Request(p, max_tokens=n, ignore_eos=True) for p, n in zip(prompts, lengths)])
        assert [r.token_ids for r, _ in again] == [r.token_ids for r, _ in got]
        assert [c for _, c in again] == [len(p) for p in prompts]
        # A chat turn keeps its reply's state: prompt + reply + more continues from it.
        (first, _), = _run_jobs(scheduler, [Request([5, 6, 7], max_tokens=6, ignore_eos=True)], keep_reply=True)
        longer = [5, 6, 7] + first.token_ids + [9, 9]
        (second, cached), = _run_jobs(scheduler, [Request(longer, max_tokens=5, ignore_eos=True)])
        assert cached == 3 + 6  # the prompt and the whole reply
        alone = generate(model, tok, longer, max_tokens=5, ignore_eos=True, cuda_graph=False)
        assert second.token_ids == alone.token_ids
    finally:
        scheduler.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scheduler_on_the_gpu_gives_each_request_its_tokens_alone():
    """Real decode graphs, the next step launched before the host reads the sampled tokens
    (from their pinned copy): every request's greedy tokens are still its own."""
    from mamba2_cli.generation import Request, generate

    model, tok = load_preset("tiny", "cuda", "float32")
    scheduler = Scheduler(lambda: (model, tok), max_batch=4, max_queue=16, cache_bytes=10**8)
    scheduler.start()
    try:
        _wait(scheduler, "ready")
        prompts = [[(5 * i + j) % 200 + 1 for j in range(2 + 3 * i)] for i in range(7)]
        lengths = [17, 4, 30, 9, 1, 22, 12]
        got = _run_jobs(scheduler, [Request(p, max_tokens=n, ignore_eos=True) for p, n in zip(prompts, lengths)])
        assert scheduler.peak_running == 4
        for p, n, (result, _) in zip(prompts, lengths, got):
            assert result.token_ids == generate(model, tok, p, max_tokens=n, ignore_eos=True).token_ids
    finally:
        scheduler.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefix_cache_spills_to_host_and_back():
    from mamba2_cli.state import Mamba2State

    dev = torch.device("cuda")
    states = [Mamba2State(torch.randn(2, 1, 64, 3, device=dev), torch.randn(2, 1, 8, 16, 16, device=dev))
              for _ in range(4)]
    cache = PrefixCache(dev, budget_bytes=2 * states[0].nbytes() + 100)
    for i, s in enumerate(states):
        cache.put([i, i], s)
    stats = cache.stats()
    assert stats["entries"] == 4 and stats["host_bytes"] == 2 * states[0].nbytes()
    for i, s in enumerate(states):  # the spilled ones come back to the device, equal
        n, entry = cache.lookup([i, i, 9])
        assert n == 2 and entry.conv.device.type == "cuda"
        assert torch.equal(entry.conv, s.conv) and torch.equal(entry.ssm, s.ssm)
