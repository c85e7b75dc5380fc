"""GPU round 16 (session 5): in_proj and the decode step in one launch at batch 1 (fused.py),
the step's programs waiting inside in_proj's launch for their group's rows.

    PYTHONPATH=src python3 benchmarks/gpu_round16.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round16.py --tiny  # CPU: runs

  check    decode logits and states of the Codestral-shaped model (batch 1, CUDA graph), one
           launch against two, fed the same tokens: must be equal bit for bit
  layer    the model's 64 layers' decode_step (in_proj, mixer, out_proj) in one CUDA graph,
           per layer, one launch and two alternated; in_proj's matvec alone for scale
  profile  kernel times per decode token (CUPTI, graph replay), one launch
  model    decode b1 tok/s, one launch and two alternated
Lines go to stdout and $OUT/round16.txt.

The one launch measured slower (69.5 against 64.6 us per layer; benchmarks/NOTES.md, session
5) and was taken out (commits d696895..ab057a2 hold it): without kernels/fused.py this script
says so and stops.
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
r7.LOG_NAME = "round16.txt"
log = r7.log


def set_fused(model, on: bool) -> None:
    from mamba2_cli.kernels import fused

    fused.FUSE_INPROJ_STEP = on
    r7.drop_graphs(model)


def check(model, dev, tiny):
    from mamba2_cli.generate import decode_step_fn, prefill

    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, V, (1, 16), generator=g)
    toks = torch.randint(3, V, (16,), generator=g).to(dev)
    st0 = model.new_state(1)
    set_fused(model, False)
    prefill(model, prompt, st0)
    runs = {}
    for on in (False, True):
        set_fused(model, on)
        st = model.new_state(1)
        st.copy_(st0)
        fn = decode_step_fn(model, st, cuda_graph=dev.type == "cuda")
        runs[on] = (torch.stack([fn(t.view(1)).clone() for t in toks]), st.ssm.clone(), st.conv.clone())
    (lf, sf, cf), (lu, su, cu) = runs[True], runs[False]
    log(f"  check b1: logits equal {torch.equal(lf, lu)} (rel {r7.rel_err(lf, lu):.2e}), ssm state equal "
        f"{torch.equal(sf, su)}, conv state equal {torch.equal(cf, cu)}, over {len(toks)} graph steps")
    from mamba2_cli.kernels import fused

    log(f"  one launch fits the GPU: {list(fused._capacity.values())} {fused.last_fit}")
    set_fused(model, True)


def layer(model, dev, tiny):
    from mamba2_cli import kernel_bench as kb

    if dev.type != "cuda":
        return
    cfg = model.cfg
    layers = model.backbone.layers
    be = model.backend
    tbps = kb.copy_bandwidth(dev) / 1e12
    st = model.new_state(1)
    x = torch.randn(1, cfg.d_model, device=dev).to(model.dtype)

    def run():
        for i, lay in enumerate(layers):
            lay.mixer.decode_step(x, st.conv[i], st.ssm[i], be)  # st: the variant's own state

    def inproj():
        for lay in layers:
            be.linear(x, lay.mixer.in_proj.weight)

    m = layers[0].mixer
    wbytes = (m.in_proj.weight.numel() + m.out_proj.weight.numel()) * 2
    sbytes = 2 * cfg.nheads * cfg.headdim * cfg.d_state * 4
    from mamba2_cli.kernels import fused

    # (name, one launch, FUSED_CONFIG keys); poll 0 (no wait) and signal False (no count) give
    # wrong results on purpose: they time the launch's parts.
    variants = [("two launches", False, {}), ("one, poll atomic", True, {"poll": 1}),
                ("one, poll load", True, {"poll": 2}), ("one, no wait", True, {"poll": 0}),
                ("one, no wait/count", True, {"poll": 0, "signal": False})]
    keep = dict(fused.FUSED_CONFIG)
    for _ in range(2):
        for name, on, over in variants:
            set_fused(model, on)
            fused.FUSED_CONFIG.update(keep, **over)
            for t in fused._ready.values():
                t.zero_()
            st = model.new_state(1)
            try:
                us = r7.graph_ms(r7.captured(run, dev).replay, dev, reps=20) * 1e3 / len(layers)
            except Exception as e:
                r7.err_line(name, e)
                continue
            share = (wbytes + sbytes) / (us * 1e-6) / 1e12 / tbps
            log(f"  layer b1 {name:19s} {us:7.2f} us per layer (weights + state {share:6.1%} of copy) "
                f"{fused.last_fit if on else ''}")
    fused.FUSED_CONFIG.clear()
    fused.FUSED_CONFIG.update(keep)
    for t in fused._ready.values():
        t.zero_()
    us = r7.graph_ms(r7.captured(inproj, dev).replay, dev, reps=20) * 1e3 / len(layers)
    log(f"  in_proj matvec alone         {us:7.2f} us per layer "
        f"({m.in_proj.weight.numel() * 2 / (us * 1e-6) / 1e12 / tbps:6.1%} of copy)")
    set_fused(model, True)


def profile(model, dev, tiny):
    from mamba2_cli.generate import decode_step_fn, owned_state

    if dev.type != "cuda":
        return
    for on in (True, False):
        set_fused(model, on)
        st = owned_state(model, 1)
        tok = torch.randint(3, model.cfg.vocab_size, (1,), device=dev)
        graph = decode_step_fn(model, st, cuda_graph=True)
        graph(tok)
        agg = r7.kernel_times(lambda: graph(tok), dev, 20)
        ms = r7.graph_ms(lambda: graph(tok), dev)
        r7.print_times(f"decode b1 {'one launch' if on else 'two launches'}: replay {ms * 1e3:.1f} us", agg, top=8)
    set_fused(model, True)


def model_ab(model, dev, tiny, deadline):
    from mamba2_cli.bench import bench_model

    res: dict = {}
    try:
        for rep in range(1 if tiny else 3):
            for on in (False, True):
                if time.time() - T0 > deadline:
                    raise TimeoutError("out of time")
                set_fused(model, on)
                r = bench_model(model, prompt_len=64, gen_len=8 if tiny else 128, batch_size=1,
                                repeats=1 if tiny else 2)
                key = f"decode b1 {'one launch' if on else 'two launches'}"
                res.setdefault(key, []).append(r["decode_tok_s"])
                log(f"  {key:26s} {r['decode_tok_s']:8.1f} tok/s {r['decode_ms_per_step']:.3f} ms")
    except Exception as e:
        r7.err_line("model", e)
    finally:
        set_fused(model, True)
    log("## summary")
    for k, v in res.items():
        log(f"  {k:26s} " + ", ".join(f"{x:.4g}" for x in v) + f"  median {sorted(v)[len(v) // 2]:.4g}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--budget-s", type=float, default=330.0)
    args = ap.parse_args()
    import importlib.util

    if importlib.util.find_spec("mamba2_cli.kernels.fused") is None:
        log("the one-launch in_proj + step was taken out after round 16 (slower: benchmarks/NOTES.md, session 5)")
        return
    dev, model = r7.setup(16, args.tiny)
    r7.T0 = T0
    r7.run_phases((("check", lambda: check(model, dev, args.tiny)),
                   ("layer", lambda: layer(model, dev, args.tiny)),
                   ("profile", lambda: profile(model, dev, args.tiny)),
                   ("model", lambda: model_ab(model, dev, args.tiny, args.budget_s))))


if __name__ == "__main__":
    main()
