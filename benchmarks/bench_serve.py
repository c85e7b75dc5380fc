"""`mamba2 serve` under load, over HTTP: aggregate decode throughput with N concurrent streams,
time to first token under that load, a chat resent whole each turn, and the server's
overhead over the in-process loop at one stream.

    PYTHONPATH=src python3 benchmarks/bench_serve.py --preset codestral-7b --dtype bfloat16

starts `mamba2 serve` (random weights of the preset's shape, or -m MODEL) on a free port,
drives it with one client thread per stream (the standard library's HTTP, so the clients
need nothing installed), prints one JSON line per figure, and stops it. Prompts are random
token ids (no two streams share a prefix, so the prefix cache does not help them); each
stream generates exactly --max-tokens tokens (ignore_eos). The in-process figure runs after
the server has stopped, in a process of its own, on prompts of the same length; both
one-stream figures are the best of four requests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, path: str, body: dict, text: bool = False) -> dict:
    """POST a streaming request; the times of its first and last token lines, its usage, and
    (text=True) its text."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    t0 = time.perf_counter()
    conn.request("POST", path, json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"{path}: {r.status} {r.read()[:300]!r}")
    t_first = t_last = None
    usage = None
    pieces = []
    for line in r:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        if b'"usage":{' in line:
            usage = json.loads(line[6:])["usage"]
            continue
        if b'"role":"assistant"' in line:  # the chat stream's opening line carries no token
            continue
        t_last = time.perf_counter()
        t_first = t_first or t_last
        if text:
            for choice in json.loads(line[6:])["choices"]:
                pieces.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    conn.close()
    return {"t0": t0, "t_first": t_first, "t_last": t_last, "usage": usage, "text": "".join(pieces)}


def concurrent(port: int, bodies: list[dict], path: str = "/v1/completions") -> list[dict]:
    results = [None] * len(bodies)

    def one(i):
        results[i] = request(port, path, bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def health(port: int) -> dict | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        body = json.loads(conn.getresponse().read())
        conn.close()
        return body
    except (OSError, ValueError):
        return None


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="codestral-7b", help="random-weight shape (mamba2 bench's presets)")
    ap.add_argument("-m", "--model", help="a checkpoint instead of --preset")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="CPU threads for torch, in the server and the in-process run")
    ap.add_argument("--streams", default="1,32,64", help="concurrent streams, one measurement each")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--chat-turns", type=int, default=20, help="0 skips the chat")
    ap.add_argument("--chat-user-tokens", type=int, default=100)
    ap.add_argument("--chat-reply-tokens", type=int, default=128)
    ap.add_argument("--no-in-process", action="store_true", help="skip the in-process baseline")
    ap.add_argument("--serve-args", default="", help="more flags for mamba2 serve")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    source = ["-m", args.model] if args.model else ["--preset", args.preset]
    name = args.model or f"preset:{args.preset}"
    rng = random.Random(0)

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "mamba2_cli", "serve", *source, "--dtype", args.dtype, "--device", args.device,
           "--port", str(port), "--max-batch", str(max(streams)), "-q", *args.serve_args.split()]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t_start = time.perf_counter()
    server = subprocess.Popen(cmd, env=env)
    try:
        while (h := health(port)) is None or h["status"] == "loading":
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode})")
            time.sleep(0.5)
        if h["status"] != "ready":
            raise SystemExit(f"the server failed: {h}")
        print(json.dumps({"figure": "startup", "model": name, "ready_s": round(time.perf_counter() - t_start, 1),
                          "command": " ".join(cmd[1:])}), flush=True)

        def prompt(n):
            return [rng.randrange(1, 256) for _ in range(n)]

        base = {"model": name, "temperature": 0, "ignore_eos": True}
        # Warm-up: every prefill bucket and decode batch size the runs below use.
        concurrent(port, [{**base, "prompt": prompt(args.prompt_tokens), "max_tokens": 4}
                          for _ in range(max(streams))])
        for n in streams:
            bodies = [{**base, "prompt": prompt(args.prompt_tokens), "max_tokens": args.max_tokens} for _ in range(n)]
            t0 = time.perf_counter()
            rs = concurrent(port, bodies)
            wall = time.perf_counter() - t0
            tokens = sum(r["usage"]["completion_tokens"] for r in rs)
            ttft = [r["t_first"] - r["t0"] for r in rs]
            # Each stream's decode rate from its first token to its last; their sum is the
            # aggregate decode rate (the wall-clock figure also holds the prefills).
            decode = [(r["usage"]["completion_tokens"] - 1) / (r["t_last"] - r["t_first"]) for r in rs]
            print(json.dumps({
                "figure": "throughput", "streams": n, "prompt_tokens": args.prompt_tokens,
                "max_tokens": args.max_tokens, "tokens": tokens, "wall_s": round(wall, 3),
                "aggregate_tok_s": round(tokens / wall, 1), "decode_tok_s_sum": round(sum(decode), 1),
                "per_stream_decode_tok_s_p50": round(statistics.median(decode), 1),
                "ttft_ms_p50": round(1e3 * pct(ttft, 0.5), 1), "ttft_ms_p99": round(1e3 * pct(ttft, 0.99), 1),
            }), flush=True)

        if args.chat_turns:
            def user_message():
                return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz     ") for _ in range(args.chat_user_tokens))

            # Warm-up: the template's first render and the buckets a first turn uses.
            for _ in range(2):
                request(port, "/v1/chat/completions", {**base, "max_tokens": args.chat_reply_tokens,
                                                       "messages": [{"role": "user", "content": user_message()}]})
            messages, ttfts, cached = [], [], []
            for _ in range(args.chat_turns):
                messages.append({"role": "user", "content": user_message()})
                body = {**base, "messages": list(messages), "max_tokens": args.chat_reply_tokens}
                r = request(port, "/v1/chat/completions", body, text=True)
                ttfts.append(r["t_first"] - r["t0"])
                cached.append(r["usage"]["prompt_tokens_details"]["cached_tokens"])
                # The reply as the client saw it, resent whole next turn. (A random-weight
                # preset's reply is mostly ids its byte-level tokenizer cannot print, so its
                # text is short; a checkpoint's reply is resent in full.)
                messages.append({"role": "assistant", "content": r["text"]})
                last_prompt = r["usage"]["prompt_tokens"]
            print(json.dumps({
                "figure": "chat", "turns": args.chat_turns, "ttft_ms_first": round(1e3 * ttfts[0], 1),
                "ttft_ms_last": round(1e3 * ttfts[-1], 1), "ttft_ratio": round(ttfts[-1] / ttfts[0], 3),
                "last_prompt_tokens": last_prompt, "last_cached_tokens": cached[-1],
                "ttft_ms": [round(1e3 * t, 1) for t in ttfts],
            }), flush=True)

        server_tok_s = 0.0  # best of four, as the in-process figure
        for _ in range(4):
            one = request(port, "/v1/completions", {**base, "prompt": prompt(args.prompt_tokens),
                                                    "max_tokens": args.max_tokens})
            server_tok_s = max(server_tok_s, (one["usage"]["completion_tokens"] - 1) / (one["t_last"] - one["t_first"]))
    finally:
        server.terminate()
        server.wait(timeout=60)

    if not args.no_in_process:
        code = IN_PROCESS.format(model=repr(args.model), preset=repr(args.preset), dtype=repr(args.dtype),
                                 device=repr(args.device), threads=args.threads or 0, n=args.prompt_tokens,
                                 max_tokens=args.max_tokens)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        local = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps({"figure": "overhead_one_stream", "server_decode_tok_s": round(server_tok_s, 1),
                          "in_process_decode_tok_s": round(local["decode_tok_s"], 1),
                          "overhead_pct": round(100 * (1 - server_tok_s / local["decode_tok_s"]), 2)}), flush=True)


# The in-process loop on the same shape, a random prompt of the same length, best of three.
IN_PROCESS = """
import json, random
import torch
from mamba2_cli import generate, load_model, load_preset
if {threads}:
    torch.set_num_threads({threads})
model, dtype, device = {model}, {dtype}, {device}
m, tok = load_model(model, device, dtype) if model else load_preset({preset}, device, dtype)
rng = random.Random(1)
best = 0.0
for _ in range(4):
    ids = [rng.randrange(1, 256) for _ in range({n})]
    r = generate(m, tok, ids, max_tokens={max_tokens}, ignore_eos=True)
    best = max(best, r.stats["decode_tok_s"])
print(json.dumps({{"decode_tok_s": best}}))
"""


if __name__ == "__main__":
    main()
