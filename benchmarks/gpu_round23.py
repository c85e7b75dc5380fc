"""GPU rounds 23-25 (session 7): the scan's dt-only work before the wait for B, C and C B^T;
C B^T computed in the scan instead of loaded (round 24, `--round 24`); batch 1 cut into
segments with the batch-8 configuration (round 25, `--round 25`).

Round 21 read off the TTGIR that the pipeliner waits for the chunk's B, C and C B^T copies
where they are first used, and that in the default loop body that is its first line: the
softplus of dt, its cumsum and the [CHUNK, CHUNK] decay exponentials all came after the wait.
`EARLY` (ssd.py) computes them before the first use, so they run while the copies are in
flight (TTGIR here: the async_wait moves below the decay's exp):
  EARLY 1: dt, its cumsum and the decay matrix;  2: also x o w for the state update;
  3, 4: as 1, 2 with B, C and C B^T addressed from the trip count (the copies still land at
        the end of the body: read off the TTGIR, kept to measure that it changes nothing).
Same arithmetic in the same order: the results are bit-identical to the default. Measured
slower at batch 1 (L16384 0.949-0.988 ms against 0.923) and taken out again after the round:
ssd.py at commit 4f73082 has it. `--round 23` now says so and stops; round 24's list no longer
has its "early4" row (gpu-runs/session7/round24.txt does).

Round 24: with CB_PRECOMPUTED off the scan computes C B^T itself (one more wgmma per chunk, no
pre-pass and no 16 KB copy per chunk). Then the scores come out of a product (the wgmma's
register layout) and reach the in-chunk product's register operand without the trip through
shared memory that the loaded C B^T takes (TTGIR here), and a third stage fits two programs
per SM (110.6 KB of shared memory; the default's third stage needs 143 KB). Round 1 measured
the inline C B^T 2x slower, on the first kernel; never since. Taken for SCAN_CONFIG_MANY
after the round (batch 8 L4096 1.273-1.281 ms against 1.478-1.487), so at later commits batch
8's "default" row is already the inline one.

Round 25: batch 8 runs 1024 programs of the many-programs configuration (chunk 32, P block 64,
C B^T inline) at 1.28 ms for 8 x 4096 tokens, where batch 1 runs 256 programs of its own at
0.92 ms for 16384. So batch 1 cut into segments (SEGMENTS: a states-only pass over all
segments but the last, then all at once) with that configuration: 2-16 segments at L4096 and
L16384. Round 7 cut batch 1 into segments with batch 1's own configuration (slower).

    PYTHONPATH=src python3 benchmarks/gpu_round23.py --round 24       # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round23.py --round 24 --tiny  # CPU: runs

Each variant is checked against the default and timed twice, alternated, at b1 L4096 and
L16384 and b8 L4096 (bench's inputs; batch 8 runs SCAN_CONFIG_MANY with the switch on top).
If one beats the default at b1 L16384 by more than 1.5 %, the 65536-token prefill runs with
it against the default, alternated (round 21's model phase). Lines go to stdout and
$OUT/round23.txt (round24.txt).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round21 as r21  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round23.txt"

VARIANTS = [
    ("default", {}),
    ("early1", {"EARLY": 1}),
    ("early2", {"EARLY": 2}),
    ("early3", {"EARLY": 3}),
    ("early4", {"EARLY": 4}),
]
VARIANTS_24 = [
    ("default", {}),
    ("cbi", {"CB_PRECOMPUTED": False}),
    ("cbi s3", {"CB_PRECOMPUTED": False, "num_stages": 3}),
    # ran also: "cbi early1", "cbi early1 s3" and "early4" (EARLY, taken out since)
]


def variants_25():
    from mamba2_cli.kernels import ssd

    many = dict(ssd.SCAN_CONFIG_MANY)
    out = [("default", {}), ("many", many)]
    out += [(f"many seg{k}", {**many, "SEGMENTS": k}) for k in (2, 4, 8, 16)]
    out += [(f"many seg{k} s3", {**many, "SEGMENTS": k, "states": {"num_stages": 3}}) for k in (4, 8)]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--round", type=int, default=24, choices=(23, 24, 25))
    args = ap.parse_args()
    if args.round == 23:
        print("round 23's EARLY switch was taken out of ssd.py after the round (commit 4f73082 has it)")
        return
    variants = VARIANTS_24 if args.round == 24 else variants_25()
    r7.LOG_NAME = f"round{args.round}.txt"
    dev, _ = r7.setup(args.round, args.tiny, load=False)
    r7.T0 = T0
    cases = ((1, 256), (2, 128)) if args.tiny else ((1, 4096), (1, 16384), (8, 4096))
    if args.round == 25:
        cases = ((1, 256),) if args.tiny else ((1, 4096), (1, 16384))
    out = {}
    r7.run_phases([("scan", lambda: out.setdefault("best", r21.scan_phase(dev, args.tiny, variants, cases)))])
    if dev.type == "cuda" and out.get("best"):
        _, model = r7.setup(args.round, args.tiny)
        r7.run_phases([("model", lambda: r21.model_phase(model, dev, out["best"], 0.985, variants))])


if __name__ == "__main__":
    main()
