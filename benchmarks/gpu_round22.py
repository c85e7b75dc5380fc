"""GPU round 22 (session 6): the batch decode step with bc_pre's B/C windows loaded before its
stores (STEP_CONFIG["early"] now also moves them; round 19 timed early without this).

    PYTHONPATH=src python3 benchmarks/gpu_round22.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round22.py --tiny  # CPU: runs

  step   mixer_decode_step per layer in graphs as bench times it (64 layers; 8 at batch 64),
         early off against on, at batch 1, 8, 64, three times alternated
  model  decode at batch 8 and 1 (bench_model), early off against on, alternated
Lines go to stdout and $OUT/round22.txt.
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
r7.LOG_NAME = "round22.txt"
log = r7.log
CONFIGS = ({"early": False}, {"early": True})


def step_phase(dev, tiny, tbps):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import step

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    G = s.ngroups
    for b in (1, 8, 64):
        b = min(b, 8) if tiny else b
        n = 2 if tiny else (kb.LARGE_BATCH_GRAPH_LAYERS if b >= 64 else 64)
        layers = kb.mixer_layers(s, n, b, dev, dtype, seed=b)
        sb = kb.state_bytes(s, b)
        outs = []
        for cfg in CONFIGS:
            st = {k: v.clone() for k, v in layers[0].items()}
            outs.append((kb.call_mixer(functools.partial(step.mixer_decode_step, config=cfg), st, G),
                         st["ssm_state"], st["conv_state"]))
        log(f"  step b{b} early on same as off (one call, same inputs): "
            f"{all(torch.equal(x, y) for x, y in zip(*outs))}")
        if dev.type != "cuda":
            continue
        res: dict = {}
        for rep in range(3):
            for cfg in CONFIGS:
                graph = kb.graph_of(functools.partial(step.mixer_decode_step, config=cfg), layers, G)
                us = kb.time_ms(graph.replay, dev) / n * 1e3
                del graph
                res.setdefault(str(cfg), []).append((us, sb / (us * 1e-6) / 1e12 / tbps))
        for name, v in res.items():
            log(f"  summary step b{b} {name:16s} " + ", ".join(f"{u:.2f} us ({sh:.1%})" for u, sh in v))
        del layers


def model_phase(model, dev):
    from mamba2_cli.bench import bench_model
    from mamba2_cli.kernels import step

    res: dict = {}
    for rep in range(3):
        for cfg in CONFIGS:
            step.STEP_CONFIG["early"] = cfg["early"]
            r7.drop_graphs(model)
            try:
                r8 = bench_model(model, prompt_len=128, gen_len=64, batch_size=8, repeats=2)
                r1 = bench_model(model, prompt_len=128, gen_len=128, batch_size=1, repeats=2)
                res.setdefault(str(cfg), []).append((r8["decode_tok_s"], r1["decode_tok_s"]))
                log(f"  model {cfg}: b8 {r8['decode_tok_s']:.1f} tok/s/seq, b1 {r1['decode_tok_s']:.1f} tok/s")
            except Exception as e:
                r7.err_line(f"model {cfg}", e)
    step.STEP_CONFIG["early"] = True
    for name, v in res.items():
        b8, b1 = zip(*v)
        log(f"  summary model {name:16s} b8 " + "/".join(f"{x:.1f}" for x in b8) + f" (median {sorted(b8)[1]:.1f}), b1 "
            + "/".join(f"{x:.1f}" for x in b1) + f" (median {sorted(b1)[1]:.1f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, model = r7.setup(22, args.tiny, load=not args.tiny)
    r7.T0 = T0
    from mamba2_cli import kernel_bench as kb

    tbps = kb.copy_bandwidth(dev) / 1e12 if dev.type == "cuda" else float("nan")
    phases = [("step", lambda: step_phase(dev, args.tiny, tbps))]
    if model is not None:
        phases.append(("model", lambda: model_phase(model, dev)))
    r7.run_phases(phases)


if __name__ == "__main__":
    main()
