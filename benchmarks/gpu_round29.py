"""GPU round 29 (session 7): the prefill before and after this session's scan changes, in one run.

Each H200 call of this session ran the same code up to ~2 % apart (the 65536-token prefill
1.742-1.778 s with unchanged kernels), so the session's change is measured alternated in one
process: "before" restores session 6's choices through their switches (SCAN_CONFIG for
every batch below 512 programs, never cut into segments, C B^T from the pre-pass, pieces of
4096 tokens); "after" is the tree as it is (rounds 24-28). Prompts of 2048 and 65536 tokens at
batch 1, and 4096 tokens at batch 8 (prefill only).

    PYTHONPATH=src python3 benchmarks/gpu_round29.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round29.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round29.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round29.txt"
log = r7.log


@contextlib.contextmanager
def before():
    """Session 6's scan choices, through the switches that replaced them."""
    from mamba2_cli.kernels import ssd

    saved = (ssd.MANY_PROGRAMS, ssd.SPLIT_MIN_SEGMENTS, ssd.SCAN_CONFIG_MANY["CB_PRECOMPUTED"])
    ssd.MANY_PROGRAMS, ssd.SPLIT_MIN_SEGMENTS, ssd.SCAN_CONFIG_MANY["CB_PRECOMPUTED"] = 512, 1 << 30, True
    try:
        yield 4096
    finally:
        ssd.MANY_PROGRAMS, ssd.SPLIT_MIN_SEGMENTS, ssd.SCAN_CONFIG_MANY["CB_PRECOMPUTED"] = saved


@contextlib.contextmanager
def after():
    from mamba2_cli.generate import DEFAULT_PREFILL_CHUNK

    yield DEFAULT_PREFILL_CHUNK


def alternated_prefill(model, dev, cases, variants, compare_logits=False, reps=4):
    """Each (batch, L) case's prefill under each (label, context manager) variant, alternated,
    `reps` rounds of which the first (it compiles) is not counted; a context may yield the piece
    length (None: the default). compare_logits: the last logits of each variant against the
    first's, from the first round."""
    from mamba2_cli.generate import DEFAULT_PREFILL_CHUNK, owned_state, prefill

    for b, L in cases:
        ids = torch.randint(3, model.cfg.vocab_size, (b, L), generator=torch.Generator().manual_seed(4))
        state = owned_state(model, b)
        res: dict = {}
        logits: dict = {}
        for rep in range(reps):
            for label, ctx in variants:
                with ctx() as piece:
                    piece = piece or DEFAULT_PREFILL_CHUNK
                    s = r7.timed_prefill(model, ids, state, dev, chunk_tokens=piece)
                    if compare_logits and rep == 0:
                        state.reset()
                        logits[label] = prefill(model, ids, state, piece).float()
                if rep:
                    res.setdefault(label, []).append(s)
                log(f"  prefill b{b} L{L} {label:7s} {s:.4f} s")
        first = variants[0][0]
        for label, lg in logits.items():
            if label != first:
                err = (lg - logits[first]).norm() / logits[first].norm()
                log(f"  prefill b{b} L{L} logits {label} against {first}: {err.item():.1e}")
        for label, v in res.items():
            v = sorted(v)
            log(f"  summary prefill b{b} L{L} {label:7s} " + "/".join(f"{x:.4f}" for x in v)
                + f" median {v[len(v) // 2]:.4f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, model = r7.setup(29, args.tiny)
    r7.T0 = T0
    cases = ((1, 256), (2, 128)) if args.tiny else ((1, 2048), (1, 65536), (8, 4096))
    r7.run_phases([("prefill", lambda: alternated_prefill(model, dev, cases, (("before", before),
                                                                              ("after", after))))])


if __name__ == "__main__":
    main()
