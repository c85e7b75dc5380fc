"""GPU round 19 (session 6): loads that waited behind stores. The compiler keeps a load after
any store before it (they might alias) and does not move loads across barriers, so a load
placed late in the source is one more trip to memory on the program's path. Three kernels
had one (read off their sm_90 SASS here, benchmarks/NOTES.md "Session 6"):

  conv     the row-walking causal conv loaded each row after the previous row's store
           (CONV_CONFIG["ROWS_AHEAD"]: rows loaded ahead)
  norm     add_rmsnorm loaded its weight after storing the residual (NORM_CONFIG["add_w_first"])
  step     the decode step loaded z after its reductions and the norm weights after its
           scratch stores, and the group's finish its B/C windows after the output's store
           (STEP_CONFIG["early"])

    PYTHONPATH=src python3 benchmarks/gpu_round19.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round19.py --tiny  # CPU: runs

Each kernel variant is checked bit for bit against the default, then timed alternated with it;
then the model (decode b1 and b8, prefill of 65536 tokens) with all the switches on against
off, alternated, after checking that its logits and states are bit-identical.
Lines go to stdout and $OUT/round19.txt.
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
r7.LOG_NAME = "round19.txt"
log = r7.log

CONV_VARIANTS = [{}, {"ROWS_AHEAD": 4}, {"ROWS_AHEAD": 8}, {"ROWS": 8, "ROWS_AHEAD": 8},
                 {"ROWS": 32, "ROWS_AHEAD": 8}, {"ROWS_BLOCK_C": 512, "ROWS_WARPS": 4, "ROWS_AHEAD": 8},
                 {"ROWS_BLOCK_C": 128, "ROWS_WARPS": 1, "ROWS_AHEAD": 8}, {"ROWS": 8, "ROWS_AHEAD": 8, "ROWS_WARPS": 4,
                                                                             "ROWS_BLOCK_C": 512}]


def _timed_variants(label, base_cfg, variants, call, nbytes, dev, tbps, reps=2):
    """Each variant of a config dict checked bit for bit against the first, then timed, the
    list walked `reps` times (alternation); returns {variant: [ms]}."""
    base = dict(base_cfg)
    ref = None
    times: dict = {}
    for rep in range(reps):
        for kw in variants:
            base_cfg.clear()
            base_cfg.update({**base, **kw})
            name = str(kw) if kw else "defaults"
            try:
                out = call()
                outs = [o.clone() for o in (out if isinstance(out, tuple) else (out,))]
                if ref is None:
                    ref = outs
                same = all(torch.equal(a, b) for a, b in zip(outs, ref))
                if dev.type != "cuda":
                    log(f"  {label} {name:60s} same: {same}")
                    continue
                from mamba2_cli import kernel_bench as kb

                ms = kb.time_ms(call, dev)
                times.setdefault(name, []).append(ms)
                share = f"{nbytes / (ms * 1e-3) / 1e12 / tbps:6.1%} of copy" if nbytes else ""
                log(f"  {label} {name:60s} {ms * 1e3:8.2f} us {share}  same: {same}")
            except Exception as e:
                r7.err_line(f"{label} {name}", e)
    base_cfg.clear()
    base_cfg.update(base)
    for name, v in times.items():
        log(f"  summary {label} {name:60s} " + ", ".join(f"{x * 1e3:.2f}" for x in v) + " us")
    return times


def conv_phase(dev, tiny, tbps):
    from mamba2_cli.kernels import conv

    import gpu_round18

    xBC, cw, cbias, cs0 = gpu_round18.conv_inputs(dev, tiny)
    cs = cs0.clone()

    def call():
        cs.copy_(cs0)
        return conv.causal_conv1d(xBC, cw, cbias, cs), cs

    _timed_variants("conv 4096", conv.CONV_CONFIG, CONV_VARIANTS, call, xBC.numel() * 2 * 2, dev, tbps)


def norm_phase(dev, tiny, tbps):
    from mamba2_cli.kernels import norm

    D = 64 if tiny else 4096
    dtype = torch.float16 if tiny else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(D, generator=g, device=dev).to(dtype)
    for M in (1, 8, 64 if tiny else 4096):
        x = torch.randn(M, D, generator=g, device=dev).to(dtype)
        res = torch.randn(M, D, generator=g, device=dev)
        _timed_variants(f"add_rmsnorm {M:4d} rows", norm.NORM_CONFIG, [{}, {"add_w_first": True}],
                        lambda: norm.add_rmsnorm(x, res, w, 1e-5, True), M * D * 12, dev, tbps)


def step_phase(dev, tiny, tbps):
    """The decode step per layer in a CUDA graph of layers (64; 8 at batch 64, as bench)."""
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import step

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    G = s.ngroups
    for b in (1, 8, 64):
        b = min(b, 2) if tiny else b
        n = 2 if tiny else (kb.LARGE_BATCH_GRAPH_LAYERS if b >= 64 else 64)
        layers = kb.mixer_layers(s, n, b, dev, dtype, seed=b)
        sb = kb.state_bytes(s, b)
        st0 = {k: v.clone() for k, v in layers[0].items()}
        outs = {}
        for cfg in ({}, {"early": True}):
            st = {k: v.clone() for k, v in st0.items()}
            outs[str(cfg)] = (kb.call_mixer(functools.partial(step.mixer_decode_step, config=cfg), st, G),
                              st["ssm_state"], st["conv_state"])
        a, c = outs.values()
        log(f"  step b{b} early same as the defaults (one call, same inputs): "
            f"{all(torch.equal(x, y) for x, y in zip(a, c))}")
        if dev.type != "cuda":
            continue
        res: dict = {}
        for rep in range(3):
            for cfg in ({}, {"early": True}):
                fn = functools.partial(step.mixer_decode_step, config=cfg)
                graph = kb.graph_of(fn, layers, G)
                us = kb.time_ms(graph.replay, dev) / n * 1e3
                del graph
                share = sb / (us * 1e-6) / 1e12 / tbps
                name = str(cfg) if cfg else "defaults"
                res.setdefault(name, []).append((us, share))
                log(f"  step b{b} {name:20s} {us:8.2f} us per layer  state {share:6.1%} of copy")
        for name, v in res.items():
            log(f"  summary step b{b} {name:20s} " + ", ".join(f"{u:.2f} us ({sh:.1%})" for u, sh in v))
        del layers


def switches(on: bool) -> None:
    from mamba2_cli.kernels import conv, norm, step

    conv.CONV_CONFIG["ROWS_AHEAD"] = BEST_AHEAD if on else 0
    norm.NORM_CONFIG["add_w_first"] = on
    step.STEP_CONFIG["early"] = on


BEST_AHEAD = 8


def model_phase(model, dev, tiny):
    from mamba2_cli.bench import bench_model
    from mamba2_cli.generate import owned_state, prefill

    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, cfg.vocab_size, (2, 40 if tiny else 300), generator=g).to(dev)
    steps = torch.randint(3, cfg.vocab_size, (2, 4), generator=g).to(dev)
    got = {}
    for on in (False, True):
        switches(on)
        r7.drop_graphs(model)
        st = owned_state(model, 2)
        lg = [prefill(model, ids, st, chunk_tokens=128 if not tiny else 16)]
        with torch.inference_mode():
            for j in range(steps.shape[1]):
                lg.append(model(steps[:, j : j + 1], st)[:, -1])
        got[on] = (torch.stack(lg), st.ssm.clone(), st.conv.clone())
    same = all(torch.equal(a, b) for a, b in zip(got[False], got[True]))
    log(f"  model: logits and states with the switches on bit-identical to off (prefill in pieces, 4 eager "
        f"decode steps, batch 2): {same}")
    if dev.type != "cuda":
        switches(False)
        return
    L = 65536
    long_ids = torch.randint(3, cfg.vocab_size, (1, L), generator=g)
    state = owned_state(model, 1)
    res: dict = {}
    for rep in range(3):
        for on in (False, True):
            switches(on)
            r7.drop_graphs(model)
            name = "on " if on else "off"
            try:
                r1 = bench_model(model, prompt_len=128, gen_len=128, batch_size=1, repeats=2)
                r8 = bench_model(model, prompt_len=128, gen_len=64, batch_size=8, repeats=2)
                p = r7.timed_prefill(model, long_ids, state, dev)
                res.setdefault(name, []).append((r1["decode_tok_s"], r8["decode_tok_s"], p, r1["ttft_s"]))
                log(f"  model switches {name}: b1 {r1['decode_tok_s']:6.1f} tok/s, b8 {r8['decode_tok_s']:6.1f} "
                    f"tok/s/seq, TTFT128 {r1['ttft_s'] * 1e3:5.2f} ms, prefill {L} {p:.4f} s")
            except Exception as e:
                r7.err_line(f"model {name}", e)
    switches(False)
    for name, v in res.items():
        cols = list(zip(*v))
        med = [sorted(c)[len(c) // 2] for c in cols]
        log(f"  summary model switches {name}: b1 " + "/".join(f"{x:.1f}" for x in cols[0]) + f" (median {med[0]:.1f})"
            + ", b8 " + "/".join(f"{x:.1f}" for x in cols[1]) + f" (median {med[1]:.1f})"
            + ", prefill " + "/".join(f"{x:.4f}" for x in cols[2]) + f" (median {med[2]:.4f} s)"
            + ", TTFT " + "/".join(f"{x * 1e3:.2f}" for x in cols[3]) + " ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    dev, model = r7.setup(19, args.tiny, load="model" not in skip)
    r7.T0 = T0
    from mamba2_cli import kernel_bench as kb

    tbps = kb.copy_bandwidth(dev) / 1e12 if dev.type == "cuda" else float("nan")
    log(f"  copy bandwidth {tbps:.3f} TB/s")
    phases = [("conv", lambda: conv_phase(dev, args.tiny, tbps)), ("norm", lambda: norm_phase(dev, args.tiny, tbps)),
              ("step", lambda: step_phase(dev, args.tiny, tbps)), ("model", lambda: model_phase(model, dev, args.tiny))]
    r7.run_phases([(n, f) for n, f in phases if n not in skip])


if __name__ == "__main__":
    main()
