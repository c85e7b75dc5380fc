"""Round 5 (issue 4): matvec bodies, fused add+RMSNorm+matvec, decode-step variants, whole-model decode.

    PYTHONPATH=src python3 benchmarks/gpu_round5.py            # H200, one run, < 5 minutes
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round5.py --tiny   # CPU smoke run

Phases, each variant checked against torch before it is timed (a failed check or an error
is printed and the variant skipped; nothing aborts the run), each phase stopped at its own
allowance, and early enough to leave the later phases their time within --budget-s:

1. copy bandwidth (the ceiling); the random Codestral model (load_preset: its projections
   are the matvec phases' weights, one 15 GB copy for the whole run);
2. the 129 single-row matvecs of a Codestral decode step (64 x in_proj [18560, 4096],
   64 x out_proj [4096, 8192], lm_head [32768, 4096], bf16) in one CUDA graph: cuBLAS, the
   current kernel, and the new bodies (gemv.GemvConfig);
3. add+RMSNorm then in_proj, 64 layers in one graph: separate launches vs norm_gemv variants;
4. the fused decode step, 64 layers in one graph, batch 1: the current kernel, smaller P
   blocks, the split (gated norm as a second kernel), the split's first kernel alone, the
   backend's own three kernels unfused (conv1d_step, ssd_decode_step, gated_rmsnorm), PDL,
   the state update alone, and empty launches (the floor of a graph node);
5. whole-model decode (load_preset codestral-7b, bench_model) with the old and new choices,
   each checked against the old logits on the old run's tokens (model_check);
6. the 129 matvecs at 8 rows (batch 8), and the model at batch 8 with the best 8-row kernel.

Prints a summary table at the end; with OUT set, every line also goes to $OUT/round5.txt as
it is printed (a run cut short keeps what it measured) and the figures to $OUT/round5.json.
The "flip" lines say what to set in the package for the winners.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

LINES: list[str] = []
RESULTS: dict = {}
SMOKE = False  # --smoke: a few variants per phase, one of each kind (the script's own test)
BEST: dict = {}  # the winners, as found (the summary prints them even if a later phase fails)
T0 = time.time()


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LINES.append(msg)
    out = os.environ.get("OUT")
    if out:  # line by line: a run cut short still leaves what it measured
        try:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "round5.txt"), "a") as f:
                f.write(msg + "\n")
        except OSError:
            pass


def err_line(what: str, e: BaseException) -> None:
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else "?"
    log(f"  ERROR {what}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} ({where})")


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def elapsed() -> float:
    return time.time() - T0


class Shapes:
    def __init__(self, tiny: bool):
        if tiny:  # the interpreter runs every program in Python: keep the grids small
            self.D, self.H, self.P, self.G, self.N, self.K = 32, 2, 16, 1, 16, 4
            self.layers, self.vocab = 1, 48
        else:
            self.D, self.H, self.P, self.G, self.N, self.K = 4096, 128, 64, 8, 128, 4
            self.layers, self.vocab = 64, 32768
        self.DI = self.H * self.P
        self.CONV = self.DI + 2 * self.G * self.N
        self.IN = 2 * self.DI + 2 * self.G * self.N + self.H


# ----------------------------------------------------------------------------- timing

class Timed:
    """fn() captured in a CUDA graph (on CUDA) and replayed; eager calls elsewhere."""

    def __init__(self, fn, device):
        self.fn, self.cuda = fn, device.type == "cuda"
        t = time.perf_counter()
        self.out = fn()  # warm-up: compiles, allocates scratch (off CUDA: the one timed call)
        self.eager_ms = 1e3 * (time.perf_counter() - t)
        if self.cuda:
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn()
            torch.cuda.synchronize()

    def run(self):
        if self.cuda:
            self.graph.replay()
        return self.out

    def ms(self, reps: int) -> float:
        if not self.cuda:
            return self.eager_ms
        self.run()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            self.graph.replay()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        return statistics.median(times)

    def free(self):
        if self.cuda:
            del self.graph
        self.out = None


def copy_tbps(device) -> float:
    if device.type != "cuda":
        return float("nan")
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del a, b
    return 2 * n / (statistics.median(times) * 1e-3) / 1e12


# ----------------------------------------------------------------------------- matvecs

def matvec_weights(S: Shapes, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)

    def w(n, k):
        return (torch.randn(n, k, device=device, generator=g, dtype=torch.float32) / math.sqrt(k)).to(dtype) \
            if device.type != "cuda" else torch.empty(n, k, device=device, dtype=dtype).normal_(0, 1 / math.sqrt(k), generator=g)

    W_in = [w(S.IN, S.D) for _ in range(S.layers)]
    W_out = [w(S.D, S.DI) for _ in range(S.layers)]
    W_lm = w(S.vocab, S.D)
    return W_in, W_out, W_lm


def matvec_bytes(W_in, W_out, W_lm) -> int:
    return sum(w.numel() * w.element_size() for w in W_in + W_out + [W_lm])


def bench_matvecs(S, device, dtype, W_in, W_out, W_lm, rows, variants, tbps, reps, deadline, label):
    """variants: list of (name, callable(x, W) -> y). Returns {name: ms} for the correct ones."""
    from mamba2_cli.kernels import gemv  # noqa: F401

    g = torch.Generator(device="cpu").manual_seed(rows)
    x_in = torch.randn(rows, S.D, generator=g).to(device, dtype)
    x_out = torch.randn(rows, S.DI, generator=g).to(device, dtype)
    refs = [F.linear(x_in.float(), W_in[0].float()), F.linear(x_out.float(), W_out[0].float()),
            F.linear(x_in.float(), W_lm.float())]
    nbytes = matvec_bytes(W_in, W_out, W_lm)
    results = {}
    for name, fn in variants:
        if elapsed() > deadline:
            log(f"  {label}: out of time, skipping the rest")
            break
        try:
            got = [fn(x_in, W_in[0]), fn(x_out, W_out[0]), fn(x_in, W_lm)]
            errs = [rel_err(a, b) for a, b in zip(got, refs)]
            if max(errs) > 2e-2 or any(not math.isfinite(e) for e in errs):
                log(f"  {label} {name:42s} FAIL check: rel errs {', '.join(f'{e:.1e}' for e in errs)}")
                continue

            def all_products():
                outs = []
                for i in range(S.layers):
                    outs.append(fn(x_in, W_in[i]))
                    outs.append(fn(x_out, W_out[i]))
                outs.append(fn(x_in, W_lm))
                return outs

            t = Timed(all_products, device)
            ms = t.ms(reps)
            outs = t.run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            gerr = max(rel_err(outs[0], refs[0]), rel_err(outs[-2], F.linear(x_out.float(), W_out[-1].float())),
                       rel_err(outs[-1], refs[2]))
            t.free()
            share = nbytes / (ms * 1e-3) / 1e12 / tbps if tbps == tbps else float("nan")
            flag = "" if gerr < 2e-2 else "  FAIL (graph replay)"
            log(f"  {label} {name:42s} {ms:8.3f} ms  {share:6.1%} of copy  err {max(errs):.1e}/{gerr:.1e}{flag}")
            if not flag:
                results[name] = ms
        except Exception as e:  # a variant that does not compile or launch: report, keep going
            err_line(f"{label} {name}", e)
        finally:
            gc.collect()
    return results


def smoke(items, keep):
    """Under --smoke, only the entries at the indices `keep`."""
    return [items[i] for i in keep] if SMOKE else items


def gemv_variants_1row(gemv):
    C = gemv.GemvConfig
    return smoke([
        gemv.GEMV_CONFIG[1],  # the current default
        C("acc", 2, 2048, 4),
        C("acc", 2, 2048, 4, evict_first=True),
        C("acc", 2, 2048, 4, prefetch=True),
        C("acc", 2, 2048, 4, num_stages=1),
        C("acc", 2, 2048, 4, num_stages=4),
        C("acc", 1, 2048, 4),
        C("acc", 2, 1024, 4),
        C("acc", 2, 4096, 8),
        C("acc", 4, 1024, 4),
        C("acc", 4, 2048, 8),
        C("acc", 8, 1024, 8),
        C("acc", 4, 512, 4),
        C("acc", 4, 1024, 4, evict_first=True, prefetch=True),
        C("acc", 2, 1024, 4, prefetch=True),
        C("acc", 4, 2048, 8, prefetch=True),
        C("acc", 2, 2048, 4, evict_first=True, prefetch=True),
        C("dot", 32, 256, 4, num_stages=4),
        C("dot", 64, 128, 4, num_stages=4),
        C("dot", 64, 256, 4, num_stages=3),
        C("dot", 16, 512, 4, num_stages=3),
        C("acc", 2, 2048, 4, pdl=True),  # dependent launches last: a fault there costs no other figure
        C("acc", 2, 2048, 4, evict_first=True, pdl=True),
    ], [0, 1, 13, 17, 22])


def gemv_variants_8rows(gemv):
    C = gemv.GemvConfig
    return smoke([
        C("acc", 2, 512, 4),
        C("acc", 2, 1024, 8),
        C("acc", 4, 512, 8),
        C("acc", 1, 1024, 4),
        C("acc", 2, 512, 4, evict_first=True, prefetch=True),
        C("dot", 32, 256, 4, num_stages=4),
        C("dot", 64, 128, 4, num_stages=4),
        C("dot", 64, 256, 4, num_stages=3),
        C("dot", 128, 128, 8, num_stages=3),
        C("dot", 32, 512, 4, num_stages=3),
        C("dot", 16, 512, 4, num_stages=4),
        C("dot", 64, 256, 4, num_stages=4, evict_first=True),
        gemv.GEMV_CONFIG[8],  # the current 8-row configuration (9 % of copy in round G2)
    ], [4, 11, 12])


def matvec_fns(gemv, cfgs):
    return [(c.name, (lambda c: lambda x, w: gemv.gemv(x, w, config=c))(c)) for c in cfgs]


# ----------------------------------------------------------------------------- norm + matvec

def bench_norm(S, device, dtype, W_in, best_gemv, reps, deadline):
    from mamba2_cli.kernels import gemv, norm, torch_ref

    g = torch.Generator(device="cpu").manual_seed(5)
    h = torch.randn(1, S.D, generator=g).to(device, dtype)
    res0 = torch.randn(1, S.D, generator=g).to(device) * 2
    nw = (1 + 0.1 * torch.randn(S.D, generator=g)).to(device, dtype)
    eps = 1e-5
    normed_ref, res_ref = torch_ref.add_rmsnorm(h.float(), res0, nw.float(), eps)
    y_ref = F.linear(normed_ref, W_in[0].float())
    C = gemv.GemvConfig
    fused = [
        C("acc", 2, 2048, 4), C("acc", 2, 2048, 4, one_pass=True), C("acc", 4, 1024, 4),
        C("acc", 4, 1024, 4, one_pass=True), C("acc", 8, 1024, 8, one_pass=True), C("acc", 4, 2048, 8),
        C("acc", 2, 2048, 4, evict_first=True, one_pass=True), C("acc", 4, 1024, 4, prefetch=True, one_pass=True),
        C("acc", 2, 2048, 4, pdl=True, one_pass=True), C("acc", 4, 1024, 4, pdl=True),
    ]
    if best_gemv is not None and best_gemv.kind == "acc":
        fused.insert(0, best_gemv.with_(pdl=False, one_pass=False))
    variants = [("separate: add_rmsnorm + current gemv", ("sep", gemv.GEMV_CONFIG[1]))]
    if best_gemv is not None and best_gemv != gemv.GEMV_CONFIG[1]:
        variants.append((f"separate: add_rmsnorm + {best_gemv.name}", ("sep", best_gemv)))
    variants.append(("add_rmsnorm alone", ("norm", None)))
    seen = set()
    for c in fused:  # dependent launches last: a fault there costs no other figure
        if c not in seen:
            seen.add(c)
            variants.append((f"fused {c.name}", ("fused", c)))
    if SMOKE:  # one of each: separate, norm alone, fused two-pass, fused one-pass, fused with PDL
        firsts = {}
        for v in variants:
            c = v[1][1]
            key = (v[1][0], c is not None and c.one_pass, c is not None and c.pdl)
            firsts.setdefault(key, v)
        variants = list(firsts.values())

    def call(kind, c, x, res, W):
        if kind == "sep":
            normed, res = norm.add_rmsnorm(x, res, nw, eps, True)
            return gemv.gemv(normed, W, config=c), res
        if kind == "norm":
            return norm.add_rmsnorm(x, res, nw, eps, True)
        return gemv.norm_gemv(x, res, nw, eps, W, None, True, config=c)

    results = {}
    for name, (kind, c) in variants:
        if elapsed() > deadline:
            log("  norm: out of time, skipping the rest")
            break
        try:
            if kind != "norm":
                y, r = call(kind, c, h, res0, W_in[0])
                e, er = rel_err(y, y_ref), rel_err(r, res_ref)
                if e > 2e-2 or er > 1e-6:
                    log(f"  norm {name:52s} FAIL check: y {e:.1e}, residual {er:.1e}")
                    continue
                # the first layer (no residual yet)
                y1, r1 = call(kind, c, h, None, W_in[0])
                n1, _ = torch_ref.add_rmsnorm(h.float(), None, nw.float(), eps)
                e1 = rel_err(y1, F.linear(n1, W_in[0].float()))
                if e1 > 2e-2 or rel_err(r1, h.float()) > 0:
                    log(f"  norm {name:52s} FAIL check without a residual: y {e1:.1e}")
                    continue
            else:
                e = 0.0

            def chain():
                res, outs = res0, []
                for i in range(S.layers):
                    y, res = call(kind, c, h, res, W_in[i])
                    outs.append(y)
                return outs, res

            t = Timed(chain, device)
            ms = t.ms(reps)
            outs, res = t.run()
            ok = rel_err(res, res0 + S.layers * h.float()) < 1e-5
            t.free()
            per = 1e3 * ms / S.layers
            log(f"  norm {name:52s} {per:8.2f} us per layer  err {e:.1e}{'' if ok else '  FAIL (graph replay residual)'}")
            if ok:
                results[name] = (per, kind, c)
        except Exception as ex:
            err_line(f"norm {name}", ex)
        finally:
            gc.collect()
    return results


# ----------------------------------------------------------------------------- decode step

def mixer_layers(S: Shapes, nlayers, b, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    layers = []
    for _ in range(nlayers):
        dt_init = torch.exp(torch.rand(S.H, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        layers.append(dict(
            conv_weight=rn(S.CONV, S.K, scale=0.5).to(dtype), conv_bias=rn(S.CONV, scale=0.1).to(dtype),
            conv_state=rn(b, S.CONV, S.K - 1).to(dtype), A=-torch.exp(torch.rand(S.H, generator=g) * 2.77).to(device),
            D=rn(S.H), dt_bias=(dt_init + torch.log(-torch.expm1(-dt_init))).to(device),
            norm_weight=(1 + rn(S.DI, scale=0.1)).to(dtype), ssm_state=rn(b, S.H, S.P, S.N, scale=0.1),
            zxbcdt=rn(b, S.IN).to(dtype),
        ))
    return layers


def call_mixer(fn, S, st, **kw):
    return fn(st["zxbcdt"], st["conv_weight"], st["conv_bias"], st["conv_state"], st["A"], st["D"], st["dt_bias"],
              (0.0, float("inf")), st["norm_weight"], st["ssm_state"], S.G, 1e-5, False, **kw)


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _noop_kernel(ptr):
    tl.store(ptr + tl.program_id(0), 1.0)


class _NoLaunch:
    """Stands in for a kernel: launches nothing (to time the split step's first kernel alone)."""

    def __getitem__(self, grid):
        return lambda *a, **k: None


def unfused_step(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit, norm_weight, ssm_state,
                 ngroups, eps, norm_before_gate=False, config=None):
    """The decode step as three of the backend's own kernels (conv1d_step, ssd_decode_step,
    gated_rmsnorm), composed as torch_ref composes it: the conv of B and C once per group."""
    from mamba2_cli.kernels import conv, norm, step

    b, H, P, N = ssm_state.shape
    d_inner, GN = H * P, ngroups * N
    z, xBC, dt = torch.split(zxbcdt, [d_inner, d_inner + 2 * GN, H], dim=-1)
    xBC = conv.conv1d_step(xBC, conv_weight, conv_bias, conv_state)
    x, B, C = torch.split(xBC, [d_inner, GN, GN], dim=-1)
    y = step.ssd_decode_step(x.reshape(b, H, P), dt, A, B.reshape(b, ngroups, N), C.reshape(b, ngroups, N), D,
                             dt_bias, dt_limit, ssm_state)
    return norm.gated_rmsnorm(y.reshape(b, d_inner), z, norm_weight, d_inner // ngroups, eps, norm_before_gate)


def bench_step(S, device, dtype, reps, deadline):
    from mamba2_cli.kernels import step, torch_ref

    base = dict(step.STEP_CONFIG)
    variants = [
        ("fused p16 w2 (current)", dict(base)),
        ("fused p16 w1", {**base, "num_warps": 1}),
        ("fused p16 w4", {**base, "num_warps": 4}),
        ("fused p8 w1", {**base, "BLOCK_P": 8, "num_warps": 1}),
        ("fused p8 w2", {**base, "BLOCK_P": 8, "num_warps": 2}),
        ("fused p4 w1", {**base, "BLOCK_P": 4, "num_warps": 1}),
        ("fused p32 w4", {**base, "BLOCK_P": 32, "num_warps": 4}),
        ("split p16 w2 tail w4", {**base, "split": True}),
        ("split p8 w1 tail w4", {**base, "split": True, "BLOCK_P": 8, "num_warps": 1}),
        ("split p4 w1 tail w4", {**base, "split": True, "BLOCK_P": 4, "num_warps": 1}),
        ("split p16 w2 tail w8", {**base, "split": True, "tail_warps": 8}),
        ("split p16 w2: first kernel alone (no norm)", {**base, "split": True, "_a_only": True}),
        ("split p8 w1: first kernel alone (no norm)", {**base, "split": True, "BLOCK_P": 8, "num_warps": 1,
                                                        "_a_only": True}),
        ("unfused: conv1d_step + ssd_decode_step + norm", {**base, "_unfused": True}),
        # dependent launches last: a fault there costs no other figure
        ("fused p16 w2 pdl", {**base, "pdl": True}),
        ("fused p8 w1 pdl", {**base, "BLOCK_P": 8, "num_warps": 1, "pdl": True}),
        ("split p16 w2 tail w4 pdl", {**base, "split": True, "pdl": True}),
    ]
    variants = smoke(variants, [0, 7, 11, 13, 14, 16])
    # Correctness inputs: one layer, batch 1 and 3, fp32 copies for the reference.
    checks = {b: mixer_layers(S, 1, b, device, dtype, seed=10 + b)[0] for b in (1, 3)}
    layers = mixer_layers(S, S.layers, 1, device, dtype)
    results = {}

    def check(fn, cfg):
        worst = 0.0
        for b, st0 in checks.items():
            st = {k: v.clone() for k, v in st0.items()}
            ref = {k: (v.float() if v.dtype in (torch.bfloat16, torch.float16) else v).clone() for k, v in st0.items()}
            for _ in range(3):
                out = call_mixer(fn, S, st, config=cfg)
                out_ref = call_mixer(torch_ref.mixer_decode_step, S, ref)
                worst = max(worst, rel_err(out, out_ref), rel_err(st["ssm_state"], ref["ssm_state"]),
                            rel_err(st["conv_state"], ref["conv_state"]))
        return worst

    for name, cfg in variants:
        if elapsed() > deadline:
            log("  step: out of time, skipping the rest")
            break
        a_only = cfg.pop("_a_only", False)
        fn = unfused_step if cfg.pop("_unfused", False) else step.mixer_decode_step
        saved = step._group_norm_kernel
        try:
            if not a_only:
                e = check(fn, cfg)
                if not e < 2e-2:
                    log(f"  step {name:46s} FAIL check: rel err {e:.1e}")
                    continue
            else:
                e = float("nan")
                step._group_norm_kernel = _NoLaunch()
            t = Timed(lambda: [call_mixer(fn, S, st, config=cfg) for st in layers], device)
            per = 1e3 * t.ms(reps) / len(layers)
            t.free()
            log(f"  step {name:46s} {per:8.2f} us per layer  err {e:.1e}")
            if not a_only:
                results[name] = (per, cfg)
        except Exception as ex:
            err_line(f"step {name}", ex)
        finally:
            step._group_norm_kernel = saved
            gc.collect()

    # Reference points: the state update alone (ssd_decode_step) and empty launches.
    try:
        xs = [dict(x=torch.randn(1, S.H, S.P, device=device).to(dtype), dt=torch.randn(1, S.H, device=device).to(dtype),
                   B=torch.randn(1, S.G, S.N, device=device).to(dtype), C=torch.randn(1, S.G, S.N, device=device).to(dtype),
                   st=st) for st in layers]
        t = Timed(lambda: [step.ssd_decode_step(d["x"], d["dt"], d["st"]["A"], d["B"], d["C"], d["st"]["D"],
                                                d["st"]["dt_bias"], (0.0, float("inf")), d["st"]["ssm_state"])
                           for d in xs], device)
        per = 1e3 * t.ms(reps) / len(layers)
        t.free()
        log(f"  step {'state update alone (ssd_decode_step p64 w4)':46s} {per:8.2f} us per layer")
        results["_state_only"] = (per, None)
    except Exception as ex:
        err_line("step state update alone", ex)

    for progs, warps in ((1, 1), (512, 2)):
        try:
            buf = torch.zeros(progs, device=device)
            t = Timed(lambda: [_noop_kernel[(progs,)](buf, num_warps=warps) for _ in range(S.layers)], device)
            per = 1e3 * t.ms(reps) / S.layers
            t.free()
            log(f"  step {f'empty kernel, {progs} programs x {warps} warps':46s} {per:8.2f} us per launch")
            results[f"_empty_{progs}"] = (per, None)
        except Exception as ex:
            err_line(f"empty kernel {progs}", ex)
    return results


# ----------------------------------------------------------------------------- whole model

class ModelVariants:
    """Sets the package's switches for one whole-model variant and restores the defaults."""

    def __init__(self):
        from mamba2_cli.kernels import gemv, step

        self.gemv, self.step = gemv, step
        self.defaults = (dict(gemv.GEMV_CONFIG), gemv.FUSE_NORM, gemv.NORM_GEMV_CONFIG, gemv.KERNEL_ROWS,
                         dict(step.STEP_CONFIG))

    def apply(self, model, gemv1=None, norm=None, step_cfg=None, rows8=None):
        g, s = self.gemv, self.step
        cfgs, fuse, ncfg, rows, st = self.defaults
        g.GEMV_CONFIG.clear()
        g.GEMV_CONFIG.update(cfgs)
        if gemv1 is not None:
            g.GEMV_CONFIG[1] = gemv1
        g.FUSE_NORM = norm is not None or fuse
        g.NORM_GEMV_CONFIG = norm or ncfg
        g.KERNEL_ROWS = 8 if rows8 is not None else rows
        if rows8 is not None:
            g.GEMV_CONFIG[8] = rows8
        s.STEP_CONFIG.clear()
        s.STEP_CONFIG.update(st)
        if step_cfg:
            s.STEP_CONFIG.update(step_cfg)
        if model is not None:
            model.__dict__.pop("_decode_graphs", None)  # recapture with the new kernels
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe(self) -> str:
        g, s = self.gemv, self.step
        parts = [f"gemv1={g.GEMV_CONFIG[1].name}"]
        if g.FUSE_NORM:
            parts.append(f"norm={g.NORM_GEMV_CONFIG.name}")
        if g.KERNEL_ROWS > 1:
            parts.append(f"gemv8={g.GEMV_CONFIG[8].name}")
        sc = s.STEP_CONFIG
        parts.append(f"step=p{sc['BLOCK_P']} w{sc['num_warps']}{' split' if sc['split'] else ''}{' pdl' if sc['pdl'] else ''}")
        return " ".join(parts)


def model_check(model, batch, prompt, n, feed=None):
    """n graph decode steps after a prefill: (tokens fed [n, B], argmax [n, B], logits [n, B, V]).

    feed None: greedy, each step fed the argmax before it. feed (a baseline's tokens fed):
    teacher forcing, so a variant is compared with the baseline on the same inputs. Compared
    free, a random-weight model's near-tied argmax flips on rounding-level differences (a new
    sum order, one_pass) and from there the two runs decode different tokens: logits about
    sqrt(2) apart, as for unrelated vectors (round 5's "wrong" fused norm and 8-row kernel).
    """
    from mamba2_cli.generate import decode_step_fn, owned_state, prefill

    with torch.inference_mode():
        state = owned_state(model, batch)
        logits = prefill(model, prompt, state)
        stepf = decode_step_fn(model, state, model.device.type == "cuda")
        tok = logits.argmax(-1) if feed is None else feed[0]
        fed, toks, outs = [], [], []
        for i in range(n):
            fed.append(tok)
            logits = stepf(tok)
            outs.append(logits.float().clone())  # the graph's logits buffer is overwritten next step
            toks.append(logits.argmax(-1))
            tok = toks[-1] if feed is None or i + 1 == n else feed[i + 1]
        return torch.stack(fed), torch.stack(toks), torch.stack(outs)


def compare_with_base(model, batch, prompt, n, base):
    """(largest relative logits error over the n steps, steps whose argmax equals the
    baseline's in every row) for the switches now set, fed the baseline's tokens;
    base = model_check(...) of the baseline."""
    fed, toks, logits = base
    _, t, lg = model_check(model, batch, prompt, n, feed=fed)
    e = max(rel_err(lg[i], logits[i]) for i in range(n))
    return e, int((t == toks).all(-1).sum())


def load_model(device, tiny):
    """The random-weight model, loaded once (its weights also serve the matvec phases)."""
    from mamba2_cli import load_preset

    model = _MODEL.get("m")
    if model is None:
        t = time.time()
        if tiny:
            from mamba2_cli.checkpoint import random_model
            from mamba2_cli.config import Mamba2Config

            cfg = Mamba2Config(d_model=32, n_layer=1, vocab_size=64, d_state=16, headdim=16, chunk_size=16,
                               ngroups=2)
            model = random_model(cfg, device, torch.float32)
            model.set_backend("triton")
            for p in model.parameters():  # CPU keeps projections input-major; the kernels take rows
                p.data = p.data.contiguous()
        else:
            model, _ = load_preset("codestral-7b", device, "bfloat16", "triton")
        _MODEL["m"] = model
        log(f"model loaded in {time.time() - t:.1f} s ({model.cfg.num_parameters() / 1e9:.2f} B parameters, {model.dtype})")
    return model


def model_weights(model):
    layers = model.backbone.layers
    return ([l.mixer.in_proj.weight for l in layers], [l.mixer.out_proj.weight for l in layers],
            model.lm_head.weight)


def bench_model_variants(S, device, tiny, variants, batch, gen_len, deadline, tbps, label):
    from mamba2_cli.bench import bench_model, bytes_per_decode_step

    model = load_model(device, tiny)
    mv = _MODEL.setdefault("mv", ModelVariants())
    g = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(3, model.cfg.vocab_size, (batch, 4 if tiny else 32), generator=g).to(device)
    nbytes = bytes_per_decode_step(model, batch)
    results = {}
    base = None
    for name, kw in variants:
        if elapsed() > deadline:
            log(f"  {label}: out of time, skipping the rest")
            break
        try:
            mv.apply(model, **kw)
            desc = mv.describe()
            n = 1 if tiny else 8
            if base is None:
                base = model_check(model, batch, prompt, n)
                e, same = 0.0, n
            else:
                e, same = compare_with_base(model, batch, prompt, n, base)
            r = bench_model(model, prompt_len=4 if tiny else 64, gen_len=gen_len, batch_size=batch,
                            repeats=1 if tiny else 2)
            tok_s = r["decode_tok_s"]
            ms = r["decode_ms_per_step"]
            share = nbytes / (ms * 1e-3) / 1e12 / tbps if tbps == tbps else float("nan")
            flag = "" if e < 0.25 else "  SUSPECT (logits far from the baseline's)"
            log(f"  {label} {name:24s} {tok_s:8.1f} tok/s/seq  {ms:7.3f} ms/step  {share:6.1%} of copy  "
                f"logits vs base {e:.1e} (same tokens fed), argmax {same}/{n}{flag}  [{desc}]")
            results[name] = dict(tok_s=tok_s, ms=ms, err=e, argmax_same=same, desc=desc, ok=not flag)
        except Exception as ex:
            err_line(f"{label} {name}", ex)
        finally:
            gc.collect()
    mv.apply(model)
    return results


_MODEL: dict = {}


# ----------------------------------------------------------------------------- main

def run():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="small shapes, CPU interpreter: checks the script runs")
    ap.add_argument("--smoke", action="store_true", help="with --tiny: a few variants of each kind (for tests)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="wall-clock budget for the whole run")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: matvec,norm,step,model,b8")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    global SMOKE
    SMOKE = args.smoke
    args.tiny = args.tiny or args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no GPU: run with TRITON_INTERPRET=1 --tiny", file=sys.stderr)
        return False
    tiny = args.tiny or device.type == "cpu"
    S = Shapes(tiny)
    dtype = torch.float16 if tiny else torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    reps = 1 if tiny else 12
    B = args.budget_s

    def until(allow: float, reserve: float) -> float:
        """A phase's deadline: `allow` seconds from now, but `reserve` left for the phases after it."""
        if tiny:
            return float("inf")
        return min(elapsed() + allow, B - reserve)
    import triton

    from mamba2_cli.kernels import gemv

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    log(f"# gpu_round5 on {name}, torch {torch.__version__}, triton {triton.__version__}, pdl "
        f"{'available' if gemv.HAS_PDL else 'missing'}, shapes {'tiny' if tiny else 'codestral'}")
    tbps = copy_tbps(device)
    log(f"copy bandwidth: {tbps:.3f} TB/s (1 GiB read + written)")
    RESULTS["copy_tbps"] = tbps

    best1 = best8 = best_norm = best_step = best_acc1 = None
    W = None
    # ---- the model first: its projections are the matvec phases' weights
    if "model" not in skip:
        try:
            model = load_model(device, tiny)
            if not tiny:
                W = model_weights(model)
                dtype = W[0][0].dtype
        except Exception as e:
            err_line("model load", e)
    if W is None and ("matvec" not in skip or "norm" not in skip or "b8" not in skip):
        try:
            t = time.time()
            W = matvec_weights(S, device, dtype)
            log(f"matvec weights: {matvec_bytes(*W) / 1e9:.2f} GB in {time.time() - t:.1f} s")
        except Exception as e:
            err_line("matvec weights", e)
    if W is not None and "matvec" not in skip:
        log("\n## 129 matvecs, 1 row, one CUDA graph (time per graph)")
        variants = [("cuBLAS F.linear", lambda x, w: F.linear(x, w))] + matvec_fns(gemv, gemv_variants_1row(gemv))
        r1 = bench_matvecs(S, device, dtype, *W, 1, variants, tbps, reps, until(60, 185), "m1")
        RESULTS["matvec_1row_ms"] = r1
        cands = {n: ms for n, ms in r1.items() if n != "cuBLAS F.linear"}
        accs = {n: ms for n, ms in cands.items() if n.startswith("acc") and "pdl" not in n}
        if accs:
            best_acc1 = next(c for c in gemv_variants_1row(gemv) if c.name == min(accs, key=accs.get))
        if cands:  # PDL variants are judged in the model (they pay only where kernels depend on each other)
            log(f"  fastest overall: {min(cands, key=cands.get)}: {min(cands.values()):.3f} ms")
            cands = {n: ms for n, ms in cands.items() if " pdl" not in n} or cands
            bname = min(cands, key=cands.get)
            best1 = BEST["1"] = next(c for c in gemv_variants_1row(gemv) if c.name == bname)
            log(f"  best 1-row kernel: {bname}: {cands[bname]:.3f} ms (current {gemv.GEMV_CONFIG[1].name}: "
                f"{r1.get(gemv.GEMV_CONFIG[1].name, float('nan')):.3f} ms, cuBLAS {r1.get('cuBLAS F.linear', float('nan')):.3f})")
    # ---- phase 3: add + RMSNorm + in_proj
    if W is not None and "norm" not in skip:
        log("\n## add+RMSNorm then in_proj, 64 layers in one CUDA graph")
        rn = bench_norm(S, device, dtype, W[0], best1, reps, until(30, 155))
        RESULTS["norm_us_per_layer"] = {k: v[0] for k, v in rn.items()}
        fused = {k: v for k, v in rn.items() if v[1] == "fused" and not v[2].pdl}
        seps = {k: v for k, v in rn.items() if v[1] == "sep"}
        if fused:
            bname = min(fused, key=lambda k: fused[k][0])
            best_norm = BEST["norm"] = fused[bname][2]
            sep_best = min((v[0] for v in seps.values()), default=float("nan"))
            log(f"  best fused: {bname}: {fused[bname][0]:.2f} us per layer vs separate {sep_best:.2f} "
                f"(x65 per token: {65 * (sep_best - fused[bname][0]) / 1e3:.3f} ms)")
    # ---- phase 4: the decode step
    if "step" not in skip:
        log("\n## fused decode step, batch 1, 64 layers in one CUDA graph")
        try:
            rs = bench_step(S, device, torch.float16 if tiny else torch.bfloat16, reps, until(35, 120))
            RESULTS["step_us_per_layer"] = {k: v[0] for k, v in rs.items()}
            cands = {k: v for k, v in rs.items()
                     if not k.startswith(("_", "unfused")) and not v[1].get("pdl")}  # package switches only
            if cands:
                bname = min(cands, key=lambda k: cands[k][0])
                best_step = BEST["step"] = cands[bname][1]
                log(f"  best step: {bname}: {cands[bname][0]:.2f} us per layer")
        except Exception as e:
            err_line("step phase", e)
    # ---- phase 5: whole model, batch 1
    if "model" not in skip:
        log("\n## whole model, batch 1, CUDA graph decode (bench_model)")
        variants = [("baseline", {})]
        if best1 is not None and best1 != gemv.GEMV_CONFIG[1]:
            variants.append(("matvec", dict(gemv1=best1)))
        else:
            best1 = None
        if best_norm is not None:
            variants.append(("matvec+norm", dict(gemv1=best1, norm=best_norm)))
        from mamba2_cli.kernels import step as step_mod

        if best_step is not None and best_step != dict(step_mod.STEP_CONFIG):
            variants.append(("matvec+norm+step", dict(gemv1=best1, norm=best_norm, step_cfg=best_step)))
            variants.append(("step only", dict(step_cfg=best_step)))
        if gemv.HAS_PDL and best_acc1 is not None:
            # Dependent launches need every kernel in the chain to take part: acc matvecs only.
            pdl_step = {**(best_step or {}), "pdl": True}
            variants.append(("all + pdl", dict(gemv1=best_acc1.with_(pdl=True),
                                               norm=best_norm.with_(pdl=True) if best_norm else None,
                                               step_cfg=pdl_step)))
        if SMOKE:
            variants = [v for v in variants if v[0] in ("baseline", "matvec+norm+step", "all + pdl")]
        try:
            RESULTS["model_b1"] = bench_model_variants(S, device, tiny, variants, 1, 1 if tiny else 128,
                                                       until(85, 35), tbps, "b1")
        except Exception as e:
            err_line("model phase", e)
    # ---- phase 6: 8 rows
    if "b8" not in skip:
        log("\n## 129 matvecs, 8 rows (batch 8), one CUDA graph")
        try:
            variants = [("cuBLAS F.linear", lambda x, w: F.linear(x, w))] + matvec_fns(gemv, gemv_variants_8rows(gemv))
            r8 = bench_matvecs(S, device, dtype, *W, 8, variants, tbps, reps, until(25, 12), "m8")
            RESULTS["matvec_8rows_ms"] = r8
            cands = {n: ms for n, ms in r8.items() if n != "cuBLAS F.linear"}
            if cands:
                bname = min(cands, key=cands.get)
                best8 = BEST["8"] = next(c for c in gemv_variants_8rows(gemv) if c.name == bname)
                log(f"  best 8-row kernel: {bname}: {cands[bname]:.3f} ms (cuBLAS {r8.get('cuBLAS F.linear', float('nan')):.3f})")
            if best8 is not None and "model" not in skip:
                variants = [("b8 cuBLAS", {}), ("b8 kernel", dict(rows8=best8))]
                RESULTS["model_b8"] = bench_model_variants(S, device, tiny, variants, 8, 1 if tiny else 64,
                                                           until(30, 0), tbps, "b8")
        except Exception as e:
            err_line("8-row phase", e)

    return True


def main():
    try:
        if run() is False:
            return 2
    except BaseException as e:  # print what there is, whatever happened
        err_line("run", e)
    try:
        summary(BEST.get("1"), BEST.get("8"), BEST.get("norm"), BEST.get("step"))
    except Exception as e:
        err_line("summary", e)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "round5.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    return 0


def summary(best1, best8, best_norm, best_step):
    log("\n## SUMMARY")
    R = RESULTS
    log(f"copy {R.get('copy_tbps', float('nan')):.3f} TB/s; total run {elapsed():.0f} s")
    rows = []
    m1 = R.get("matvec_1row_ms", {})
    if m1:
        from mamba2_cli.kernels import gemv

        cur = gemv.GEMV_CONFIG[1].name
        rows.append(("129 matvecs b1: cuBLAS / current / best", m1.get("cuBLAS F.linear"), m1.get(cur),
                     min((v for k, v in m1.items() if k != "cuBLAS F.linear"), default=None), "ms",
                     best1.name if best1 else "-"))
    m8 = R.get("matvec_8rows_ms", {})
    if m8:
        rows.append(("129 matvecs b8: cuBLAS / old 8-row / best", m8.get("cuBLAS F.linear"),
                     m8.get("reduce n4 k256 w4"), min((v for k, v in m8.items() if k != "cuBLAS F.linear"), default=None),
                     "ms", best8.name if best8 else "-"))
    nm = R.get("norm_us_per_layer", {})
    if nm:
        sep = [v for k, v in nm.items() if k.startswith("separate")]
        fu = [v for k, v in nm.items() if k.startswith("fused")]
        rows.append(("norm+in_proj per layer: separate / best fused", min(sep) if sep else None, None,
                     min(fu) if fu else None, "us", best_norm.name if best_norm else "-"))
    st = R.get("step_us_per_layer", {})
    if st:
        cands = {k: v for k, v in st.items() if not k.startswith(("_", "unfused"))}
        rows.append(("decode step per layer: current / best", st.get("fused p16 w2 (current)"), None,
                     min(cands.values()) if cands else None, "us",
                     f"state-only {st.get('_state_only', float('nan')):.2f}, empty launch {st.get('_empty_1', float('nan')):.2f}"))
    for what, a, b, c, unit, note in rows:
        f = lambda v: f"{v:9.3f}" if isinstance(v, (int, float)) and v == v else "        -"  # noqa: E731
        log(f"{what:48s} {f(a)} {f(b)} {f(c)} {unit:3s} {note}")
    for key in ("model_b1", "model_b8"):
        for name, r in R.get(key, {}).items():
            log(f"{key} {name:38s} {r['tok_s']:9.1f} tok/s/seq {r['ms']:8.3f} ms/step  logits err {r['err']:.1e}"
                f"{'' if r['ok'] else ' SUSPECT'}  [{r['desc']}]")
    log("\n# flip (what to set in the package if the model rows above confirm the winners):")
    if best1:
        log(f"#   kernels/gemv.py: GEMV_CONFIG[1] = {best1!r}")
    if best_norm:
        log(f"#   kernels/gemv.py: FUSE_NORM = True; NORM_GEMV_CONFIG = {best_norm!r}")
    if best_step:
        log(f"#   kernels/step.py: STEP_CONFIG.update({ {k: v for k, v in best_step.items()}!r})")
    if best8:
        log(f"#   kernels/gemv.py: KERNEL_ROWS = 8; GEMV_CONFIG[8] = {best8!r} (and tune 2, 4 rows)")


if __name__ == "__main__":
    sys.exit(main())
