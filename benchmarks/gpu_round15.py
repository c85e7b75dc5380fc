"""GPU round 15 (session 4): the folded decode layer (conv in in_proj's epilogue, gated norm in
out_proj's prologue, the step only the state update) against the three operations as they were.

    PYTHONPATH=src python3 benchmarks/gpu_round15.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round15.py --tiny  # CPU: runs

  check    decode logits of the Codestral-shaped model, folded against unfolded, fed the same
           tokens (b1 and b8): the largest relative error and the steps whose argmax agrees
  layer    mixer_decode of 64 layers (the model's weights) in one CUDA graph, per layer
  profile  kernel times per decode token (CUPTI, graph replay), folded
  model    decode b1 and b8 tok/s, folded and unfolded alternated
Lines go to stdout and $OUT/round15.txt.

Both forms of the fold measured slower at batch 1 (benchmarks/NOTES.md, session 4) and were
taken out: without step.FOLD_DECODE this script says so and stops.
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
r7.LOG_NAME = "round15.txt"
log = r7.log


def set_fold(model, on: bool) -> None:
    from mamba2_cli.kernels import step

    step.FOLD_DECODE = on
    r7.drop_graphs(model)


def check(model, dev, tiny):
    from mamba2_cli.generate import decode_step_fn, prefill

    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, V, (1, 16), generator=g)
    toks = torch.randint(3, V, (8,), generator=g).to(dev)
    for b in (1, 8):
        st0 = model.new_state(b)
        set_fold(model, False)
        prefill(model, prompt.expand(b, -1).contiguous(), st0)
        runs = {}
        for on in (False, True):
            set_fold(model, on)
            st = model.new_state(b)
            st.copy_(st0)
            fn = decode_step_fn(model, st, cuda_graph=dev.type == "cuda")
            runs[on] = (torch.stack([fn(t.expand(b).contiguous()).clone() for t in toks]), st.ssm.clone())
        (lf, sf), (lu, su) = runs[True], runs[False]
        agree = (lf.argmax(-1) == lu.argmax(-1)).all(-1).sum().item()
        log(f"  check b{b}: logits {r7.rel_err(lf, lu):.2e} from unfolded, state {r7.rel_err(sf, su):.2e}, "
            f"argmax agrees on {agree}/{len(toks)} steps")
    set_fold(model, True)


def layer(model, dev, tiny):
    from mamba2_cli import kernel_bench as kb

    if dev.type != "cuda":
        return
    cfg = model.cfg
    layers = model.backbone.layers
    be = model.backend
    tbps = kb.copy_bandwidth(dev) / 1e12
    for b in (1, 8):
        st = model.new_state(b)
        x = torch.randn(b, cfg.d_model, device=dev).to(model.dtype)

        def run():
            for i, lay in enumerate(layers):
                lay.mixer.decode(x, st.conv[i], st.ssm[i], be)

        for on in (False, True, False, True):
            set_fold(model, on)
            us = r7.graph_ms(r7.captured(run, dev).replay, dev, reps=20) * 1e3 / len(layers)
            m = layers[0].mixer
            wbytes = (m.in_proj.weight.numel() + m.out_proj.weight.numel()) * 2
            sbytes = 2 * b * cfg.nheads * cfg.headdim * cfg.d_state * 4
            share = (wbytes + sbytes) / (us * 1e-6) / 1e12 / tbps
            log(f"  layer b{b} {'folded  ' if on else 'unfolded'} {us:7.2f} us per layer "
                f"(weights + state {share:6.1%} of copy)")
    set_fold(model, True)


def profile(model, dev, tiny):
    from mamba2_cli.generate import decode_step_fn, owned_state

    if dev.type != "cuda":
        return
    for b in (1, 8):
        set_fold(model, True)
        st = owned_state(model, b)
        tok = torch.randint(3, model.cfg.vocab_size, (b,), device=dev)
        graph = decode_step_fn(model, st, cuda_graph=True)
        graph(tok)
        agg = r7.kernel_times(lambda: graph(tok), dev, 20)
        ms = r7.graph_ms(lambda: graph(tok), dev)
        r7.print_times(f"decode b{b} folded: replay {ms * 1e3:.1f} us", agg, top=8)


def model_ab(model, dev, tiny, deadline):
    from mamba2_cli.bench import bench_model

    res: dict = {}
    try:
        for rep in range(1 if tiny else 3):
            for b in (1, 8):
                for on in (False, True):
                    if time.time() - T0 > deadline:
                        raise TimeoutError("out of time")
                    set_fold(model, on)
                    r = bench_model(model, prompt_len=64, gen_len=8 if tiny else 128, batch_size=b,
                                    repeats=1 if tiny else 2)
                    key = f"decode b{b} {'folded' if on else 'unfolded'}"
                    res.setdefault(key, []).append(r["decode_tok_s"])
                    log(f"  {key:26s} {r['decode_tok_s']:8.1f} tok/s/seq {r['decode_ms_per_step']:.3f} ms")
    except Exception as e:
        r7.err_line("model", e)
    finally:
        set_fold(model, True)
    log("## summary")
    for k, v in res.items():
        log(f"  {k:26s} " + ", ".join(f"{x:.4g}" for x in v) + f"  median {sorted(v)[len(v) // 2]:.4g}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--budget-s", type=float, default=300.0)
    args = ap.parse_args()
    from mamba2_cli.kernels import step

    if not hasattr(step, "FOLD_DECODE"):
        log("the folded decode layer was taken out after round 15 (slower: benchmarks/NOTES.md, session 4)")
        return
    dev, model = r7.setup(15, args.tiny)
    r7.T0 = T0
    r7.run_phases((("check", lambda: check(model, dev, args.tiny)),
                   ("layer", lambda: layer(model, dev, args.tiny)),
                   ("profile", lambda: profile(model, dev, args.tiny)),
                   ("model", lambda: model_ab(model, dev, args.tiny, args.budget_s))))


if __name__ == "__main__":
    main()
