"""GPU round 17 (session 5): the decode step's state traffic at batch 64 (and 1, 8), with the
state's loads and stores marked evict_first and other layouts, timed as `mamba2 bench` times
the batch-64 step (per layer, a CUDA graph of 8 layers, each its own state).

    PYTHONPATH=src python3 benchmarks/gpu_round17.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round17.py --tiny  # CPU: runs

Each variant is checked against the defaults (outputs and states after one call, same inputs)
and timed twice, alternated with the defaults. Lines go to stdout and $OUT/round17.txt.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round17.txt"
log = r7.log

VARIANTS = {
    1: [{}, {"evict": True}],
    8: [{}, {"evict": True}],
    64: [{}, {"evict": True}, {"BLOCK_P": 64, "num_warps": 2}, {"BLOCK_P": 64, "num_warps": 2, "evict": True},
         {"BLOCK_P": 32, "num_warps": 2}, {"BLOCK_P": 16, "num_warps": 1}],
}


def sweep(dev, tiny):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import step

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    G = s.ngroups
    tbps = kb.copy_bandwidth(dev) / 1e12 if dev.type == "cuda" else float("nan")
    log(f"  copy bandwidth {tbps:.3f} TB/s")
    for b, variants in VARIANTS.items():
        b = min(b, 2) if tiny else b
        n = 2 if tiny else (kb.LARGE_BATCH_GRAPH_LAYERS if b >= 64 else 64)
        layers = kb.mixer_layers(s, n, b, dev, dtype, seed=b)
        sb = kb.state_bytes(s, b)
        base = {k: v.clone() for k, v in layers[0].items()}
        ref_out = kb.call_mixer(step.mixer_decode_step, base, G)
        res: dict = {}
        for rep in range(2):
            for cfg in variants:
                name = " ".join(f"{k}={v}" for k, v in cfg.items()) or "defaults"
                fn = functools.partial(step.mixer_decode_step, config=cfg)
                try:
                    if rep == 0:
                        st = {k: v.clone() for k, v in layers[0].items()}
                        st["ssm_state"].copy_(layers[0]["ssm_state"])
                        ok = torch.equal(kb.call_mixer(fn, st, G), ref_out) and torch.equal(
                            st["ssm_state"], base["ssm_state"])
                        log(f"  b{b} {name:40s} same as the defaults: {ok}")
                    if dev.type != "cuda":
                        continue
                    graph = kb.graph_of(fn, layers, G)
                    us = kb.time_ms(graph.replay, dev) / n * 1e3
                    del graph
                    share = sb / (us * 1e-6) / 1e12 / tbps
                    res.setdefault(name, []).append(share)
                    log(f"  b{b} {name:40s} {us:8.2f} us per layer  state {share:6.1%} of copy")
                except Exception as e:
                    r7.err_line(f"b{b} {name}", e)
        for name, v in res.items():
            log(f"  summary b{b} {name:40s} " + ", ".join(f"{x:.1%}" for x in v))
        del layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, _ = r7.setup(17, args.tiny, load=False)
    r7.T0 = T0
    r7.run_phases((("sweep", lambda: sweep(dev, args.tiny)),))


if __name__ == "__main__":
    main()
