"""GPU round 30 (session 7): where the 65536-token prefill's time goes after rounds 24-28.

CUPTI per-kernel totals (torch.profiler) of one 65536-token prefill at batch 1 with the
defaults (pieces of 8192 tokens; the scan cut into 4 segments), as round 12 did for session
4's code.

    PYTHONPATH=src python3 benchmarks/gpu_round30.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round30.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round30.txt.
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
r7.LOG_NAME = "round30.txt"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, model = r7.setup(30, args.tiny)
    r7.T0 = T0
    from mamba2_cli.generate import owned_state, prefill

    L = 256 if args.tiny else 65536
    ids = torch.randint(3, model.cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(4)).to(dev)
    state = owned_state(model, 1)

    def pf():
        state.reset()
        prefill(model, ids, state)

    def run():
        t = r7.timed_prefill(model, ids, state, dev)
        r7.log(f"  prefill {L}: {t:.4f} s (outside the profiler)")
        r7.print_times(f"prefill {L} tokens, per whole prefill (ms as us/1000)", r7.kernel_times(pf, dev, 1), top=16)

    r7.run_phases([("profile", run)])


if __name__ == "__main__":
    main()
