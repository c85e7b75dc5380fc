"""GPU round 18 (session 6): the 65k prefill with the scans on a second stream, and the conv's
launch order.

    PYTHONPATH=src python3 benchmarks/gpu_round18.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round18.py --tiny  # CPU: runs

  api      what this torch offers: the SM carveout for cuBLAS, green contexts, stream priorities
  conv     causal_conv1d at 4096 Codestral tokens: the row-walking kernel with its channel
           blocks launched first (ROWS_C_FIRST) against the default order
  matmul   in_proj + out_proj matmuls of a 4096-token piece, back to back for ~0.6 s per
           setting (the board at its power limit), with cuBLAS's SM carveout at 0-48 SMs,
           the SM clock and power sampled by nvidia-smi
  overlap  the same matmuls on the main stream while the scans of the same piece run on a
           second stream, against the two one after the other
  model    prefill of 65536 tokens: generate.prefill against overlap.prefill_overlapped
           (settings below), alternated; logits and states compared with the plain prefill's
Lines go to stdout and $OUT/round18.txt.

overlap.py was taken out after this round (no gain: benchmarks/NOTES.md "Session 6"), so the
model phase now stops at its import; the round ran at commit 1bc2d14.
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
r7.LOG_NAME = "round18.txt"
log = r7.log

MODEL_VARIANTS = [
    {"carveout": None, "priority": True},
    {"carveout": 16, "priority": True},
    {"carveout": 32, "priority": True},
    {"carveout": None, "priority": False},
    {"carveout": 8, "priority": True},
]


class Smi:
    """nvidia-smi sampling the SM clock and power every 50 ms while open (nothing on a CPU)."""

    def __init__(self, dev):
        self.p = None
        if dev.type == "cuda":
            try:
                self.p = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                           "-lms", "50"], stdout=subprocess.PIPE, text=True)
            except OSError:
                self.p = None

    def close(self) -> str:
        if self.p is None:
            return ""
        self.p.terminate()
        rows = []
        for ln in self.p.communicate()[0].splitlines():
            try:
                a, b = ln.split(",")
                rows.append((float(a), float(b)))
            except ValueError:
                pass
        if not rows:
            return ""
        rows = rows[len(rows) // 5:] or rows  # the first samples precede the load
        clk = sorted(r[0] for r in rows)
        pw = sorted(r[1] for r in rows)
        return f"  [smi {len(rows)}: clock median {clk[len(clk) // 2]:.0f} MHz, power median {pw[len(pw) // 2]:.0f} W, max {pw[-1]:.0f}]"


def api(dev, tiny):
    log(f"  carveout: {hasattr(torch._C, '_set_sm_carveout_experimental')}")
    try:
        from torch.cuda import green_contexts

        log(f"  green contexts: {green_contexts.SUPPORTED}")
    except ImportError:
        log("  green contexts: absent")
    if dev.type == "cuda":
        log(f"  stream priorities: {torch.cuda.Stream.priority_range()}, SMs "
            f"{torch.cuda.get_device_properties(dev).multi_processor_count}")


def conv_inputs(dev, tiny):
    """The conv's input as prefill has it at 4096 Codestral tokens (xBC, a strided view of
    in_proj's output), its weight, bias and a conv state. Round 19 uses it too."""
    M = 64 if tiny else 4096
    DI, CD = (128, 192) if tiny else (8192, 10240)
    IN = 2 * DI + (CD - DI) + (4 if tiny else 128)
    dtype = torch.float16 if tiny else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    zx = torch.randn(1, M, IN, generator=g, device=dev).to(dtype)
    cw = torch.randn(CD, 4, generator=g, device=dev).to(dtype)
    cbias = torch.randn(CD, generator=g, device=dev).to(dtype)
    cs0 = torch.randn(1, CD, 3, generator=g, device=dev).to(dtype)
    return zx[..., DI:DI + CD], cw, cbias, cs0


def conv_phase(dev, tiny):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import conv

    xBC, cw, cbias, cs0 = conv_inputs(dev, tiny)
    cs = cs0.clone()
    tbps = kb.copy_bandwidth(dev) / 1e12 if dev.type == "cuda" else float("nan")
    nbytes = xBC.numel() * 2 * 2

    def call():
        cs.copy_(cs0)
        return conv.causal_conv1d(xBC, cw, cbias, cs)

    base = dict(conv.CONV_CONFIG)
    ref = None
    knobs = [{}, {"ROWS_C_FIRST": True}, {"ROWS_C_FIRST": True, "ROWS_BLOCK_C": 512, "ROWS_WARPS": 4},
             {"ROWS_C_FIRST": True, "ROWS": 32}, {"ROWS_C_FIRST": True, "ROWS_BLOCK_C": 1024, "ROWS_WARPS": 4},
             {"ROWS_C_FIRST": True, "ROWS_BLOCK_C": 512, "ROWS_WARPS": 2}, {}, {"ROWS_C_FIRST": True}]
    for kw in knobs:
        conv.CONV_CONFIG.clear()
        conv.CONV_CONFIG.update({**base, **kw})
        try:
            out = call()
            if ref is None:
                ref = (out.clone(), cs.clone())
            same = torch.equal(out, ref[0]) and torch.equal(cs, ref[1])
            if dev.type != "cuda":
                log(f"  conv {str(kw):70s} same: {same}")
                continue
            ms = kb.time_ms(call, dev)
            gbs = nbytes / (ms * 1e-3) / 1e12
            log(f"  conv {str(kw):70s} {ms * 1e3:7.1f} us {gbs:5.2f} TB/s {gbs / tbps:6.1%} of copy  same: {same}")
        except Exception as e:
            r7.err_line(f"conv {kw}", e)
    conv.CONV_CONFIG.clear()
    conv.CONV_CONFIG.update(base)


def _carveout(n):
    torch._C._set_sm_carveout_experimental(n)


def _mats(dev, tiny):
    M, D, DI, IN = (64, 64, 128, 400) if tiny else (4096, 4096, 8192, 18560)
    dtype = torch.float32 if tiny else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(M, D, generator=g, device=dev).to(dtype)
    w_in = (torch.randn(IN, D, generator=g, device=dev) * 0.02).to(dtype)
    y = torch.randn(M, DI, generator=g, device=dev).to(dtype)
    w_out = (torch.randn(D, DI, generator=g, device=dev) * 0.02).to(dtype)
    return x, w_in, y, w_out


def _loop_ms(fn, dev, seconds):
    """ms per call of fn, called back to back for about `seconds` after as long again of warm-up."""
    fn()
    r7.sync(dev)
    t = time.perf_counter()
    n = 0
    while time.perf_counter() - t < seconds:
        fn()
        n += 1
        if n % 8 == 0:
            r7.sync(dev)
    r7.sync(dev)
    reps = max(3, n)
    t = time.perf_counter()
    for i in range(reps):
        fn()
        if i % 8 == 7:
            r7.sync(dev)
    r7.sync(dev)
    return (time.perf_counter() - t) / reps * 1e3


def matmul_phase(dev, tiny):
    import torch.nn.functional as F

    x, w_in, y, w_out = _mats(dev, tiny)
    ref = (F.linear(x, w_in), F.linear(y, w_out))
    secs = 0.05 if tiny else 0.6
    for lib in ("default", "cublaslt"):
        if lib == "cublaslt":
            torch.backends.cuda.preferred_blas_library("cublaslt")
        for c in (None, 16, 32, 48, None):
            _carveout(c)
            try:
                a, b = F.linear(x, w_in), F.linear(y, w_out)
                same = torch.equal(a, ref[0]) and torch.equal(b, ref[1])
                smi = Smi(dev)
                ms = _loop_ms(lambda: (F.linear(x, w_in), F.linear(y, w_out)), dev, secs)
                log(f"  matmul {lib:9s} carveout {str(c):5s} {ms * 1e3:8.1f} us per in_proj + out_proj"
                    f"  same: {same}{smi.close()}")
            except Exception as e:
                r7.err_line(f"matmul {lib} {c}", e)
        _carveout(None)
    torch.backends.cuda.preferred_blas_library("default")


def overlap_phase(dev, tiny):
    import torch.nn.functional as F

    from mamba2_cli.kernels import ssd

    x, w_in, y, w_out = _mats(dev, tiny)
    H, P, G, N = (8, 16, 2, 16) if tiny else (128, 64, 8, 128)
    L = x.shape[0]
    dtype = x.dtype
    g = torch.Generator(device=dev).manual_seed(2)
    xs = torch.randn(1, L, H, P, generator=g, device=dev).to(dtype)
    dt = torch.randn(1, L, H, generator=g, device=dev).to(dtype)
    A = -torch.rand(H, generator=g, device=dev) - 0.5
    Bm = torch.randn(1, L, G, N, generator=g, device=dev).to(dtype)
    Cm = torch.randn(1, L, G, N, generator=g, device=dev).to(dtype)
    D = torch.ones(H, device=dev)
    dtb = torch.zeros(H, device=dev)
    s0 = torch.randn(1, H, P, N, generator=g, device=dev) * 0.1
    sc = s0.clone()

    def scan():
        return ssd.ssd_prefill(xs, dt, A, Bm, Cm, D, dtb, (0.0, float("inf")), 256, initial_state=sc,
                               final_state=sc)

    def mm():
        return F.linear(x, w_in), F.linear(y, w_out)

    if dev.type != "cuda":
        scan()
        mm()
        log("  overlap: (CPU) ran")
        return
    lo, hi = torch.cuda.Stream.priority_range()
    side = torch.cuda.Stream(dev, priority=hi)
    main = torch.cuda.current_stream(dev)
    secs = 0.6
    t_scan = _loop_ms(scan, dev, 0.2)
    for c in (None, 16, 32):
        _carveout(c)
        try:
            t_mm = _loop_ms(mm, dev, secs)

            def both():
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    scan()
                mm()
                main.wait_stream(side)

            smi = Smi(dev)
            t_both = _loop_ms(both, dev, secs)
            log(f"  overlap carveout {str(c):5s} matmuls {t_mm * 1e3:7.1f} us, scan {t_scan * 1e3:6.1f} us, sum "
                f"{(t_mm + t_scan) * 1e3:7.1f}, on two streams {t_both * 1e3:7.1f} us{smi.close()}")
        except Exception as e:
            r7.err_line(f"overlap {c}", e)
    _carveout(None)


def model_phase(model, dev, tiny):
    from mamba2_cli.generate import owned_state, prefill
    from mamba2_cli.overlap import prefill_overlapped

    L, piece = (300, 64) if tiny else (65536, 4096)
    ids = torch.randint(3, model.cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(5)).to(dev)
    state = owned_state(model, 1)

    def run(variant):
        state.reset()
        r7.sync(dev)
        t = time.perf_counter()
        if variant is None:
            lg = prefill(model, ids, state, chunk_tokens=piece)
        else:
            lg = prefill_overlapped(model, ids, state, piece, **variant)
        r7.sync(dev)
        return time.perf_counter() - t, lg

    _, ref = run(None)
    ref_ssm, ref_conv = state.ssm.clone(), state.conv.clone()
    _, again = run(None)
    log(f"  plain prefill repeats itself: {torch.equal(again, ref) and torch.equal(state.ssm, ref_ssm)}")
    times: dict = {}
    for rep in range(2 if tiny else 3):
        for v in [None] + MODEL_VARIANTS:
            name = "plain" if v is None else f"overlap carveout={v['carveout']} priority={v['priority']}"
            try:
                smi = Smi(dev)
                s, lg = run(v)
                extra = smi.close()
                if rep == 0 and v is not None:
                    same = torch.equal(lg, ref) and torch.equal(state.ssm, ref_ssm) and torch.equal(state.conv, ref_conv)
                    log(f"  {name}: logits {r7.rel_err(lg, ref):.1e}, ssm {r7.rel_err(state.ssm, ref_ssm):.1e}, "
                        f"conv {r7.rel_err(state.conv, ref_conv):.1e}, bit-identical {same}")
                times.setdefault(name, []).append(s)
                log(f"  prefill {L} {name:40s} {s:.4f} s{extra}")
            except Exception as e:
                r7.err_line(name, e)
    for name, v in times.items():
        v = sorted(v)
        log(f"  summary {name:40s} " + ", ".join(f"{x:.4f}" for x in v) + f"  median {v[len(v) // 2]:.4f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    dev, model = r7.setup(18, args.tiny, load="model" not in skip)
    phases = [("api", lambda: api(dev, args.tiny)), ("conv", lambda: conv_phase(dev, args.tiny)),
              ("matmul", lambda: matmul_phase(dev, args.tiny)), ("overlap", lambda: overlap_phase(dev, args.tiny)),
              ("model", lambda: model_phase(model, dev, args.tiny))]
    r7.run_phases([(n, f) for n, f in phases if n not in skip])


if __name__ == "__main__":
    main()
