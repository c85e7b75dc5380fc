"""GPU round 44 (session 9): where a Codestral decode token goes now, batch 1 and 8, through the
CUDA graph: CUPTI kernel times per token (torch.profiler) against the replay time.

    PYTHONPATH=src timeout 170 python3 benchmarks/gpu_round44.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round44.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round44.txt.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round5 as r5  # noqa: E402
import gpu_round7 as r7  # noqa: E402

r7.LOG_NAME = "round44.txt"
log = r7.log


def profile_phase(dev, tiny):
    from mamba2_cli.generate import decode_step_fn, owned_state

    r5.log = lambda m="": log(m)
    model = r5.load_model(dev, tiny)
    for b in (1, 8):
        st = owned_state(model, b)
        tok = torch.randint(3, model.cfg.vocab_size, (b,), device=dev)
        step = decode_step_fn(model, st, cuda_graph=dev.type == "cuda")
        step(tok)
        if dev.type != "cuda":
            log(f"  decode b{b}: one step ran (no CUPTI here)")
            continue
        agg = r7.kernel_times(lambda: step(tok), dev, 1 if tiny else 20)
        r7.print_times(f"decode b{b}, per token", agg)
        ms = r7.graph_ms(lambda: step(tok), dev)
        log(f"  decode b{b}: replay {ms * 1e3:.1f} us per token, kernels {agg['(sum)']:.1f} us, "
            f"the rest {ms * 1e3 - agg['(sum)']:.1f} us")


def main():
    r7.round_main(44, lambda dev, tiny: [("profile", lambda: profile_phase(dev, tiny))])


if __name__ == "__main__":
    main()
