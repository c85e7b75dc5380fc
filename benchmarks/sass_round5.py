"""Compile the round-5 kernels for sm_90 on a machine without a GPU and read the machine code.

    PYTHONPATH=src python3 benchmarks/sass_round5.py [--sm 90] [--only NAME]

Triton's interpreter runs the kernels' logic but not the compiler: a kernel can pass every
CPU test and still fail to compile (the first `_fma` returned two tensor shapes from one
function, which only the compiler rejects). This compiles each configuration that
benchmarks/gpu_round5.py times, with the launch-time specialization Triton applies at
Codestral shapes (pointers and sizes divisible by 16), runs ptxas, and prints per kernel:
registers, spill stack, shared memory, global load widths (LDG.E.128 = 16 bytes per thread),
barriers and shuffles. No device, no device time. Exit status 1 if any kernel fails.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mamba2_cli.kernels import gemv, step


def compile_one(fn, sig: dict, consts: dict, div16: set, target, **opts):
    """sig: arg name -> type for the runtime args; consts: constexpr values; div16: args Triton
    would see as multiples of 16 (pointers from torch and sizes like 4096)."""
    params = inspect.signature(fn.fn).parameters
    full = {k: v for k, v in sig.items() if k in params}  # a signature may serve kernels with fewer args
    div16 = {a for a in div16 if a in params}
    consts = dict(consts)
    for name, p in params.items():  # constexprs left at their defaults
        if name not in full and name not in consts and p.default is not inspect.Parameter.empty:
            consts[name] = p.default
    full.update({k: "constexpr" for k in consts})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    return triton.compile(ASTSource(fn, full, consts, attrs), target=target, options=opts)


def sass_stats(kernel) -> str:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    loads = Counter(re.findall(r"\bLDG\.E[\.\w]*", sass))
    return (f"regs {regs.group(1) if regs else '?':>3} stack {stack.group(1) if stack else '?':>3} "
            f"smem {kernel.metadata.shared:>6} bar {sass.count('BAR.SYNC'):>2} shfl {sass.count('SHFL'):>3} "
            f"{' '.join(f'{k}x{v}' for k, v in sorted(loads.items()))}")


GEMV_SIG = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
            "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32", "wp_ptr": "*bf16",
            "xp_ptr": "*bf16"}
GEMV_DIV = {"x_ptr", "w_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm", "stride_wn", "stride_ym", "wp_ptr", "xp_ptr"}


def gemv_cases(rows: int):
    variants = {1: [gemv.GEMV_CONFIG[1], *_round5_lists()[0]], 8: [gemv.GEMV_CONFIG[8], *_round5_lists()[1]]}[rows]
    for c in dict.fromkeys(variants):  # in order, once each
        block_m = 1 << (rows - 1).bit_length()
        common = dict(HAS_BIAS=False, EVEN_K=True, BLOCK_N=c.block_n, BLOCK_K=c.block_k)
        opts = {"num_warps": c.num_warps}
        if c.num_stages is not None:
            opts["num_stages"] = c.num_stages
        if c.kind == "reduce":
            yield f"{rows}-row {c.name}", gemv._gemv_kernel, dict(BLOCK_M=block_m, **common), opts
        elif c.kind == "acc":
            if c.pdl:
                opts["launch_pdl"] = True
            yield (f"{rows}-row {c.name}", gemv._gemv_acc_kernel,
                   dict(BLOCK_M=block_m, **common, EVICT="evict_first" if c.evict_first else "",
                        PREFETCH=c.prefetch or c.pdl, PDL=c.pdl), opts)
        else:
            yield (f"{rows}-row {c.name}", gemv._gemv_dot_kernel,
                   dict(BLOCK_M=max(16, block_m), **common, EVICT="evict_first" if c.evict_first else "",
                        DOT_PRECISION="tf32"), opts)


def _round5_lists():
    sys.path.insert(0, os.path.dirname(__file__))
    import gpu_round5

    return gpu_round5.gemv_variants_1row(gemv), gpu_round5.gemv_variants_8rows(gemv)


NORM_SIG = {"x_ptr": "*bf16", "res_ptr": "*fp32", "nw_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16",
            "res_out_ptr": "*fp32", "N": "i32", "K": "i32", "eps": "fp32", "stride_wn": "i32"}
NORM_DIV = {"x_ptr", "res_ptr", "nw_ptr", "w_ptr", "b_ptr", "y_ptr", "res_out_ptr", "N", "K", "stride_wn"}


def norm_cases():
    C = gemv.GemvConfig
    for c in (C("acc", 2, 2048, 4), C("acc", 2, 2048, 4, one_pass=True), C("acc", 4, 1024, 4, one_pass=True),
              C("acc", 8, 1024, 8, one_pass=True), C("acc", 4, 1024, 4, prefetch=True, one_pass=True),
              C("acc", 2, 2048, 4, pdl=True, one_pass=True), C("acc", 4, 1024, 4, pdl=True)):
        opts = {"num_warps": c.num_warps, **({"launch_pdl": True} if c.pdl else {})}
        yield (f"norm_gemv {c.name}", gemv._norm_gemv_kernel,
               dict(HAS_RES=True, WRITE_RES=True, HAS_BIAS=False, EVEN_K=True, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                    EVICT="evict_first" if c.evict_first else "", ONE_PASS=c.one_pass, PREFETCH=c.prefetch or c.pdl,
                    PDL=c.pdl), opts)


MIX_SIG = {**{n: "*bf16" for n in ("zx_ptr", "conv_w_ptr", "conv_b_ptr", "conv_state_ptr")},
           "A_ptr": "*fp32", "D_ptr": "*fp32", "dt_bias_ptr": "*fp32", "norm_w_ptr": "*bf16", "ssm_ptr": "*fp32",
           "out_ptr": "*bf16", "ybuf_ptr": "*fp32", "ssbuf_ptr": "*fp32", "count_ptr": "*i32",
           "bc_ptr": "*fp32", **{n: "i32" for n in ("H", "P", "N", "G", "heads_per_group", "d_inner")},
           "eps": "fp32", "dt_lo": "fp32", "dt_hi": "fp32",
           **{n: "i32" for n in ("stride_zx_b", "stride_cw_c", "stride_cs_b", "stride_cs_c", "stride_D_h", "stride_D_p",
                                 "stride_s_b", "stride_s_h", "stride_s_p", "stride_out_b")}}
MIX_DIV = {n for n, t in MIX_SIG.items() if t.startswith("*")} | {"H", "P", "N", "d_inner", "stride_zx_b", "stride_cs_b",
                                                                   "stride_D_h", "stride_s_b", "stride_s_h", "stride_s_p",
                                                                   "stride_out_b"}
TAIL_SIG = {"zx_ptr": "*bf16", "conv_state_ptr": "*bf16", "norm_w_ptr": "*bf16", "out_ptr": "*bf16", "ybuf_ptr": "*fp32",
            "ssbuf_ptr": "*fp32", **{n: "i32" for n in ("G", "N", "GS", "nss", "d_inner")}, "eps": "fp32",
            **{n: "i32" for n in ("stride_zx_b", "stride_cs_b", "stride_cs_c", "stride_out_b")}}
TAIL_DIV = {n for n, t in TAIL_SIG.items() if t.startswith("*")} | {"N", "GS", "d_inner", "stride_zx_b", "stride_cs_b",
                                                                     "stride_out_b"}


def step_cases():
    # (P block, warps, split, pdl, bc_pre); the last two rows are session 3's batch defaults.
    for bp, warps, split, pdl, pre in ((16, 2, False, False, False), (16, 1, False, False, False),
                                       (8, 1, False, False, False), (8, 2, False, False, False),
                                       (4, 1, False, False, False), (32, 4, False, False, False),
                                       (16, 2, True, False, False), (8, 1, True, False, False),
                                       (16, 2, False, True, False), (16, 2, True, True, False),
                                       (64, 2, False, False, False), (32, 1, True, False, True)):
        npb = 64 // bp
        opts = {"num_warps": warps, **({"launch_pdl": True} if pdl else {})}
        yield (f"mixer step p{bp} w{warps}{' split' if split else ''}{' pdl' if pdl else ''}{' bc_pre' if pre else ''}",
               step._mixer_step_kernel,
               dict(K=4, BLOCK_P=bp, BLOCK_N=128, BLOCK_K=4, BLOCK_GS=1024, BLOCK_SS=triton.next_power_of_2(16 * npb),
                    HAS_CONV_BIAS=True, NORM_BEFORE_GATE=False, DT_CLAMP=False, TAIL=not split, PDL=pdl, BC_PRE=pre),
               opts)
    for warps, pdl, shift in ((4, False, True), (8, False, True), (4, True, True), (4, False, False)):
        yield (f"split tail w{warps}{' pdl' if pdl else ''}{'' if shift else ' (bc_pre)'}", step._group_norm_kernel,
               dict(K=4, BLOCK_N=128, BLOCK_K=4, BLOCK_GS=1024, BLOCK_SS=64, NORM_BEFORE_GATE=False, PDL=pdl,
                    SHIFT_BC=shift),
               {"num_warps": warps, **({"launch_pdl": True} if pdl else {})})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sm", type=int, default=90)
    ap.add_argument("--only", default="", help="compile only the cases whose name contains this")
    ap.add_argument("--no-sass", action="store_true", help="compile only (no cuobjdump)")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.sm, 32)
    groups = [
        (GEMV_SIG, GEMV_DIV, gemv_cases(1)), (GEMV_SIG, GEMV_DIV, gemv_cases(8)), (NORM_SIG, NORM_DIV, norm_cases()),
        (MIX_SIG, MIX_DIV, (c for c in step_cases() if c[1] is step._mixer_step_kernel)),
        (TAIL_SIG, TAIL_DIV, (c for c in step_cases() if c[1] is step._group_norm_kernel)),
    ]
    failed = 0
    print(f"# triton {triton.__version__}, sm_{args.sm}")
    for sig, div, cases in groups:
        for name, fn, consts, opts in cases:
            if args.only and args.only not in name:
                continue
            try:
                k = compile_one(fn, sig, consts, div, target, **opts)
                print(f"OK   {name:44s} {'' if args.no_sass else sass_stats(k)}", flush=True)
            except Exception as e:
                failed += 1
                msg = str(e).strip().splitlines()
                print(f"FAIL {name:44s} {type(e).__name__}: {msg[-1][:300] if msg else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
