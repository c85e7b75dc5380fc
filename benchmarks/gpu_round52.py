"""GPU round 52 (session 11): x's conv folded into the prefill scan (ssd.CONV_FOLD).

The 65k prefill's conv kernel wrote SiLU(conv(x)) for x's 8192 channels (of 10240) and the scan
read it back: ~270 MB per layer and piece, written once, read once. With the fold the conv
kernel runs over B and C only and the scan computes x's conv from in_proj's raw output (four
shifted tiles, the taps, the bias, SiLU, rounded as the conv kernel rounds). Modes: 1 the shifted
tiles loaded when used; 2 prefetched a chunk ahead; 3 the next chunk's conv at the end of the
loop body (fewest live registers: sm_90 compile, main pass 255 regs / 168 B stack against 192
unfolded; the states pass 227 regs against 159, so `st-r168` caps it).

Phases: `check` (each mode against the unfolded path on Codestral's layer, bf16), `layer`
(conv + scan per call, alternated), `prefill` (the model, 2048 and 65536 tokens, alternated;
`fold3 lt` also routes torch's matmuls through cuBLASLt).

    PYTHONPATH=src python3 benchmarks/gpu_round52.py            # H200, at 9b6930d, which has the fold (taken out again after this round)
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round52.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round52.txt.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round29 as r29  # noqa: E402

r7.LOG_NAME = "round52.txt"
log = r7.log

# (label, CONV_FOLD, scan config overrides)
LAYER_VARIANTS = [("fold0", 0, None), ("fold1", 1, None), ("fold2", 2, None), ("fold3", 3, None),
                  ("fold3 st-r168", 3, {"states": {"maxnreg": 168}})]


def layer_inputs(b, L, H, P, G, N, dtype, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=dev) * scale

    Cd = H * P + 2 * G * N
    wide = rn(b, L, Cd + 8 + H + H * P).to(dtype)  # in_proj's output: z, xBC, dt (z's width here cut)
    return dict(xBC=wide[..., 8 : 8 + Cd], dt=wide[..., 8 + Cd : 8 + Cd + H], conv_weight=rn(Cd, 4, scale=0.5).to(dtype),
                conv_bias=rn(Cd, scale=0.3).to(dtype), conv_state=rn(b, Cd, 3).to(dtype),
                A=-torch.exp(rn(H, scale=0.5)), D=rn(H), dt_bias=rn(H, scale=0.5) - 3.0,
                ssm=rn(b, H, P, N), G=G, N=N)


def call(inp, seq_len=None, config=None):
    from mamba2_cli.kernels import ssd

    return ssd.conv_ssd_prefill(inp["xBC"], inp["dt"], inp["conv_weight"], inp["conv_bias"], inp["conv_state"],
                                inp["A"], inp["D"], inp["dt_bias"], (0.0, float("inf")), 256, inp["G"], inp["N"],
                                inp["ssm"], seq_len, inp["ssm"], config=config)


@contextlib.contextmanager
def fold(mode):
    from mamba2_cli.kernels import ssd

    saved = ssd.CONV_FOLD
    ssd.CONV_FOLD = mode
    try:
        yield None
    finally:
        ssd.CONV_FOLD = saved


@contextlib.contextmanager
def blas_lt(mode):
    """fold `mode` with torch's matmuls through cuBLASLt (the prefill's in_proj and out_proj:
    another kernel choice, at the board's power limit perhaps another energy per product)."""
    saved = torch.backends.cuda.preferred_blas_library()
    if torch.cuda.is_available():
        torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        with fold(mode):
            yield None
    finally:
        if torch.cuda.is_available():
            torch.backends.cuda.preferred_blas_library(saved)


def shape(tiny):
    return (4, 16, 2, 16) if tiny else (128, 64, 8, 128)


def phase_check(dev, tiny):
    H, P, G, N = shape(tiny)
    dtype = torch.float16 if tiny else torch.bfloat16
    cases = [(1, 100, None), (2, 70, [70, 3])] if tiny else [(1, 8192, None), (2, 4096, [4096, 3001]), (1, 300, None)]
    for b, L, lens in cases:
        base = layer_inputs(b, L, H, P, G, N, dtype, dev, seed=b * 1000 + L)
        sl = torch.tensor(lens, device=dev) if lens else None
        out = {}
        for label, mode, cfg in LAYER_VARIANTS:
            st = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in base.items()}
            with fold(mode):
                y, s = call(st, sl, cfg)
            r7.sync(dev)
            out[label] = (y.float(), s.clone(), st["conv_state"].clone())
        y0, s0, c0 = out["fold0"]
        for label, (y, s, c) in out.items():
            if label == "fold0":
                continue
            log(f"  check b{b} L{L} {label:14s} y {r7.rel_err(y, y0):.1e} state {r7.rel_err(s, s0):.1e} "
                f"conv state equal {torch.equal(c, c0)} y finite {bool(torch.isfinite(y).all())}")


def phase_layer(dev, tiny):
    H, P, G, N = shape(tiny)
    dtype = torch.float16 if tiny else torch.bfloat16
    cases = [(1, 128), (2, 64)] if tiny else [(1, 8192), (1, 2048), (8, 4096), (1, 16384)]
    reps, n = (2, 2) if tiny else (7, 20)
    for b, L in cases:
        inp = layer_inputs(b, L, H, P, G, N, dtype, dev, seed=7)
        res: dict = {}
        for rep in range(reps):
            for label, mode, cfg in LAYER_VARIANTS:
                with fold(mode):
                    ms = r7.graph_ms(lambda: call(inp, None, cfg), dev, reps=n) if dev.type == "cuda" else 0.0
                    if dev.type != "cuda":
                        call(inp, None, cfg)
                if rep:
                    res.setdefault(label, []).append(ms)
        for label, v in res.items():
            v = sorted(v)
            log(f"  summary layer b{b} L{L} {label:14s} " + "/".join(f"{x:.4f}" for x in v)
                + f" median {v[len(v) // 2]:.4f} ms")


def main():
    def phases(dev, tiny):
        import gpu_round5 as r5

        r5.log = lambda m="": log(m)

        def prefill():
            model = r5.load_model(dev, tiny)
            cases = ((1, 64), (1, 256)) if tiny else ((1, 2048), (1, 65536))
            variants = (("fold0", lambda: fold(0)), ("fold1", lambda: fold(1)), ("fold3", lambda: fold(3)),
                        ("fold3 lt", lambda: blas_lt(3)))
            r29.alternated_prefill(model, dev, cases, variants, compare_logits=True, reps=2 if tiny else 4)

        return [("check", lambda: phase_check(dev, tiny)), ("layer", lambda: phase_layer(dev, tiny)),
                ("prefill", prefill)]

    r7.round_main(52, phases)


if __name__ == "__main__":
    main()
