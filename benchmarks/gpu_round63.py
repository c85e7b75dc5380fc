"""GPU round 63 (session 13): batch 8's bc_pre kernel under PDL (`STEP_CONFIG["bc_pdl"]`).

From 8 rows the step starts with bc_pre, a small kernel that convolves each group's B and C
once. It was a plain launch: it starts once in_proj has completed, and the step's kernel after
it (under PDL) launches only then, so that kernel's programs load their settled state after
in_proj, not in its tail as batch 1's do. With bc_pdl, bc_pre launches under PDL and lets the
step's kernel launch at once. Also timed: batch 8 without bc_pre (the step's kernel then
follows in_proj directly, with the conv loads before the wait too).

The step per layer at batch 8 (graphs of 64 layers, as `mamba2 bench` times it; round 55's step
phase) and the batch-8 decode graph's replays, each variant its own graph (round 59's).

    PYTHONPATH=src timeout 400 python3 benchmarks/gpu_round63.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round63.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round63.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round55 as r55  # noqa: E402
import gpu_round59 as r59  # noqa: E402

r7.LOG_NAME = "round63.txt"  # after the imports above, which set their own

STEP = {"bc plain": {}, "bc pdl": {"bc_pdl": True}, "no bc_pre": {"bc_pre": False}, "bc plain (2)": {}}


def _batch_cfg(over):
    """From 8 rows STEP_BATCH_CONFIG's entry decides; bc_pdl is a STEP_CONFIG key."""
    from mamba2_cli.kernels import step

    rest = {k: v for k, v in over.items() if k != "bc_pdl"}

    def apply():
        step.STEP_CONFIG["bc_pdl"] = over.get("bc_pdl", False)
        step.STEP_BATCH_CONFIG[:] = [(m, {**c, **rest}) if m == 8 else (m, c) for m, c in step.STEP_BATCH_CONFIG]
    return apply


def main():
    b8 = {name: _batch_cfg(over) for name, over in STEP.items()}
    r7.round_main(63, lambda dev, tiny: [("step b8", lambda: r55.step_phase(dev, tiny, 8, STEP)),
                                         ("decode b8", lambda: r59.replay_phase(dev, tiny, 8, b8))])


if __name__ == "__main__":
    main()
