"""GPU round 27 (session 7): the prompt's piece length, now that batch 1's scan is cut into segments.

Prefill runs a long prompt in pieces of generate.DEFAULT_PREFILL_CHUNK (4096) tokens. Round 8
found 4096, 8192 and 16384 alike; since round 26 the scan gains more from longer pieces (per
4096 tokens: 0.219 ms at L4096, 0.197 at L16384), so the 65536-token prefill is timed with each
piece length again, alternated, with its peak memory (what a 1,000,000-token prompt needs
beyond the weights grows with the piece, not the prompt).

    PYTHONPATH=src python3 benchmarks/gpu_round27.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round27.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round27.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round27.txt"
log = r7.log


def pieces_phase(model, dev, tiny):
    from mamba2_cli.generate import owned_state

    L, pieces = (256, (64, 128)) if tiny else (65536, (4096, 8192, 16384))
    ids = torch.randint(3, model.cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(4))
    state = owned_state(model, 1)
    res: dict = {}
    peak: dict = {}
    for rep in range(3):
        for piece in pieces:
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            s = r7.timed_prefill(model, ids, state, dev, chunk_tokens=piece)
            if dev.type == "cuda":
                peak[piece] = (torch.cuda.max_memory_allocated() - base) / 1e9
            res.setdefault(piece, []).append(s)
            log(f"  prefill {L} piece {piece:6d} {s:.4f} s  peak above the model {peak.get(piece, 0):.2f} GB")
    for piece, v in res.items():
        v = sorted(v)
        log(f"  summary prefill {L} piece {piece:6d} " + "/".join(f"{x:.4f}" for x in v)
            + f" median {v[len(v) // 2]:.4f} s, peak above the model {peak.get(piece, 0):.2f} GB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, model = r7.setup(27, args.tiny)
    r7.T0 = T0
    r7.run_phases([("pieces", lambda: pieces_phase(model, dev, args.tiny))])


if __name__ == "__main__":
    main()
