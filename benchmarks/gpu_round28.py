"""GPU round 28 (session 7): the states-only pass of batch 1's segmented scan, in longer chunks.

Since round 26 batch 1 cuts a prompt of 2048+ tokens into 4 segments: a states-only pass over
the first three (384 programs at Codestral's shapes), then all four at once. The states pass
computes no y, so its chunk only regroups the sums: it may walk in chunks of 64 or 128 tokens
(half or a quarter of the trips) while the second pass keeps its 32. Variants of the states
pass (stages, chunk, warps, the state's orientation) against the rule's (chunk 32, 4 stages).

    PYTHONPATH=src python3 benchmarks/gpu_round28.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round28.py --tiny  # CPU: runs

Each variant is checked against the rule's result and timed twice, alternated. If one beats
the rule at b1 L16384 by more than 1.5 %, the 65536-token prefill runs with it against the
rule, alternated (round 26's model phase, at 2048 and 65536 tokens). Lines go to stdout and
$OUT/round28.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round21 as r21  # noqa: E402
import gpu_round26 as r26  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round28.txt"
log = r7.log


def variants():
    def st(**kw):
        return {"states": {"num_stages": 4, **kw}}

    return [
        ("default", {}),
        ("st q64 s2", st(CHUNK=64, num_stages=2)),
        ("st q64 s3", st(CHUNK=64, num_stages=3)),
        ("st q64 s4", st(CHUNK=64)),
        ("st q128 s2", st(CHUNK=128, num_stages=2)),
        ("st q64 s3 w8", st(CHUNK=64, num_stages=3, num_warps=8)),
        ("st q64 s3 notT", st(CHUNK=64, num_stages=3, STATE_T=False)),
        ("st s4 notT", st(STATE_T=False)),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, _ = r7.setup(28, args.tiny, load=False)
    r7.T0 = T0
    vs = variants()
    best: dict = {}
    from mamba2_cli import kernel_bench as kb

    s27 = kb.KernelShape("2.7b", 80, 64, 1, 128, 4, 256, 2560, prefill=(), decode_batches=(), decode_layers=64,
                         long_len=16384)
    if args.tiny:
        from mamba2_cli.kernels import ssd

        ssd.SCAN_CONFIG_MANY["CHUNK"] = 16  # so that the tiny shape's 256 tokens get segments
        ssd.SCAN_CONFIG["SPLIT_MIN_CHUNKS"] = 2
        groups = [(None, ((1, 256),))]
    else:
        groups = [(None, ((1, 4096), (1, 16384))), (kb.SHAPES["small"], ((1, 16384),)), (s27, ((1, 16384),))]

    def scans():
        for shape, cases in groups:
            best.update(r21.scan_phase(dev, args.tiny, vs, cases, shape))

    r7.run_phases([("scan", scans)])
    if dev.type == "cuda" and best:
        _, model = r7.setup(28, args.tiny)
        from mamba2_cli.kernels import ssd

        r7.run_phases([("model", lambda: r26.model_phase(model, dev, best, vs, ssd.SPLIT_STATES, "states"))])


if __name__ == "__main__":
    main()
