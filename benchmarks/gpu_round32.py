"""GPU round 32 (session 7): the last layer's gated norm and out_proj on the kept positions only.

Since d11f093 the model runs the last layer's gated norm and out_proj on the positions whose
logits are kept (the last one in prefill) instead of all of them; its scan still advances the
state over all. "before" wraps the mixer so that it computes every position and keeps the
rows afterwards (what the model did before), "after" is the tree as it is; alternated in one
process, prefill of 2048 and 65536 tokens at batch 1.

    PYTHONPATH=src python3 benchmarks/gpu_round32.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round32.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round32.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time


sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round29 as r29  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round32.txt"  # after importing round 29, which sets its own
log = r7.log


@contextlib.contextmanager
def before():
    from mamba2_cli import model as m

    orig = m.Mamba2Mixer.forward

    def every_position(self, u, conv_state, ssm_state, backend, seq_len=None, keep=None):
        out = orig(self, u, conv_state, ssm_state, backend, seq_len, None)
        return out if keep is None else m._keep(out, keep)

    m.Mamba2Mixer.forward = every_position
    try:
        yield
    finally:
        m.Mamba2Mixer.forward = orig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, model = r7.setup(32, args.tiny)
    r7.T0 = T0
    cases = ((1, 64), (1, 256)) if args.tiny else ((1, 2048), (1, 65536))
    variants = (("before", before), ("after", contextlib.nullcontext))
    r7.run_phases([("prefill", lambda: r29.alternated_prefill(model, dev, cases, variants, compare_logits=True))])


if __name__ == "__main__":
    main()
