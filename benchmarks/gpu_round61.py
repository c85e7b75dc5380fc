"""GPU round 61 (prepared in session 12, not yet run): the fused step under PDL with a settled state.

The fused form (`STEP_CONFIG["split"] = False`: the group's last program normalizes it, one
launch) was last timed under PDL in round 46, before the state and the conv could be loaded
before the wait (`state_settled`, round 49; `conv_early`, round 55): 8.97 against 8.34 µs per
layer without PDL. The split form under PDL took over at 6.31-6.39 µs. Here the fused form gets
both early loads, which it takes already (PDL_STATE and CONV_EARLY do not depend on the form).
Config only, no code: the step per layer at batch 1 and 8 (graphs of 64 layers, as `mamba2
bench` times it; round 55's step phase) and the decode graph's replays, each variant its own
graph (round 59's replay phase).

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round61.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round61.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round61.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round55 as r55  # noqa: E402
import gpu_round59 as r59  # noqa: E402

r7.LOG_NAME = "round61.txt"  # after the imports above, which set their own

STEP = {"split pdl": {}, "fused pdl": {"split": False}, "fused": {"split": False, "pdl": False}}
# batch 1 also at the fused form's other layouts (it holds 128 registers at p16 w4)
STEP_B1 = {**STEP, "fused pdl p16 w2": {"split": False, "num_warps": 2},
           "fused pdl p8 w2": {"split": False, "BLOCK_P": 8, "num_warps": 2},
           "fused pdl p32 w4": {"split": False, "BLOCK_P": 32}}


def _cfg(over):
    from mamba2_cli.kernels import step

    return lambda: step.STEP_CONFIG.update(over)


def _batch_cfg(over):
    """From 8 rows STEP_BATCH_CONFIG's entry decides the form: change that entry."""
    from mamba2_cli.kernels import step

    def apply():
        step.STEP_BATCH_CONFIG[:] = [(m, {**c, **over}) if m == 8 else (m, c) for m, c in step.STEP_BATCH_CONFIG]
    return apply


def main():
    b1 = {"split pdl": lambda: None, "fused pdl": _cfg({"split": False}), "split pdl (2)": lambda: None}
    b8 = {"split pdl": lambda: None, "fused pdl": _batch_cfg({"split": False}), "split pdl (2)": lambda: None}
    r7.round_main(61, lambda dev, tiny: [("step b1", lambda: r55.step_phase(dev, tiny, 1, STEP_B1)),
                                         ("step b8", lambda: r55.step_phase(dev, tiny, 8, STEP)),
                                         ("decode b1", lambda: r59.replay_phase(dev, tiny, 1, b1)),
                                         ("decode b8", lambda: r59.replay_phase(dev, tiny, 8, b8))])


if __name__ == "__main__":
    main()
