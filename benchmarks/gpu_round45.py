"""GPU round 45 (session 9): the decode step's state loads and stores marked evict_first, in the
model at batch 8 and 1. Round 44's profile put the batch-8 matvecs 0.5 ms per token above their
time alone, about the step's 33.5 MB of state writes per layer drained from L2 while the next
matvec streams; evicting those lines early would move that write-back into the step.

    PYTHONPATH=src timeout 400 python3 benchmarks/gpu_round45.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round45.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round45.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402

r7.LOG_NAME = "round45.txt"
log = r7.log


def model_phase(dev, tiny, batch):
    from mamba2_cli.kernels import step

    default = step.STEP_CONFIG["evict"]

    def apply(cfg):
        step.STEP_CONFIG["evict"] = bool(cfg.get("evict", default))

    r33.model_variants(dev, tiny, {"default": {}, "evict": {"evict": True}}, apply, batch=batch)


def main():
    r7.round_main(45, lambda dev, tiny: [("model b8", lambda: model_phase(dev, tiny, 8)),
                                         ("model b1", lambda: model_phase(dev, tiny, 1))])


if __name__ == "__main__":
    main()
