"""GPU round 65 (session 13): the batch-1 greedy loop one step ahead (`generate.AHEAD`).

Where the caller leaves the state to the loop (`mamba2 run` without --save-state, `mamba2
bench`), DecodeGraph's greedy form is captured a second time with its own pinned slot, and the
loop launches the step after next before it waits for the next token, so the GPU is never idle
while the host waits, reads and hands out a token. Round 57 timed a sketch of it at 4054
against 4089 µs per step. Alternated: bench_model at batch 1 (stream_generate) with the switch
on and off, and the graph's replays back to back for reference; greedy tokens compared (on,
off, and with a state the caller keeps).

    PYTHONPATH=src timeout 300 python3 benchmarks/gpu_round65.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round65.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round65.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round58 as r58  # noqa: E402
import gpu_round7 as r7  # noqa: E402

r7.LOG_NAME = "round65.txt"  # after the imports above, which set their own


def main():
    r7.round_main(65, lambda dev, tiny: [("loop", lambda: r58.loop_phase(dev, tiny, "AHEAD", "ahead"))])


if __name__ == "__main__":
    main()
