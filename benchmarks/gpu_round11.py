"""GPU round 11 (session 4): prefetch the next weight into L2 while latency-bound kernels run.

    PYTHONPATH=src python3 benchmarks/gpu_round11.py [--budget-s 480]        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round11.py --tiny  # CPU: runs

  check    decode logits and states with each prefetch setting against none, eager and graph:
           prefetches must change nothing, bit for bit
  profile  kernel times per decode token (CUPTI, graph replay) without and with the prefetch
  model    decode b1 and b8 tok/s for each setting of prefetch.PREFETCH, alternated with none
Lines go to stdout and $OUT/round11.txt.

Measured slower (benchmarks/NOTES.md, session 4) and taken out: without kernels/prefetch.py
this script says so and stops.
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
MB = 1 << 20
r7.LOG_NAME = "round11.txt"
log = r7.log

B1 = [("none", {}), ("out 8M", {"out_proj": 8 * MB}), ("out 16M", {"out_proj": 16 * MB}),
      ("out 24M", {"out_proj": 24 * MB}), ("out 32M", {"out_proj": 32 * MB}), ("out 48M", {"out_proj": 48 * MB}),
      ("out 16M late", {"out_proj": 16 * MB, "late": True}), ("out 32M late", {"out_proj": 32 * MB, "late": True}),
      ("in 8M", {"in_proj": 8 * MB}), ("in 16M", {"in_proj": 16 * MB}),
      ("out 24M in 8M", {"out_proj": 24 * MB, "in_proj": 8 * MB}),
      ("out 32M in 16M", {"out_proj": 32 * MB, "in_proj": 16 * MB})]
B8 = [("none", {}), ("out 16M", {"out_proj": 16 * MB}), ("out 32M", {"out_proj": 32 * MB}),
      ("out 32M in 8M", {"out_proj": 32 * MB, "in_proj": 8 * MB}), ("in 16M", {"in_proj": 16 * MB})]


def set_pf(kw: dict) -> None:
    from mamba2_cli.kernels import prefetch

    prefetch.PREFETCH.update({"out_proj": 0, "in_proj": 0, "late": False})
    prefetch.PREFETCH.update(kw)


fresh = r7.drop_graphs


def check(model, dev, tiny):
    """Each setting against none: the same logits and states, bit for bit, eager and in a graph."""
    from mamba2_cli.generate import decode_step_fn, prefill

    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, V, (1, 16), generator=g)
    toks = torch.randint(3, V, (6,), generator=g).to(dev)
    for b, variants in ((1, B1), (8, B8)):
        st0 = model.new_state(b)
        prefill(model, prompt.expand(b, -1).contiguous(), st0)
        runs = {}
        for name, kw in variants[:3] + variants[-2:]:
            for graph in (False, True) if dev.type == "cuda" else (False,):
                set_pf(kw)
                fresh(model)
                st = model.new_state(b)
                st.ssm.copy_(st0.ssm)
                st.conv.copy_(st0.conv)
                fn = decode_step_fn(model, st, cuda_graph=graph)
                outs = [fn(t.expand(b).contiguous()).clone() for t in toks]
                runs[(name, graph)] = (torch.stack(outs), st.ssm.clone(), st.conv.clone())
        set_pf({})
        fresh(model)
        for (name, graph), got in runs.items():
            ref = runs[("none", graph)]
            same = all(torch.equal(a, r) for a, r in zip(got, ref))
            log(f"  check b{b} {name:16s} {'graph' if graph else 'eager'}: "
                f"{'identical' if same else 'DIFFERENT %.2e' % max(r7.rel_err(a, r) for a, r in zip(got, ref))}")


def profile(model, dev, tiny):
    from mamba2_cli.generate import decode_step_fn, owned_state

    if dev.type != "cuda":
        return
    for name, kw in (B1[0], B1[3], B1[10]):
        set_pf(kw)
        fresh(model)
        st = owned_state(model, 1)
        tok = torch.randint(3, model.cfg.vocab_size, (1,), device=dev)
        graph = decode_step_fn(model, st, cuda_graph=True)
        graph(tok)
        agg = r7.kernel_times(lambda: graph(tok), dev, 20)
        ms = r7.graph_ms(lambda: graph(tok), dev)
        r7.print_times(f"decode b1 graph, prefetch {name}: replay {ms * 1e3:.1f} us", agg, top=8)
    set_pf({})
    fresh(model)


def model_ab(model, dev, tiny, deadline):
    from mamba2_cli.bench import bench_model

    res: dict = {}
    try:
        for rep in range(1 if tiny else 2):
            for b, variants in ((1, B1), (8, B8)):
                for name, kw in variants:
                    if time.time() - T0 > deadline:
                        raise TimeoutError("out of time")
                    set_pf(kw)
                    fresh(model)
                    r = bench_model(model, prompt_len=64, gen_len=8 if tiny else 128, batch_size=b,
                                    repeats=1 if tiny else 2)
                    key = f"decode b{b} {name}"
                    res.setdefault(key, []).append(r["decode_tok_s"])
                    log(f"  {key:34s} {r['decode_tok_s']:8.1f} tok/s/seq {r['decode_ms_per_step']:.3f} ms")
    except Exception as e:
        r7.err_line("model", e)
    finally:
        set_pf({})
        fresh(model)
    log("## summary")
    for k, v in res.items():
        log(f"  {k:34s} " + ", ".join(f"{x:.4g}" for x in v) + f"  best {max(v):.4g}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--budget-s", type=float, default=480.0)
    args = ap.parse_args()
    import importlib.util

    if importlib.util.find_spec("mamba2_cli.kernels.prefetch") is None:
        log("the L2 prefetch was taken out after round 11 (slower: benchmarks/NOTES.md, session 4)")
        return
    dev, model = r7.setup(11, args.tiny)
    r7.T0 = T0
    r7.run_phases((("check", lambda: check(model, dev, args.tiny)),
                   ("profile", lambda: profile(model, dev, args.tiny)),
                   ("model", lambda: model_ab(model, dev, args.tiny, args.budget_s))))


if __name__ == "__main__":
    main()
