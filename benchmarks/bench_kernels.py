"""GPU checks, timings and config sweeps of the triton backend's kernels (issue 3), one Codestral layer.

    PYTHONPATH=src python3 benchmarks/bench_kernels.py [--sweep] [--out DIR]

Shapes: H 128, P 64, G 8, N 128, conv width 4, bf16 inputs, fp32 states. Prints a short
table: the ceilings (device copy bandwidth, bf16 matmul FLOP/s), SSD prefill per config and
length, the fused decode step (batch 1 inside a CUDA graph of 64 layers; batch 64 as a share
of copy bandwidth), and the norms / conv against the torch reference. Inputs, FLOP and byte
counts, ceilings and the timer (medians of CUDA events, L2 cleared before each call) come
from `mamba2_cli.kernel_bench`, which `mamba2 bench` reports from too; this script adds the
triton-only config sweeps. `--device cpu --shape tiny --dtype float32` runs it in Triton's
CPU interpreter (TRITON_INTERPRET=1): a smoke test whose times mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

from mamba2_cli import kernel_bench as kb
from mamba2_cli.kernel_bench import rel_err, state_bytes, time_ms

S = kb.SHAPES["codestral"]  # main() may change these three
DEV = torch.device("cuda")
DTYPE = torch.bfloat16
ROWS: list[dict] = []
# The times upstream's kernels or this project's targets give for Codestral (ANCHORS.md, NOTES.md), ms.
SSD_TARGET_MS = {(1, 16384): 0.80, (1, 4096): 0.30, (8, 4096): 1.70}


def bench(fn):
    return time_ms(fn, DEV)


def row(section, what, ms, **extra):
    r = {"section": section, "what": what, "ms": ms, **extra}
    ROWS.append(r)
    tail = " ".join(f"{k}={v}" for k, v in extra.items())
    print(f"{section:8s} {what:58s} {ms * 1e3:10.1f} us  {tail}", flush=True)


def ceilings():
    bw = kb.copy_bandwidth(DEV)
    nbytes = 1 << 30 if DEV.type == "cuda" else 256 << 20
    row("ceiling", f"device copy {nbytes >> 20} MiB (read + write)", 2 * nbytes / bw * 1e3, TBps=round(bw / 1e12, 3))
    flop_s, n = kb.matmul_ceiling(DEV, DTYPE)
    row("ceiling", f"matmul {n}^3 {str(DTYPE).removeprefix('torch.')}", 2 * n**3 / flop_s * 1e3,
        TFLOPs=round(flop_s / 1e12, 1))
    return bw / 1e12


def ssd_inputs(b, L, seed=0):
    return kb.ssd_inputs(S, b, L, DEV, DTYPE, seed)


def run_ssd(fn, inp, **kw):
    return kb.run_ssd(fn, inp, S.chunk, **kw)


def _c(CHUNK=64, BLOCK_P=64, num_warps=8, num_stages=3, CB_PRECOMPUTED=True, PREFETCH=0, STATE_T=True,
       D_IN_SCORES=True, FOLD_DECAY=False, maxnreg=None):
    return dict(CHUNK=CHUNK, BLOCK_P=BLOCK_P, num_warps=num_warps, num_stages=num_stages,
                CB_PRECOMPUTED=CB_PRECOMPUTED, PREFETCH=PREFETCH, STATE_T=STATE_T, D_IN_SCORES=D_IN_SCORES,
                FOLD_DECAY=FOLD_DECAY, maxnreg=maxnreg)


SSD_CONFIGS = [
    _c(PREFETCH=1),  # the default after round 2
    _c(PREFETCH=1, num_stages=2),
    _c(PREFETCH=1, BLOCK_P=32, num_warps=4, num_stages=2),
    _c(PREFETCH=1, BLOCK_P=32, num_warps=4, num_stages=3),
    _c(PREFETCH=1, BLOCK_P=64, num_warps=4, num_stages=2),
    _c(PREFETCH=1, STATE_T=False),
    _c(PREFETCH=1, D_IN_SCORES=False),
    _c(PREFETCH=1, STATE_T=False, D_IN_SCORES=False),
    _c(PREFETCH=1, FOLD_DECAY=True),
    _c(CHUNK=32, BLOCK_P=32, num_warps=4, PREFETCH=1, STATE_T=False, D_IN_SCORES=False),
    _c(CHUNK=32, BLOCK_P=64, num_warps=4, PREFETCH=1, STATE_T=False, D_IN_SCORES=False),
    _c(CHUNK=32, BLOCK_P=32, num_warps=4, STATE_T=False, D_IN_SCORES=False),  # round 2's best plain
]


def compiled_stats(fn):
    """(registers, spills) of the kernel `fn` compiled last, where Triton exposes them."""
    try:
        for cache in fn.device_caches.values():
            kernels = list(cache[0].values())
            if kernels:
                k = kernels[-1]
                return f"r{k.n_regs}/s{k.n_spills}"
    except Exception:
        pass
    return "?"


def cfg_name(c):
    flags = "".join(f for f, on in (("T", c["STATE_T"]), ("D", c["D_IN_SCORES"]), ("F", c["FOLD_DECAY"])) if on)
    return "Q{CHUNK} p{BLOCK_P} w{num_warps} s{num_stages} {cb} pf{PREFETCH} {flags}{r}".format(
        cb="cb" if c["CB_PRECOMPUTED"] else "inl", flags=flags, r=f" r{c['maxnreg']}" if c["maxnreg"] else "", **c)


def bench_ssd(sweep: bool, deadline: float):
    from mamba2_cli.kernels import ssd, torch_ref

    shapes = [(b, L, SSD_TARGET_MS.get((b, L))) for b, L in S.prefill]
    # The case that picks the best config: the longest batch-1 prompt (L16384 for Codestral).
    key = max(range(len(shapes)), key=lambda i: (shapes[i][0] == 1, shapes[i][1]))
    inputs = {s[:2]: ssd_inputs(*s[:2], seed=s[1]) for s in shapes}
    # Correctness anchor on the first case: torch reference (fp32 einsum path) vs each config.
    b0, L0 = shapes[0][:2]
    inp = inputs[(b0, L0)]
    ref_in = {k: (v.float() if v.dtype != torch.float32 and v.is_floating_point() else v) for k, v in inp.items()}
    y_ref, s_ref = run_ssd(torch_ref.ssd_prefill, ref_in)
    ms = bench(lambda: run_ssd(torch_ref.ssd_prefill, ref_in))
    row("ssd", f"torch_ref fp32, b{b0} L{L0}", ms)
    configs = SSD_CONFIGS if sweep else [None]
    results = {}
    for cfg in configs:
        if time.time() > deadline:
            print("ssd sweep: out of time, stopping", flush=True)
            break
        name = cfg_name(cfg) if cfg else "default"
        try:
            y, s = run_ssd(ssd.ssd_prefill, inp, config=cfg)
            err = max(rel_err(y, y_ref), rel_err(s, s_ref))
            times = []
            for b, L, target in shapes:
                ms = bench(lambda: run_ssd(ssd.ssd_prefill, inputs[(b, L)], config=cfg))
                times.append(ms)
                row("ssd", f"{name} b{b} L{L}", ms, err=f"{err:.1e}", target_ms=target,
                    TFLOPs=round(kb.ssd_flops(S, b, L) / (ms * 1e-3) / 1e12, 1),
                    GBps=round(kb.ssd_bytes(S, b, L, DTYPE.itemsize) / (ms * 1e-3) / 1e9),
                    regs=compiled_stats(ssd._ssd_scan_kernel))
            results[name] = (times, cfg)
        except Exception as e:  # a config that does not compile or fit: report, keep going
            print(f"ssd {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    for i, (b, L, target) in enumerate(shapes):
        if not results:
            break
        name, (times, _) = min(results.items(), key=lambda kv: kv[1][0][i])
        tail = f" (target {target * 1e3:.0f} us)" if target else ""
        print(f"ssd      best b{b} L{L}: {name}: {times[i] * 1e3:.1f} us{tail}", flush=True)
    best = [min(results.values(), key=lambda r: r[0][key])] if results else []
    best = [(t[key], c) for t, c in best]
    # Where the time goes, for the best config: the C B^T pre-pass alone.
    if best and best[0][1]:
        cfg = best[0][1]
        if cfg["CB_PRECOMPUTED"]:
            import triton

            bk, Lk = shapes[key][:2]
            Bm, Cm = inputs[(bk, Lk)]["B"], inputs[(bk, Lk)]["C"]
            nch = math.ceil(Lk / cfg["CHUNK"])
            cb = torch.empty((bk, nch, S.ngroups, cfg["CHUNK"], cfg["CHUNK"]), device=DEV)

            def cb_only():
                ssd._chunk_cb_kernel[(bk * nch * S.ngroups,)](
                    Cm, Bm, cb, Lk, S.d_state, nch, S.ngroups, Cm.stride(0), Cm.stride(1), Cm.stride(2),
                    Bm.stride(0), Bm.stride(1), Bm.stride(2), CHUNK=cfg["CHUNK"],
                    BLOCK_N=min(triton.next_power_of_2(S.d_state), 128),
                    DOT_PRECISION="tf32" if DTYPE != torch.float32 else "ieee", **ssd.CB_CONFIG)
            row("ssd", f"  of which C B^T pre-pass (Q{cfg['CHUNK']}) b{bk} L{Lk}", bench(cb_only))
    return [c for _, c in best]


def mixer_layers(nlayers, b, seed=0):
    return kb.mixer_layers(S, nlayers, b, DEV, DTYPE, seed)


def call_mixer(fn, st, **kw):
    return kb.call_mixer(fn, st, S.ngroups, **kw)


def timed_layers(fn, layers):
    """ms per layer of one decode step through `layers`: a CUDA graph on GPUs, an eager loop elsewhere."""
    if DEV.type == "cuda":
        graph = kb.graph_of(fn, layers, S.ngroups)
        ms = bench(graph.replay) / len(layers)
        del graph
        return ms, "CUDA graph"

    def loop():
        for st in layers:
            call_mixer(fn, st)
    return bench(loop) / len(layers), "eager loop"


def bench_decode(copy_tbps: float, sweep: bool):
    from mamba2_cli.kernels import step, torch_ref

    b_small, b_large = S.decode_batches
    layers = mixer_layers(S.decode_layers, b_small)
    # Correctness at batch 1 and 5 against the torch reference (fp32 copies), 3 steps.
    for b in (1, 5):
        st = mixer_layers(1, b, seed=b)[0]
        ref = {k: (v.float() if v.dtype != torch.float32 and v.is_floating_point() else v).clone()
               for k, v in st.items()}
        errs = []
        for _ in range(3):
            out = call_mixer(step.mixer_decode_step, st)
            out_ref = call_mixer(torch_ref.mixer_decode_step, ref)
            errs.append(max(rel_err(out, out_ref), rel_err(st["ssm_state"], ref["ssm_state"])))
        print(f"decode   check b{b}: max rel err {max(errs):.1e}", flush=True)

    variants = [dict(BLOCK_P=16, num_warps=2), dict(BLOCK_P=32, num_warps=4), dict(BLOCK_P=64, num_warps=4),
                dict(BLOCK_P=16, num_warps=4), dict(BLOCK_P=32, num_warps=2)]
    if not sweep:
        variants = [dict(step.STEP_CONFIG)]
    base = dict(step.STEP_CONFIG)
    best = None
    for v in variants:
        step.STEP_CONFIG.update(v)
        ms, how = timed_layers(step.mixer_decode_step, layers)
        row("decode", f"mixer step b{b_small}, {how} of {len(layers)} layers, {step_name(v)} (per layer)", ms,
            target_us=5.0, regs=compiled_stats(step._mixer_step_kernel))
        if best is None or ms < best[0]:
            best = (ms, v)
    step.STEP_CONFIG.update(base)
    ms = bench(lambda: call_mixer(step.mixer_decode_step, layers[0]))
    row("decode", f"mixer step b{b_small}, one call from Python, {step_name(base)}", ms)
    print(f"decode   best b{b_small}: {step_name(best[1])}: {best[0] * 1e3:.2f} us per layer (target 5 us)",
          flush=True)
    if sweep:
        try:
            ms, how = timed_layers(torch_ref.mixer_decode_step, layers[:8])
            row("decode", f"torch_ref mixer step b{b_small}, {how} (per layer)", ms)
        except Exception as e:
            print(f"torch_ref graph: {type(e).__name__}: {str(e)[:200]}", flush=True)

    st_large = mixer_layers(1, b_large, seed=b_large)[0]
    nbytes = state_bytes(S, b_large)
    best_large = None
    for v in variants:
        step.STEP_CONFIG.update(v)
        ms = bench(lambda: call_mixer(step.mixer_decode_step, st_large))
        share = nbytes / (ms * 1e-3) / 1e12 / copy_tbps
        row("decode", f"mixer step b{b_large} {step_name(v)}", ms, state_share_of_copy=f"{share:.1%}",
            target=">=85%", regs=compiled_stats(step._mixer_step_kernel))
        if best_large is None or ms < best_large[0]:
            best_large = (ms, v, share)
    step.STEP_CONFIG.update(base)
    print(f"decode   best b{b_large}: {step_name(best_large[1])}: {best_large[0] * 1e3:.1f} us, "
          f"{best_large[2]:.1%} of copy bandwidth", flush=True)
    return best, best_large


def step_name(v):
    return "p{BLOCK_P} w{num_warps}".format(**v)


def bench_misc():
    from mamba2_cli.kernels import conv, norm, torch_ref

    g = torch.Generator(device=DEV).manual_seed(1)
    L = S.long_len
    zxbcdt = torch.randn(1, L, S.in_proj, generator=g, device=DEV).to(DTYPE)
    z, xBC, _ = torch.split(zxbcdt, [S.d_inner, S.conv_dim, S.nheads], dim=-1)
    w = torch.randn(S.conv_dim, S.d_conv, generator=g, device=DEV).to(DTYPE)
    bias = torch.randn(S.conv_dim, generator=g, device=DEV).to(DTYPE)
    cs = torch.zeros(1, S.conv_dim, S.d_conv - 1, device=DEV, dtype=DTYPE)
    out_t = conv.causal_conv1d(xBC, w, bias, cs.clone())
    out_r = torch_ref.causal_conv1d(xBC, w, bias, cs.clone())
    print(f"misc     check causal_conv1d rel err {rel_err(out_t, out_r):.1e}", flush=True)
    base = dict(conv.CONV_CONFIG)
    for v in [dict(BLOCK_L=32, BLOCK_C=128, num_warps=4), dict(BLOCK_L=64, BLOCK_C=128, num_warps=4),
              dict(BLOCK_L=64, BLOCK_C=256, num_warps=8)]:
        conv.CONV_CONFIG.update(v)
        row("misc", f"causal_conv1d triton b1 L{L} " + "l{BLOCK_L} c{BLOCK_C} w{num_warps}".format(**v),
            bench(lambda: conv.causal_conv1d(xBC, w, bias, cs)))
    conv.CONV_CONFIG.update(base)
    row("misc", f"causal_conv1d torch_ref b1 L{L}", bench(lambda: torch_ref.causal_conv1d(xBC, w, bias, cs)))
    y = torch.randn(1, L, S.d_inner, generator=g, device=DEV).to(DTYPE)
    nw = torch.randn(S.d_inner, generator=g, device=DEV).to(DTYPE)
    gs = S.d_inner // S.ngroups
    o_t = norm.gated_rmsnorm(y, z, nw, gs, kb.EPS)
    o_r = torch_ref.gated_rmsnorm(y, z, nw, gs, kb.EPS)
    print(f"misc     check gated_rmsnorm rel err {rel_err(o_t, o_r):.1e}", flush=True)
    row("misc", f"gated_rmsnorm triton L{L}", bench(lambda: norm.gated_rmsnorm(y, z, nw, gs, kb.EPS)))
    row("misc", f"gated_rmsnorm torch_ref L{L}", bench(lambda: torch_ref.gated_rmsnorm(y, z, nw, gs, kb.EPS)))
    x = torch.randn(L, S.d_model, generator=g, device=DEV).to(DTYPE)
    res = torch.randn(L, S.d_model, generator=g, device=DEV)
    w2 = torch.randn(S.d_model, generator=g, device=DEV).to(DTYPE)
    row("misc", f"add_rmsnorm triton L{L} d{S.d_model}", bench(lambda: norm.add_rmsnorm(x, res, w2, kb.EPS)))
    row("misc", f"add_rmsnorm torch_ref L{L} d{S.d_model}", bench(lambda: torch_ref.add_rmsnorm(x, res, w2, kb.EPS)))
    x1, r1 = x[:1].contiguous(), res[:1].contiguous()
    row("misc", "add_rmsnorm triton b1 (decode, Python launch)", bench(lambda: norm.add_rmsnorm(x1, r1, w2, kb.EPS)))


def profile(cfg_json: str):
    """One warm-up and one measured launch of each hot kernel, for ncu."""
    from mamba2_cli.kernels import ssd, step

    cfg = json.loads(cfg_json) if cfg_json else {}
    inp = ssd_inputs(*S.prefill[0], seed=1)
    for _ in range(2):
        run_ssd(ssd.ssd_prefill, inp, config=cfg)
    for b in reversed(S.decode_batches):
        st = mixer_layers(1, b, seed=b)[0]
        for _ in range(2):
            call_mixer(step.mixer_decode_step, st)
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    global S, DEV, DTYPE
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="try every config, not only the defaults")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop the SSD sweep after this long")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", nargs="?", const="", default=None, metavar="SSD_CONFIG_JSON",
                    help="launch each hot kernel twice (for ncu) and exit")
    ap.add_argument("--ssd", default="", help="JSON of SSD config overrides for the run")
    ap.add_argument("--step", default="", help="JSON of STEP_CONFIG overrides for the run")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with TRITON_INTERPRET=1")
    ap.add_argument("--shape", default="codestral", choices=sorted(kb.SHAPES), help="layer shape (kernel_bench.SHAPES)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    S, DEV, DTYPE = kb.SHAPES[args.shape], torch.device(args.device), getattr(torch, args.dtype)
    from mamba2_cli.kernels import get_backend, ssd, step

    get_backend("triton", DEV.type)  # a clear message where the kernels cannot run
    if args.step:
        step.STEP_CONFIG.update(json.loads(args.step))
    if args.ssd:
        ssd.SCAN_CONFIG.update(json.loads(args.ssd))
    if args.profile is not None:
        return profile(args.profile)
    t0 = time.time()
    import triton

    if DEV.type == "cuda":
        props = torch.cuda.get_device_properties(DEV)
        device_name, where = props.name, f"{props.name}, {props.multi_processor_count} SMs"
    else:
        device_name = where = "cpu (Triton interpreter)"
    print(f"# {where}, torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today()}; "
          f"{S.name} layer: {S.describe()}, {args.dtype}", flush=True)
    tbps = ceilings()
    best_ssd = bench_ssd(args.sweep, t0 + args.budget_s)
    bench_decode(tbps, args.sweep)
    bench_misc()
    print(f"# total {time.time() - t0:.0f} s; best ssd configs: {best_ssd}", flush=True)
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump({"device": device_name, "shape": S.as_dict(), "dtype": args.dtype, "rows": ROWS}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
