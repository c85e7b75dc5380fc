"""GPU round 14 (session 4): what the batch-8 decode step's 28 us are made of.

    PYTHONPATH=src python3 benchmarks/gpu_round14.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round14.py --tiny  # CPU: runs

In CUDA graphs of 64 Codestral layers (each its own state), per layer, at batch 1 and 8:
  step       mixer_decode_step as the model runs it (STEP_BATCH_CONFIG)
  update     ssd_decode_step alone: the state update and y = S C + D x, no conv, no norm,
             P blocks of 16, 32 and 64 rows at 1, 2 and 4 warps
  copy       the state's bytes copied (read + write), torch's copy kernel
Lines go to stdout and $OUT/round14.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round14.txt"
log = r7.log


def graph_us(fn, nl, dev) -> float:
    from mamba2_cli import kernel_bench as kb

    if dev.type != "cuda":
        fn()
        return float("nan")
    return kb.time_ms(r7.captured(fn, dev).replay, dev, clear_cache=False) / nl * 1e3


def components(dev, tiny):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import step

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    nl = 2 if tiny else 64
    H, P, N, G, di = s.nheads, s.headdim, s.d_state, s.ngroups, s.d_inner
    tbps = kb.copy_bandwidth(dev) / 1e12 if dev.type == "cuda" else float("nan")
    for b in (1, 8):
        layers = kb.mixer_layers(s, nl, b, dev, dtype)
        sbytes = 2 * b * H * P * N * 4

        def share(us):
            return sbytes / (us * 1e-6) / 1e12 / tbps

        us = graph_us(lambda: [kb.call_mixer(step.mixer_decode_step, st, G) for st in layers], nl, dev)
        log(f"  b{b} step (defaults)            {us:7.2f} us  state {share(us):6.1%} of copy")
        ins = []
        for st in layers:
            zx = st["zxbcdt"]
            ins.append((zx[:, di:2 * di].reshape(b, H, P), zx[:, -H:], st["A"],
                        zx[:, 2 * di:2 * di + G * N].reshape(b, G, N),
                        zx[:, 2 * di + G * N:2 * di + 2 * G * N].reshape(b, G, N), st["D"], st["dt_bias"]))
        for bp in (16, 32, 64):
            for w in (1, 2, 4):
                def upd():
                    for st, (x, dt, A, B, C, D, dtb) in zip(layers, ins):
                        step.ssd_decode_step(x, dt, A, B, C, D, dtb, (0.0, float("inf")), st["ssm_state"],
                                             block_p=bp, num_warps=w)
                try:
                    us = graph_us(upd, nl, dev)
                    log(f"  b{b} update p{bp:<2d} w{w}              {us:7.2f} us  state {share(us):6.1%} of copy")
                except Exception as e:
                    r7.err_line(f"update b{b} p{bp} w{w}", e)
        src = [st["ssm_state"].clone() for st in layers]
        us = graph_us(lambda: [st["ssm_state"].copy_(x) for st, x in zip(layers, src)], nl, dev)
        log(f"  b{b} copy of the state          {us:7.2f} us  state {share(us):6.1%} of copy")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, _ = r7.setup(14, args.tiny, load=False)
    with torch.inference_mode():
        try:
            components(dev, args.tiny)
        except Exception as e:
            r7.err_line("components", e)
    log(f"## done in {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
