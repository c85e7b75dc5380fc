"""GPU round 33 (session 8): a producer and its matvec in one launch (kernels/stream.py, taken out
after round 34; this script ran at 0127c6a, b18e631 and 38bd981 and needs that module).

    PYTHONPATH=src timeout 560 python3 benchmarks/gpu_round33.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round33.py --tiny  # CPU: runs

  layer  Codestral shapes at batch 1, each variant first checked against the unfused pair on the
         same inputs (three steps in a row, so the launch counters roll over), then timed per
         layer in CUDA graphs of 64 layers (each its own weights and state), alternated:
         the step + out_proj (mixer_decode_step, then gemv) against step_out's layouts;
         add_rmsnorm + in_proj (norm_linear) against norm_in's.
  model  decode at batch 1 (bench_model, 128-token prompt, 128 tokens) with STREAM_CONFIG's
         step_out / norm_in off and on, alternated; logits against the defaults' on the same tokens.
Lines go to stdout and $OUT/round33.txt.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402

r7.LOG_NAME = "round33.txt"
log = r7.log

# (P block, warps, rows per matvec program, sleep ns)
STEP_OUT_VARIANTS = [(16, 4, 2, 200), (16, 4, 1, 200), (16, 8, 1, 200), (16, 8, 2, 200), (32, 8, 2, 200),
                     (32, 8, 4, 200), (16, 4, 2, 0), (16, 4, 2, 1000)]
# (rows per program, warps, sleep ns)
NORM_IN_VARIANTS = [(2, 4, 200), (4, 4, 200), (2, 8, 200), (1, 4, 200), (2, 4, 0)]


def _graph(calls, dev):
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream(dev).wait_stream(side)
    torch.cuda.synchronize(dev)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return g


def _timed(label, variants, make_calls, n, dev, reps=3):
    """variants: name -> setup fn (sets switches, returns nothing); make_calls(name) -> list of
    n callables. Per-layer µs, alternated reps times; a summary line per variant."""
    res: dict = {}
    for _ in range(reps):
        for name in variants:
            try:
                g = _graph(make_calls(name), dev)
                us = r7.graph_ms(g.replay, dev, reps=30) * 1e3 / n
                del g
                res.setdefault(name, []).append(us)
            except Exception as e:
                r7.err_line(f"{label} {name}", e)
    for name, v in res.items():
        log(f"  summary {label} {name:24s} " + "/".join(f"{u:.2f}" for u in v) + f" us per layer (median {sorted(v)[len(v) // 2]:.2f})")
    return {name: sorted(v)[len(v) // 2] for name, v in res.items()}


def _name(v, keys):
    """A variant's name: its fields with their letters, "noacq" when the fifth (acquire) is off."""
    parts = [f"{k}{x}" for k, x in zip(keys, v[: len(keys)])]
    if len(v) > len(keys) and not v[len(keys)]:
        parts.append("noacq")
    return " ".join(parts)


def step_out_phase(dev, tiny, variants=STEP_OUT_VARIANTS):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import gemv, step, stream

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    G = s.ngroups
    n = 2 if tiny else 64
    layers = kb.mixer_layers(s, n, 1, dev, dtype, seed=5)
    gen = torch.Generator(device=dev).manual_seed(6)
    W = [(torch.randn(s.d_model, s.d_inner, generator=gen, device=dev) * 0.02).to(dtype) for _ in range(n)]

    def base(st, w):
        return gemv.linear(kb.call_mixer(step.mixer_decode_step, st, G), w)

    def variant(v):
        bp, warps, bn, sleep = v[:4]

        def f(st, w):
            stream.STREAM_CONFIG["sleep_ns"] = sleep
            stream.STREAM_CONFIG["acquire"] = v[4] if len(v) > 4 else True
            return kb.call_mixer(stream.step_out, st, G, out_weight=w, config={"BLOCK_P": bp, "num_warps": warps},
                                 block_n=bn, num_warps=warps)
        return f

    fns = {"unfused": base}
    fns.update({_name(v, ("p", "w", "n", "sleep")): variant(v) for v in variants})
    ref = None
    for name, f in fns.items():
        st = {k: t.clone() for k, t in layers[0].items()}
        outs = []
        try:
            for _ in range(3):
                outs.append(f(st, W[0]).float())
        except Exception as e:
            r7.err_line(f"step_out check {name}", e)
            continue
        got = (torch.stack(outs), st["ssm_state"], st["conv_state"])
        if ref is None:
            ref = got
            continue
        log(f"  check {name:24s} out rel err {r7.rel_err(got[0], ref[0]):.2e}, ssm state equal "
            f"{torch.equal(got[1], ref[1])} (rel {r7.rel_err(got[1], ref[1]):.1e}), conv state equal {torch.equal(got[2], ref[2])}")
    stream.STREAM_CONFIG["sleep_ns"], stream.STREAM_CONFIG["acquire"] = 200, True
    if dev.type != "cuda":
        return
    _timed("step+out_proj", fns, lambda name: [lambda st=st, w=w: fns[name](st, w) for st, w in zip(layers, W)], n, dev)
    stream.STREAM_CONFIG["sleep_ns"] = 200


def _whole_row_kernel():
    """gemv with stream.late_gemv's body but no waiting or counting: is the whole-row tile itself slow?"""
    import triton
    import triton.language as tl

    @triton.jit
    def whole_row(x_ptr, w_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :], mask=(rn < N)[:, None] & (rk < K)[None, :],
                    other=0.0)
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, tl.sum(w.to(tl.float32) * x[None, :], axis=1).to(y_ptr.dtype.element_ty), mask=rn < N)

    def call(x, w, bn, warps):
        import triton as tr

        y = torch.empty(1, w.shape[0], dtype=x.dtype, device=x.device)
        whole_row[(tr.cdiv(w.shape[0], bn),)](x, w, y, w.shape[0], w.shape[1], w.stride(0), BLOCK_N=bn,
                                              BLOCK_K=tr.next_power_of_2(w.shape[1]), num_warps=warps)
        return y
    return call


def norm_in_phase(dev, tiny, variants=NORM_IN_VARIANTS, alone=True):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import gemv, stream

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    n = 2 if tiny else 64
    gen = torch.Generator(device=dev).manual_seed(7)
    D = s.d_model
    ins = [dict(x=torch.randn(1, D, generator=gen, device=dev).to(dtype),
                res=torch.randn(1, D, generator=gen, device=dev),
                nw=(1 + 0.1 * torch.randn(D, generator=gen, device=dev)).to(dtype),
                W=(torch.randn(s.in_proj, D, generator=gen, device=dev) * 0.02).to(dtype)) for _ in range(n)]

    def base(a):
        return gemv.norm_linear(a["x"], a["res"], a["nw"], 1e-5, True, a["W"])

    def variant(v):
        bn, warps, sleep = v[:3]

        def f(a):
            stream.STREAM_CONFIG["sleep_ns"] = sleep
            stream.STREAM_CONFIG["acquire"] = v[3] if len(v) > 3 else True
            return stream.norm_in(a["x"], a["res"], a["nw"], 1e-5, True, a["W"], block_n=bn, num_warps=warps)
        return f

    fns = {"unfused": base}
    fns.update({_name(v, ("n", "w", "sleep")): variant(v) for v in variants})
    whole = _whole_row_kernel()
    for bn in (1, 2, 4) if alone else ():  # timing only (no norm): the gemv alone, and the whole-row tile alone
        fns["in_proj alone acc n2 (no norm)"] = lambda a: gemv.linear(a["x"], a["W"])
        fns[f"whole-row n{bn} w4 (no norm)"] = (lambda bn: lambda a: (whole(a["x"], a["W"], bn, 4), None))(bn)
    ref = None
    for name, f in fns.items():
        try:
            got = [f(ins[0]) for _ in range(3)]
        except Exception as e:
            r7.err_line(f"norm_in check {name}", e)
            continue
        if ref is None:
            ref = got
            continue
        if "no norm" in name:
            continue
        log(f"  check {name:24s} out rel err {max(r7.rel_err(g[0], r[0]) for g, r in zip(got, ref)):.2e}, "
            f"residual equal {all(torch.equal(g[1], r[1]) for g, r in zip(got, ref))}")
    stream.STREAM_CONFIG["sleep_ns"], stream.STREAM_CONFIG["acquire"] = 200, True
    if dev.type != "cuda":
        return
    _timed("norm+in_proj", fns, lambda name: [lambda a=a: fns[name](a) for a in ins], n, dev)
    stream.STREAM_CONFIG["sleep_ns"], stream.STREAM_CONFIG["acquire"] = 200, True


MODEL_CONFIGS = {"off": {}, "step_out": {"step_out": True}, "norm_in": {"norm_in": True},
                 "both": {"step_out": True, "norm_in": True}}


def model_variants(dev, tiny, configs, apply_cfg, batch=1):
    """model_phase on the random-weight model (loaded once) for a later round whose switches
    apply_cfg sets (rounds 34-38); the defaults come back (apply_cfg({})) whatever happens."""
    import gpu_round5 as r5

    r5.log = lambda m="": log(m)
    try:
        model_phase(r5.load_model(dev, tiny), dev, tiny, configs, apply_cfg, batch)
    finally:
        apply_cfg({})


def model_phase(model, dev, tiny, configs=MODEL_CONFIGS, apply_cfg=None, batch=1):
    from mamba2_cli.bench import bench_model

    import gpu_round5 as r5

    def apply(cfg):
        if apply_cfg is not None:
            apply_cfg(cfg)
        else:
            from mamba2_cli.kernels import stream

            stream.STREAM_CONFIG["step_out"] = bool(cfg.get("step_out"))
            stream.STREAM_CONFIG["norm_in"] = bool(cfg.get("norm_in"))
        r7.drop_graphs(model)

    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, model.cfg.vocab_size, (batch, 40 if tiny else 128), generator=g).to(dev)
    apply({})
    base = r5.model_check(model, batch, prompt, 8)
    for name, cfg in configs.items():
        if not cfg:
            continue
        apply(cfg)
        try:
            e, same = r5.compare_with_base(model, batch, prompt, 8, base)
            log(f"  model {name}: logits vs off on the same tokens {e:.2e}, argmax equal {same}/8")
        except Exception as ex:
            r7.err_line(f"model check {name}", ex)
    if dev.type != "cuda":
        apply({})
        return
    res: dict = {}
    for _ in range(3):
        for name, cfg in configs.items():
            apply(cfg)
            try:
                r1 = bench_model(model, prompt_len=128, gen_len=128, batch_size=batch, repeats=2)
                res.setdefault(name, []).append(r1["decode_tok_s"])
                log(f"  model {name}: b{batch} {r1['decode_tok_s']:.1f} tok/s")
            except Exception as e:
                r7.err_line(f"model {name}", e)
    apply({})
    for name, v in res.items():
        log(f"  summary model {name:10s} b{batch} " + "/".join(f"{x:.1f}" for x in v) + f" (median {sorted(v)[len(v) // 2]:.1f}) tok/s")


def main():
    def mp(dev, tiny):
        import gpu_round5 as r5

        r5.log = lambda m="": log(m)
        torch.cuda.empty_cache() if dev.type == "cuda" else None
        model_phase(r5.load_model(dev, tiny), dev, tiny)

    r7.round_main(33, lambda dev, tiny: [("step_out", lambda: step_out_phase(dev, tiny)),
                                         ("norm_in", lambda: norm_in_phase(dev, tiny)),
                                         ("model", lambda: mp(dev, tiny))])


if __name__ == "__main__":
    main()
