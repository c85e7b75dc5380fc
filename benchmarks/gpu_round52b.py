"""GPU round 52b (session 11): why the folded conv cost the scan ~0.43 ms per layer.

Round 52 measured conv + scan of Codestral's layer at 8192 tokens (batch 1) at 0.524 ms
unfolded and 0.943-1.032 ms with x's conv in the scan, results bit-identical. Here: each
kernel's time (CUPTI) for fold 0 and fold 3, and the machine code as this device's Triton
compiles it (benchmarks/sass_fold.py: registers, spill stack, loads).

    PYTHONPATH=src python3 benchmarks/gpu_round52b.py          # H200, at 9b6930d + this script
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round52b.py --tiny

Lines go to stdout and $OUT/round52b.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round52 as r52  # noqa: E402

r7.LOG_NAME = "round52b.txt"
log = r7.log


def phase_kernels(dev, tiny):
    import torch

    H, P, G, N = r52.shape(tiny)
    dtype = torch.float16 if tiny else torch.bfloat16
    for b, L in ([(1, 128)] if tiny else [(1, 8192), (8, 4096)]):
        inp = r52.layer_inputs(b, L, H, P, G, N, dtype, dev, seed=7)
        for label, mode in (("fold0", 0), ("fold3", 3), ("fold1", 1)):
            with r52.fold(mode):
                agg = r7.kernel_times(lambda: r52.call(inp), dev, 2 if tiny else 20)
            r7.print_times(f"b{b} L{L} {label}", agg)


def phase_sass(dev, tiny):
    if tiny or dev.type != "cuda":
        log("  (sass: needs the device's Triton and CUDA)")
        return
    import sass_fold

    sass_fold.print = lambda *a, **k: log(" ".join(str(x) for x in a))
    sass_fold.main()


def main():
    r7.round_main(520, lambda dev, tiny: [("kernels", lambda: phase_kernels(dev, tiny)),
                                         ("sass", lambda: phase_sass(dev, tiny))])


if __name__ == "__main__":
    main()
