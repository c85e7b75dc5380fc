"""GPU round 31 (session 7): the many-programs scan's own configuration, now that it computes C B^T.

SCAN_CONFIG_MANY (chunk 32, P block 64, 4 warps, 3 stages, S [P, N]) was chosen in round 3 with
C B^T from the pre-pass; since round 24 it computes C B^T itself, and since round 26 it also
runs batch 1's segmented prompts (the main pass: 512 programs). Compiled here for sm_90
(Triton 3.9's ptxas) it holds 255 registers and spills 248 bytes, so two programs share an
SM, not four. Variants of chunk, P block, stages, warps and the state's orientation at b1
L4096 / L16384 (segmented; its states pass kept at the rule's chunk 32) and b8 L4096.

    PYTHONPATH=src python3 benchmarks/gpu_round31.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round31.py --tiny  # CPU: runs

Each variant is checked against the default and timed twice, alternated. Lines go to stdout
and $OUT/round31.txt.
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
r7.LOG_NAME = "round31.txt"


def variants():
    from mamba2_cli.kernels import ssd

    st = {"states": {**ssd.SPLIT_STATES, "CHUNK": 32}}
    td = {"STATE_T": True, "D_IN_SCORES": True}
    return [
        ("default", {}),
        ("q64 p64 s2", {"CHUNK": 64, "num_stages": 2, **st}),
        ("q64 p64 s2 T", {"CHUNK": 64, "num_stages": 2, **td, **st}),
        ("q32 p32 s3", {"BLOCK_P": 32, **st}),
        ("q32 p64 s3 T", {**td, **st}),
        ("q64 p32 s2 T", {"CHUNK": 64, "BLOCK_P": 32, "num_stages": 2, **td, **st}),
        ("q32 p64 s3 w8", {"num_warps": 8, **st}),
        ("q32 p64 s2", {"num_stages": 2, **st}),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, _ = r7.setup(31, args.tiny, load=False)
    r7.T0 = T0
    cases = ((2, 128),) if args.tiny else ((1, 4096), (1, 16384), (8, 4096))
    r7.run_phases([("scan", lambda: r21.scan_phase(dev, args.tiny, variants(), cases))])


if __name__ == "__main__":
    main()
