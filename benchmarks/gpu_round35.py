"""GPU round 35 (session 8): the row matvec's layouts per weight shape, and decode at batch 1 with the
row kernel (the new 1-row default) against round 5's acc kernel, alternated.

    PYTHONPATH=src timeout 570 python3 benchmarks/gpu_round35.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round35.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round35.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402
import gpu_round34 as r34  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round35.txt"
log = r7.log
r34.ROW_CONFIGS = {
    "acc n2 k1024 w4 (round 5)": ("acc", 2, 4, False), "row n1 w4": ("row", 1, 4, False),
    "row n2 w4": ("row", 2, 4, False), "row n1 w4 evict": ("row", 1, 4, True), "row n2 w4 evict": ("row", 2, 4, True),
    "row n1 w8": ("row", 1, 8, False), "row n2 w8": ("row", 2, 8, False), "row n4 w8": ("row", 4, 8, False),
}


def _cfg(c):
    from mamba2_cli.kernels import gemv

    return gemv.GemvConfig(c[0], c[1], 1024, c[2], evict_first=c[3])


def _matvec(dev, tiny):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import gemv

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(9)
    n = 2 if tiny else 64
    shapes = {"in_proj": (s.in_proj, s.d_model, n), "out_proj": (s.d_model, s.d_inner, n),
              "lm_head": (64 if tiny else 32768, s.d_model, 2 if tiny else 8)}
    for label, (N, K, count) in shapes.items():
        Ws = [(torch.randn(N, K, generator=gen, device=dev) * 0.02).to(dtype) for _ in range(count if label != "lm_head" else 1)]
        x = torch.randn(1, K, generator=gen, device=dev).to(dtype)
        ref = torch.nn.functional.linear(x.float(), Ws[0].float())
        fns = {}
        for name, c in r34.ROW_CONFIGS.items():
            fns[name] = (lambda c: lambda w: gemv.gemv(x, w, None, c))(_cfg(c))
            log(f"  check {label} {name:28s} rel err {r7.rel_err(fns[name](Ws[0]).float(), ref):.2e}")
        if dev.type != "cuda":
            continue
        r33._timed(label, fns, lambda name: [lambda w=w: fns[name](w) for w in (Ws if label != "lm_head" else Ws * count)],
                   count, dev)
        del Ws


def model_phase(dev, tiny):
    import gpu_round5 as r5
    from mamba2_cli.kernels import gemv

    r5.log = lambda m="": log(m)
    default = gemv.GEMV_CONFIG[1]

    def apply(cfg):
        gemv.GEMV_CONFIG[1] = gemv.GemvConfig("acc", 2, 1024, 4) if cfg.get("acc") else default

    try:
        r33.model_phase(r5.load_model(dev, tiny), dev, tiny, {"row (default)": {}, "acc (round 5)": {"acc": True}}, apply)
    finally:
        apply({})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    dev, _ = r7.setup(35, args.tiny, load=False)
    r7.T0 = T0
    r33.log = log
    skip = set(args.skip.split(","))
    phases = [("matvec", lambda: _matvec(dev, args.tiny)), ("model", lambda: model_phase(dev, args.tiny))]
    r7.run_phases([p for p in phases if p[0] not in skip])


if __name__ == "__main__":
    main()
