"""GPU round 10 (session 3): the row-walking conv, and matvec configurations per weight shape.

    PYTHONPATH=src python3 benchmarks/gpu_round10.py [--budget-s 420]       # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round10.py --tiny  # CPU: runs

  conv    causal_conv1d at 4096 Codestral tokens: the tile kernel against ROWS_LOOP forms
  matvec  each weight shape of a decode step (in_proj, out_proj, lm_head) at 1 and 8 rows, the
          products of all 64 layers (own weights, so nothing stays in L2) in one CUDA graph
  model   alternated A/B: prefill 65536 with the best conv; decode b1/b8 with the best matvec
          per shape (GEMV_SHAPE_CONFIG: measured no gain and taken out, so this part now
          reports that and is skipped)
Lines go to stdout and $OUT/round10.txt.
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
BEST: dict = {}

r7.LOG_NAME = "round10.txt"
log = r7.log


def conv_sweep(dev, tiny, deadline):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import conv

    M, CD, DI = (64, 192, 128) if tiny else (4096, 10240, 8192)
    IN = 2 * DI + (CD - DI) + 8
    dtype = torch.float16 if tiny else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    zx = torch.randn(1, M, IN, generator=g, device=dev).to(dtype)
    xBC = zx[..., DI:DI + CD]
    cw = torch.randn(CD, 4, generator=g, device=dev).to(dtype)
    cb = torch.randn(CD, generator=g, device=dev).to(dtype)
    cs0 = torch.randn(1, CD, 3, generator=g, device=dev).to(dtype)
    cs = cs0.clone()
    tbps = kb.copy_bandwidth(dev) / 1e12 if dev.type == "cuda" else float("nan")
    nbytes = M * CD * 2 * 2
    base = dict(conv.CONV_CONFIG)
    variants = [{}] + [{"ROWS_LOOP": True, "ROWS": r, "ROWS_BLOCK_C": c, "ROWS_WARPS": w}
                       for r, c, w in ((32, 256, 2), (32, 256, 1), (16, 256, 2), (64, 256, 2), (32, 512, 4),
                                       (32, 128, 1), (16, 512, 4), (64, 128, 1), (32, 1024, 4), (8, 512, 2))]
    ref, rows = None, []
    for kw in variants:
        if time.time() - T0 > deadline:
            break
        conv.CONV_CONFIG.clear()
        conv.CONV_CONFIG.update({**base, **kw})

        def call():
            cs.copy_(cs0)
            return conv.causal_conv1d(xBC, cw, cb, cs)

        try:
            out = call()
            got = (out.clone(), cs.clone())
            e = 0.0 if ref is None else max(r7.rel_err(a, b) for a, b in zip(got, ref))
            ref = ref or got
            ms = kb.time_ms(call, dev)
            gbs = nbytes / (ms * 1e-3) / 1e12
            flag = "" if e < 1e-3 else "  WRONG"
            log(f"  conv {str(kw):80s} {ms * 1e3:7.1f} us {gbs:5.2f} TB/s {gbs / tbps:6.1%} of copy err {e:.1e}{flag}")
            if not flag:
                rows.append((ms, kw))
        except Exception as ex:
            r7.err_line(f"conv {kw}", ex)
    conv.CONV_CONFIG.clear()
    conv.CONV_CONFIG.update(base)
    if rows:
        BEST["conv"] = min(rows, key=lambda r: r[0])
        log(f"  -> best conv {BEST['conv'][1]} {BEST['conv'][0] * 1e3:.1f} us")


def matvec_sweep(model, dev, tiny, deadline):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import gemv

    C = gemv.GemvConfig
    tbps = kb.copy_bandwidth(dev) / 1e12 if dev.type == "cuda" else float("nan")
    layers = model.backbone.layers
    shapes = {"in_proj": [l.mixer.in_proj.weight for l in layers],
              "out_proj": [l.mixer.out_proj.weight for l in layers],
              "lm_head": [model.lm_head.weight] * (2 if tiny else 16)}
    v1 = [gemv.GEMV_CONFIG[1], C("acc", 1, 1024, 4), C("acc", 1, 2048, 4), C("acc", 4, 1024, 4), C("acc", 2, 512, 4),
          C("acc", 2, 2048, 8), C("acc", 2, 1024, 4, evict_first=True), C("acc", 2, 1024, 2), C("acc", 4, 512, 2),
          C("acc", 2, 1024, 4, prefetch=True), C("acc", 8, 512, 4), C("acc", 4, 1024, 8), C("acc", 1, 4096, 8)]
    v8 = [gemv.GEMV_CONFIG[8], C("dot", 32, 256, 4, num_stages=4, evict_first=True),
          C("dot", 64, 128, 4, num_stages=6, evict_first=True), C("dot", 128, 128, 8, num_stages=4, evict_first=True),
          C("dot", 64, 512, 4, num_stages=3, evict_first=True), C("dot", 32, 512, 4, num_stages=4, evict_first=True),
          C("dot", 64, 256, 8, num_stages=4, evict_first=True), C("dot", 16, 512, 4, num_stages=4, evict_first=True)]
    for rows, variants in ((1, v1), (8, v8)):
        for name, ws in shapes.items():
            x = torch.randn(rows, ws[0].shape[1], device=dev, dtype=ws[0].dtype)
            nbytes = sum(w.numel() * w.element_size() for w in ws)
            res = []
            ref = None
            for cfg in variants:
                if time.time() - T0 > deadline:
                    log("  matvec: out of time")
                    return
                try:
                    def fn():
                        return [gemv.gemv(x, w, config=cfg) for w in ws]

                    out = fn()[0]
                    e = 0.0 if ref is None else r7.rel_err(out, ref)
                    ref = out if ref is None else ref
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            fn()
                        ms = kb.time_ms(graph.replay, dev, clear_cache=False) / len(ws)
                        del graph
                    else:
                        ms = float("nan")
                    share = nbytes / len(ws) / (ms * 1e-3) / 1e12 / tbps
                    flag = "" if e < 2e-2 else "  WRONG"
                    log(f"  matvec {rows}r {name:8s} {cfg.name:32s} {ms * 1e3:8.2f} us  {share:6.1%} of copy  err {e:.1e}{flag}")
                    if not flag:
                        res.append((ms, cfg))
                except Exception as ex:
                    r7.err_line(f"matvec {rows}r {name} {cfg.name}", ex)
            if res:
                best = min(res, key=lambda r: r[0])
                BEST[(rows, name)] = (best[0], best[1], tuple(ws[0].shape))
                log(f"  -> best {rows}r {name}: {best[1].name} {best[0] * 1e3:.2f} us (default {res[0][0] * 1e3:.2f})")


def model_ab(model, dev, tiny, deadline):
    from mamba2_cli.bench import bench_model
    from mamba2_cli.generate import owned_state
    from mamba2_cli.kernels import conv, gemv

    conv_base = dict(conv.CONV_CONFIG)
    shape_cfg = {}
    for key, (ms, cfg, shape) in ((k, v) for k, v in BEST.items() if isinstance(k, tuple)):
        rows, _ = key
        shape_cfg[(rows, shape[0], shape[1])] = cfg
    log(f"  candidates: conv {BEST.get('conv', (0, {}))[1]}; matvec per shape "
        + ", ".join(f"{k}: {v.name}" for k, v in shape_cfg.items()))

    def fresh():
        r7.drop_graphs(model)

    res: dict = {}
    try:
        if not hasattr(gemv, "GEMV_SHAPE_CONFIG"):
            raise RuntimeError("per-shape matvec configurations were taken out after this round (no gain)")
        for rep in range(1 if tiny else 2):
            for b in (1, 8):
                for on in (False, True):
                    if time.time() - T0 > deadline * 0.75:
                        raise TimeoutError("decode: out of time")
                    gemv.GEMV_SHAPE_CONFIG.clear()
                    if on:
                        gemv.GEMV_SHAPE_CONFIG.update(shape_cfg)
                    fresh()
                    r = bench_model(model, prompt_len=64, gen_len=8 if tiny else 128, batch_size=b,
                                    repeats=1 if tiny else 2)
                    name = f"decode b{b} {'matvec per shape' if on else 'defaults'}"
                    res.setdefault(name, []).append(r["decode_tok_s"])
                    log(f"  {name:34s} {r['decode_tok_s']:8.1f} tok/s/seq")
    except Exception as e:
        r7.err_line("decode", e)
    finally:
        getattr(gemv, "GEMV_SHAPE_CONFIG", {}).clear()
        fresh()
    L = 256 if tiny else 65536
    ids = torch.randint(3, model.cfg.vocab_size, (1, L))
    state = owned_state(model, 1)

    def pf(on):
        conv.CONV_CONFIG.clear()
        conv.CONV_CONFIG.update(conv_base)
        if on and "conv" in BEST:
            conv.CONV_CONFIG.update(BEST["conv"][1])
        return r7.timed_prefill(model, ids, state, dev)

    try:
        pf(True)
        for rep in range(1 if tiny else 3):
            for on in (False, True):
                if time.time() - T0 > deadline:
                    raise TimeoutError("prefill: out of time")
                t = pf(on)
                name = f"prefill {L} {'best conv' if on else 'defaults'}"
                res.setdefault(name, []).append(t)
                log(f"  {name:34s} {t:.4f} s")
    except Exception as e:
        r7.err_line("prefill", e)
    finally:
        conv.CONV_CONFIG.clear()
        conv.CONV_CONFIG.update(conv_base)
    log("## summary")
    for k, v in res.items():
        log(f"  {k:34s} " + ", ".join(f"{x:.4g}" for x in v) + f"  median {sorted(v)[len(v) // 2]:.4g}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420.0)
    args = ap.parse_args()
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    log(f"# round 10 on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    import gpu_round5 as r5

    r5.log = lambda m="": log(m)
    with torch.inference_mode():
        log(f"## conv ({time.time() - T0:.0f} s)")
        conv_sweep(dev, args.tiny, args.budget_s * 0.15)
        model = r5.load_model(dev, args.tiny)
        log(f"## matvec ({time.time() - T0:.0f} s)")
        matvec_sweep(model, dev, args.tiny, args.budget_s * 0.55)
        log(f"## model ({time.time() - T0:.0f} s)")
        model_ab(model, dev, args.tiny, args.budget_s)
    log(f"## best {BEST}")
    log(f"## done in {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
