"""GPU round 34 (session 8; ran at 5d7ccb5, where kernels/stream.py still existed: taken out after it,
so the step_out, norm_in and model phases no longer run; the matvec phase does): round 33 again with the count on 64 slots, the fused forms' sleep and
acquire, the `row` matvec (whole weight rows in one tile) per weight shape, and the model with
the combinations.

    PYTHONPATH=src timeout 570 python3 benchmarks/gpu_round34.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round34.py --tiny  # CPU: runs

  matvec  in_proj, out_proj (graphs of 64 layers' own weights) and lm_head (graphs of 8 calls):
          the default 1-row configuration against `row` n1/n2 at 4 warps
  step_out, norm_in   as round 33 (gpu_round33.py), the variants below
  model   decode at batch 1, alternated: off; row matvecs; the fused pair; both
Lines go to stdout and $OUT/round34.txt.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402

r7.LOG_NAME = "round34.txt"
log = r7.log

# (P block, warps, rows per matvec program, sleep ns, acquire)
STEP_OUT = [(16, 4, 1, 0, True), (16, 4, 1, 200, True), (16, 4, 2, 0, True), (16, 4, 1, 0, False),
            (16, 4, 2, 0, False), (16, 4, 1, 50, True)]
# (rows per program, warps, sleep ns, acquire)
NORM_IN = [(1, 4, 0, True), (2, 4, 0, True), (1, 4, 0, False), (2, 4, 0, False), (2, 4, 50, True)]
# (kind, rows per program, warps[, evict_first]); the acc kernel was the 1-row default then
ROW_CONFIGS = {"acc n2 k1024 w4 (default)": ("acc", 2, 4), "row n1 w4": ("row", 1, 4), "row n2 w4": ("row", 2, 4),
               "row n1 w2": ("row", 1, 2)}


def matvec_phase(dev, tiny, configs=None, rows=1):
    """Each configuration (a GemvConfig, or a ROW_CONFIGS tuple) checked against F.linear at `rows`
    rows of x, then timed per weight shape in graphs of the layers' own weights; rounds 35 and 39-42
    reuse it. Returns {shape: {name: median µs per call}} (empty off the GPU)."""
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import gemv

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(9)
    n = 2 if tiny else 64
    vocab = 64 if tiny else 32768
    shapes = {"in_proj": (s.in_proj, s.d_model, n), "out_proj": (s.d_model, s.d_inner, n),
              "lm_head": (vocab, s.d_model, 2 if tiny else 8)}
    times = {}
    for label, (N, K, count) in shapes.items():
        Ws = [(torch.randn(N, K, generator=gen, device=dev) * 0.02).to(dtype) for _ in range(count if label != "lm_head" else 1)]
        x = torch.randn(rows, K, generator=gen, device=dev).to(dtype)
        ref = torch.nn.functional.linear(x.float(), Ws[0].float())
        fns = {}
        for name, cfg in (configs or ROW_CONFIGS).items():
            c = cfg if isinstance(cfg, gemv.GemvConfig) else gemv.GemvConfig(
                cfg[0], cfg[1], 1024, cfg[2], evict_first=len(cfg) > 3 and cfg[3])
            f = (lambda c: lambda w: gemv.gemv(x, w, None, c))(c)
            try:
                log(f"  check {label} {name:28s} rel err {r7.rel_err(f(Ws[0]).float(), ref):.2e}")
                fns[name] = f
            except Exception as e:
                r7.err_line(f"check {label} {name}", e)
        if dev.type != "cuda":
            continue
        ws = Ws if label != "lm_head" else Ws * count
        times[label] = r33._timed(label, fns, lambda name: [lambda w=w: fns[name](w) for w in ws], count, dev) or {}
    return times


def model_phase(dev, tiny):
    from mamba2_cli.kernels import gemv, stream

    default_1row = gemv.GEMV_CONFIG[1]

    def apply(cfg):
        gemv.GEMV_CONFIG[1] = gemv.GemvConfig("row", 1, 1024, 4) if cfg.get("row") else default_1row
        stream.STREAM_CONFIG.update(step_out=bool(cfg.get("step_out")), norm_in=bool(cfg.get("norm_in")),
                                    out_block_n=1, in_block_n=2, sleep_ns=0, acquire=True)

    configs = {"off": {}, "row": {"row": True}, "fused": {"step_out": True, "norm_in": True},
               "fused+row": {"step_out": True, "norm_in": True, "row": True},
               "norm_in+row": {"norm_in": True, "row": True}}
    r33.model_variants(dev, tiny, configs, apply)


def main():
    r7.round_main(34, lambda dev, tiny: [("matvec", lambda: matvec_phase(dev, tiny)),
                                         ("step_out", lambda: r33.step_out_phase(dev, tiny, STEP_OUT)),
                                         ("norm_in", lambda: r33.norm_in_phase(dev, tiny, NORM_IN, alone=False)),
                                         ("model", lambda: model_phase(dev, tiny))])


if __name__ == "__main__":
    main()
