"""GPU round 51 (session 10): the last layer's in_proj projects z for the kept positions only.

In a prefill only the last position's logits are kept, so the last layer's gated norm and
out_proj already run on it alone (round 32); its z, which only that norm reads, was still
projected for every position: 8192 of in_proj's 18560 rows at Codestral's shape, ~44 % of one
layer's in_proj. `model.KEEP_Z_ONLY` projects z for the kept positions alone. Alternated in one
process (round 29's harness, the first of the rounds not counted), prefill of 2048 and 65536
tokens at batch 1, logits compared.

    PYTHONPATH=src python3 benchmarks/gpu_round51.py [--short]   # H200; --short: 512, 2048, 8192
                                                                  # tokens, 12 rounds
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round51.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round51.txt.
"""

from __future__ import annotations

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round29 as r29  # noqa: E402

r7.LOG_NAME = "round51.txt"  # after importing round 29, which sets its own
log = r7.log


def switch(on):
    @contextlib.contextmanager
    def ctx():
        from mamba2_cli import model as m

        saved = m.KEEP_Z_ONLY
        m.KEEP_Z_ONLY = on
        try:
            yield None
        finally:
            m.KEEP_Z_ONLY = saved
    return ctx


def main():
    short = "--short" in sys.argv  # the second call: short prompts, more rounds
    if short:
        sys.argv.remove("--short")

    def phases(dev, tiny):
        import gpu_round5 as r5

        r5.log = lambda m="": log(m)
        model = r5.load_model(dev, tiny)
        cases = ((1, 64), (1, 256)) if tiny else ((1, 2048), (1, 65536))
        if short:
            cases, reps = (((1, 64),) if tiny else ((1, 2048), (1, 8192), (1, 512))), 12
        else:
            reps = 6
        variants = (("all z", switch(False)), ("kept z", switch(True)))
        return [("prefill", lambda: r29.alternated_prefill(model, dev, cases, variants, compare_logits=True, reps=reps))]

    r7.round_main(51, phases)


if __name__ == "__main__":
    main()
