"""GPU round 12 (session 4): where a 65k prefill's wall time goes beyond its kernels, and
whether the decode step can overlap the z part of in_proj in a CUDA graph.

    PYTHONPATH=src python3 benchmarks/gpu_round12.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round12.py --tiny  # CPU: runs

  trace    prefill of 65536 tokens under torch.profiler: wall time, kernel time, the idle
           intervals between kernels (largest first, with the kernels around them), kernel
           time by name, and the SM clock and power sampled by nvidia-smi meanwhile
  fork     64 layers in one graph: the mixer step and a z-shaped matvec (8192 x 4096) one
           after the other, and on two captured streams (fork/join), in both launch orders
Lines go to stdout and $OUT/round12.txt.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round12.txt"
log = r7.log


def trace(model, dev, tiny):
    from torch.profiler import ProfilerActivity, profile

    from mamba2_cli.generate import owned_state

    L = 256 if tiny else 65536
    ids = torch.randint(3, model.cfg.vocab_size, (1, L))
    state = owned_state(model, 1)
    for _ in range(2):
        log(f"  prefill {L} untraced: {r7.timed_prefill(model, ids, state, dev):.4f} s")
    smi = None
    if dev.type == "cuda":
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu",
                                "--format=csv,noheader", "-lms", "50"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        wall = r7.timed_prefill(model, ids, state, dev)
    if smi is not None:
        time.sleep(0.2)
        smi.terminate()
        samples = [ln.strip() for ln in smi.communicate()[0].splitlines() if ln.strip()]
        log(f"  nvidia-smi samples (sm clock, mem clock, power, temp), {len(samples)}: "
            + " | ".join(samples[:: max(1, len(samples) // 24)]))
    log(f"  prefill {L} traced: {wall:.4f} s")
    from torch.autograd import DeviceType

    kern = []
    for e in prof.events():
        if getattr(e, "device_type", None) == DeviceType.CUDA and e.time_range.end > e.time_range.start:
            kern.append((e.time_range.start, e.time_range.end, e.name))
    if not kern:
        log("  no device events")
        return
    kern.sort()
    busy = sum(b - a for a, b, _ in kern)
    span = kern[-1][1] - kern[0][0]
    gaps = []
    end, prev = kern[0][1], kern[0][2]
    for a, b, name in kern[1:]:
        if a > end:
            gaps.append((a - end, prev, name, a - kern[0][0]))
        if b > end:
            end, prev = b, name
    gaps.sort(reverse=True)
    log(f"  {len(kern)} kernels: busy {busy / 1e3:.1f} ms over a span of {span / 1e3:.1f} ms; "
        f"idle {sum(g[0] for g in gaps) / 1e3:.1f} ms in {len(gaps)} gaps "
        f"(> 20 us: {sum(g[0] for g in gaps if g[0] > 20) / 1e3:.1f} ms in {sum(1 for g in gaps if g[0] > 20)})")
    for g, a, b, at in gaps[:12]:
        log(f"    gap {g:9.1f} us at {at / 1e3:8.1f} ms after {a[:50]} before {b[:50]}")
    by: dict = {}
    for a, b, name in kern:
        n = name if len(name) <= 60 else name[:57] + "..."
        t, c = by.get(n, (0.0, 0))
        by[n] = (t + b - a, c + 1)
    for n, (t, c) in sorted(by.items(), key=lambda kv: -kv[1][0])[:10]:
        log(f"    {t / 1e3:9.1f} ms {c:6d} calls {t / c:9.1f} us/call  {n}")
    # The first and the last tenth of the run: the same kernels slower late means the clock fell.
    cut = len(kern) // 10
    for label, part in (("first tenth", kern[:cut]), ("last tenth", kern[-cut:])):
        mm = [b - a for a, b, n in part if "nvjet" in n or "gemm" in n.lower() or "sm90" in n]
        if mm:
            log(f"    matmuls in the {label}: {len(mm)} calls, mean {sum(mm) / len(mm):.1f} us")
    cpu_top = sorted(((e.cpu_time_total, e.key, e.count) for e in prof.key_averages()
                      if e.cpu_time_total > 0), reverse=True)[:8]
    for t, k, c in cpu_top:
        log(f"    host {t / 1e3:9.1f} ms {c:6d} calls  {k[:60]}")


def fork(model, dev, tiny):
    from mamba2_cli.kernels import gemv, step

    cfg = model.cfg
    layers = model.backbone.layers[: (2 if tiny else 64)]
    di = cfg.d_inner
    st = model.new_state(1)
    h = torch.randn(1, cfg.d_model, device=dev).to(model.dtype)
    zx = [gemv.linear(h, lay.mixer.in_proj.weight) for lay in layers]
    wz = [lay.mixer.in_proj.weight[:di] for lay in layers]
    zout = [torch.empty(1, di, device=dev, dtype=model.dtype) for _ in layers]

    def do_step(i):
        m = layers[i].mixer
        step.mixer_decode_step(zx[i], m.conv_weight, m.conv1d.bias, st.conv[i], m.A, m.D, m.dt_bias, cfg.dt_limit,
                               m.norm.weight, st.ssm[i], cfg.ngroups, cfg.layer_norm_epsilon, cfg.norm_before_gate)

    def do_z(i):
        zout[i].copy_(gemv.linear(h, wz[i]))

    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    def body(mode):
        def run():
            for i in range(len(layers)):
                if mode == "step":
                    do_step(i)
                elif mode == "z":
                    do_z(i)
                elif mode == "seq":
                    do_step(i)
                    do_z(i)
                else:  # fork: the second op on the side stream, joined at the end of the layer
                    main = torch.cuda.current_stream(dev)
                    side.wait_stream(main)
                    first, second = (do_step, do_z) if mode == "fork step first" else (do_z, do_step)
                    if mode == "fork z side":
                        with torch.cuda.stream(side):
                            do_z(i)
                        do_step(i)
                    else:
                        first(i)
                        with torch.cuda.stream(side):
                            second(i)
                    main.wait_stream(side)
        return run

    modes = ["step", "z", "seq", "fork step first", "fork z first", "fork z side"]
    res = {}
    for rep in range(1 if tiny else 3):
        for mode in modes:
            if dev.type != "cuda":
                if "fork" in mode:
                    continue
                t0 = time.perf_counter()
                body(mode)()
                res.setdefault(mode, []).append((time.perf_counter() - t0) * 1e6 / len(layers))
                continue
            fn = body(mode)
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream(dev).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            ms = r7.graph_ms(g.replay, dev, reps=100)
            res.setdefault(mode, []).append(ms * 1e3 / len(layers))
    for mode, v in res.items():
        log(f"  {mode:18s} " + ", ".join(f"{x:6.2f}" for x in v) + f"  us per layer (min {min(v):.2f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    dev, model = r7.setup(12, args.tiny)
    skip = set(args.skip.split(","))
    with torch.inference_mode():
        for name, fn in (("fork", fork), ("trace", trace)):
            if name in skip:
                continue
            log(f"## {name} ({time.time() - T0:.0f} s)")
            try:
                fn(model, dev, args.tiny)
            except Exception as e:
                r7.err_line(name, e)
    log(f"## done in {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
