"""Saved state vs full prefill: how fast a long prompt resumes from a state file.

The figure: Codestral shape on one H200, model loaded, a 100,000-token prompt. Loading its
saved state and producing the first new token should take under 0.2 s, against the full
prefill it replaces.

    PYTHONPATH=src python benchmarks/bench_state.py --preset codestral-7b --tokens 100000
    PYTHONPATH=src python benchmarks/bench_state.py --preset tiny --tokens 300 --device cpu --json

Both sides run the library's own path: stream_generate until its first token, from a fresh
state (full prefill) or from load_state into a preallocated state (resume; the state file
holds all but the prompt's last token, which the resume feeds). Random weights: speed does
not depend on the values. The state file sits in the page cache after it is written;
--cold asks the kernel to drop its cached pages first (posix_fadvise), as after a reboot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mamba2_cli import load_preset, stream_generate  # noqa: E402
from mamba2_cli.bench import environment  # noqa: E402
from mamba2_cli.generation import prefill  # noqa: E402
from mamba2_cli.statefile import load_state, model_fingerprint, save_state  # noqa: E402


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def first_token(model, tokenizer, prompt, state, last_token=None) -> int:
    events = stream_generate(model, tokenizer, prompt, max_tokens=1, state=state, last_token=last_token,
                             ignore_eos=True)
    return next(e.token_id for e in events if e.token_id is not None)


def drop_page_cache(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="codestral-7b")
    ap.add_argument("--tokens", type=int, default=100_000, help="prompt length")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeats", type=int, default=5, help="resume runs (the median is reported)")
    ap.add_argument("--dir", default=None, help="where to write the state file (default: a temp dir)")
    ap.add_argument("--cold", action="store_true", help="drop the file's cached pages before each resume")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    model, tok = load_preset(args.preset, args.device, args.dtype, args.backend)
    device = model.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.cfg.vocab_size, (args.tokens,), generator=g).tolist()

    # Warm-up: kernels compiled and autotuned on a short prompt, outside every clock.
    first_token(model, tok, ids[: min(len(ids), 512)], model.new_state(1))

    fp = []
    for _ in range(3):
        t = _now(device)
        model_fingerprint(model)
        fp.append(_now(device) - t)

    state = model.new_state(1)
    t = _now(device)
    want = first_token(model, tok, ids, state)
    full_s = _now(device) - t

    # The state file: everything but the prompt's last token (a resume feeds that one).
    state.reset()
    with torch.inference_mode():
        if len(ids) > 1:
            prefill(model, torch.tensor([ids[:-1]], device=device), state)
    tmp = None if args.dir else tempfile.TemporaryDirectory()
    path = Path(args.dir or tmp.name) / f"{args.preset}-{args.tokens}.mamba2-state"
    t = _now(device)
    save_state(path, model, state, len(ids), ids[-1], model_name=f"preset:{args.preset}")
    save_s = _now(device) - t

    target = model.new_state(1)  # preallocated, as in a running server or chat
    runs, runs_unverified, load_only, cold_ok = [], [], [], True
    for verify in (True, False):
        for _ in range(args.repeats):
            if args.cold:
                cold_ok = drop_page_cache(path) and cold_ok
            t = _now(device)
            saved = load_state(path, model, into=target, verify=verify)
            t_loaded = _now(device)
            got = first_token(model, tok, None, saved.state, last_token=saved.last_token)
            t_end = _now(device)
            if got != want:
                raise SystemExit(f"resumed first token {got} != full prefill's {want}")
            (runs if verify else runs_unverified).append(t_end - t)
            if verify:
                load_only.append(t_loaded - t)

    result = {
        "preset": args.preset, "tokens": args.tokens, "dtype": str(model.dtype).removeprefix("torch."),
        "backend": model.backend_name, "state_file_bytes": path.stat().st_size,
        "full_prefill_first_token_s": full_s,
        "resume_first_token_s": statistics.median(runs),
        "resume_first_token_unverified_s": statistics.median(runs_unverified),
        "load_state_s": statistics.median(load_only),
        "save_state_s": save_s,
        "fingerprint_s": statistics.median(fp),
        "speedup": full_s / statistics.median(runs),
        "cold": args.cold and cold_ok,
        "environment": environment(device),
    }
    if tmp is not None:
        tmp.cleanup()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        mb = result["state_file_bytes"] / 2**20
        print(f"{args.preset}, {args.tokens:,}-token prompt, {result['dtype']}, {result['backend']} on "
              f"{result['environment']['device']}")
        print(f"  full prefill to first token      {full_s:9.3f} s")
        print(f"  load state + first token          {result['resume_first_token_s']:9.3f} s "
              f"(median of {args.repeats}{', cold page cache' if result['cold'] else ''}; "
              f"without checksums {result['resume_first_token_unverified_s']:.3f} s)")
        print(f"    of which load_state             {result['load_state_s']:9.3f} s  ({mb:,.1f} MiB file)")
        print(f"  save state                        {save_s:9.3f} s")
        print(f"  model fingerprint                 {result['fingerprint_s']:9.3f} s")
        print(f"  speedup                           {result['speedup']:9.1f}x")
    return result


if __name__ == "__main__":
    main()
