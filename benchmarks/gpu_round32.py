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

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round32.txt"
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
    from mamba2_cli.generate import owned_state

    def run():
        for L in ((64, 256) if args.tiny else (2048, 65536)):
            ids = torch.randint(3, model.cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(4))
            state = owned_state(model, 1)
            res: dict = {}
            logits: dict = {}
            for rep in range(4):
                for label, ctx in (("before", before), ("after", contextlib.nullcontext)):
                    with ctx():
                        s = r7.timed_prefill(model, ids, state, dev)
                        if rep == 0:
                            from mamba2_cli.generate import prefill

                            state.reset()
                            logits[label] = prefill(model, ids, state).float()
                    if rep:
                        res.setdefault(label, []).append(s)
                    log(f"  prefill L{L} {label:7s} {s:.4f} s")
            err = (logits["after"] - logits["before"]).norm() / logits["before"].norm()
            log(f"  prefill L{L} logits after against before: {err.item():.1e}")
            for label, v in res.items():
                v = sorted(v)
                log(f"  summary prefill L{L} {label:7s} " + "/".join(f"{x:.4f}" for x in v)
                    + f" median {v[len(v) // 2]:.4f} s")

    r7.run_phases([("prefill", run)])


if __name__ == "__main__":
    main()
