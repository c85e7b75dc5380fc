"""CPU threads: the default against every --threads value, idle and with one core kept busy.

    PYTHONPATH=src python3 benchmarks/bench_threads.py [--hf /path/to/venv-with-transformers/bin/python]

For tiny-code (the built-in checkpoint) and a mamba2-130m-shaped random model, each in a
fresh process per thread setting: the one-shot prefill of a 1,024-token prompt (a process's
first forward, as `mamba2 run` pays it), the same prefill warm (best of the repeats), and
decode tok/s over 128 tokens. "auto" is the default (no --threads). Then the same with
another process spinning on one core. With --hf, that interpreter (transformers and torch
installed) runs HF transformers' torch path of the same 130m shape, random weights, for the
warm prefill, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = ("tiny-code", "mamba2-130m")
PROMPT = 1024
DECODE = 128


def child(model: str, threads: str, repeats: int) -> dict:
    import torch

    from mamba2_cli.cli.options import choose_threads
    from mamba2_cli.generation import prefill
    from mamba2_cli.loader import load_model, load_preset

    n = None if threads == "auto" else int(threads)
    if n:
        torch.set_num_threads(n)
    if model == "tiny-code":
        m, _ = load_model("tiny-code", "cpu", "auto", "torch")
    else:
        m, _ = load_preset(model, "cpu", "float32", "torch")
    choose_threads(m, n)
    ids = torch.randint(0, m.cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for _ in range(1 + repeats):
            state = m.new_state(1)
            t0 = time.perf_counter()
            logits = prefill(m, ids, state)
            times.append(time.perf_counter() - t0)
        tok = logits.argmax(-1).view(1, 1)
        t0 = time.perf_counter()
        for _ in range(DECODE):
            tok = m(tok, state)[:, -1].argmax(-1).view(1, 1)
        decode = DECODE / (time.perf_counter() - t0)
    return {"first_prefill_s": times[0], "warm_prefill_s": min(times[1:]), "decode_tok_s": decode}


HF_CODE = """
import json, sys, time, torch
from transformers import Mamba2Config, Mamba2ForCausalLM
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
cfg = Mamba2Config(num_heads=24, head_dim=64, vocab_size=50288, hidden_size=768, state_size=128,
                   num_hidden_layers=24, n_groups=1, expand=2, chunk_size=256, tie_word_embeddings=True)
m = Mamba2ForCausalLM(cfg).eval()
ids = torch.randint(0, 50277, (1, %d))
times = []
with torch.inference_mode():
    for _ in range(1 + int(sys.argv[2])):
        t0 = time.perf_counter(); m(ids, use_cache=False, logits_to_keep=1); times.append(time.perf_counter() - t0)
print(json.dumps({"first_prefill_s": times[0], "warm_prefill_s": min(times[1:])}))
""" % PROMPT


def run(args: list[str]) -> dict:
    r = subprocess.run(args, capture_output=True, text=True, env={**os.environ})
    if r.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="warm prefills after the first")
    ap.add_argument("--hf", metavar="PYTHON", help="an interpreter with transformers: HF's prefill beside ours")
    ap.add_argument("--conditions", default="idle,busy", help="idle, busy (one core kept spinning), or both")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.repeats)))
        return
    cores = len(os.sched_getaffinity(0))
    settings = ["auto"] + [str(n) for n in range(1, cores + 1)]
    rows = []
    for cond in a.conditions.split(","):
        spinner = None
        if cond == "busy":
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for model in MODELS:
                for t in settings:
                    r = run([sys.executable, __file__, "--repeats", str(a.repeats), "--child", model, t])
                    rows.append(dict(condition=cond, model=model, threads=t, **r))
            if a.hf:
                for t in settings[1:]:
                    r = run([a.hf, "-c", HF_CODE, t, str(a.repeats)])
                    rows.append(dict(condition=cond, model="mamba2-130m (HF transformers)", threads=t, **r,
                                     decode_tok_s=None))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    print(f"{cores} cores; prefill of {PROMPT} tokens, decode of {DECODE}")
    print(f"{'condition':<9} {'model':<30} {'threads':>7} {'first prefill':>13} {'warm prefill':>12} {'decode':>12}")
    for r in rows:
        dec = "" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:8.1f} tok/s"
        print(f"{r['condition']:<9} {r['model']:<30} {r['threads']:>7} {r['first_prefill_s']:11.2f} s "
              f"{r['warm_prefill_s']:10.2f} s {dec:>12}")


if __name__ == "__main__":
    main()
