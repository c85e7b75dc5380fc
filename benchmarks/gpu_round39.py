"""GPU round 39 (session 9): the 2-8-row matvec in persistent programs (`dotp`) against the
one-tile-per-program `dot` kernel, per weight shape at 8 rows, then Codestral decode at batch 8
with the best layouts, alternated. It ran at 764671c, where `dotp` dealt whole tiles to its
programs; `dotp` is stream-K since e5f1ba8 (round 40), so a rerun times that instead. Rounds 40-42
reuse this script's phases with their own layout lists.

    PYTHONPATH=src timeout 570 python3 benchmarks/gpu_round39.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round39.py --tiny  # CPU: runs

Lines go to stdout and $OUT/round39.txt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402
import gpu_round34 as r34  # noqa: E402

r7.LOG_NAME = "round39.txt"
log = r7.log
ROWS = 8
ROUND = 39
# dotp layouts (BLOCK_N, BLOCK_K, stages, warps, programs per SM). Round 39 (session 9, 764671c):
# tiles dealt whole to the programs; round 40 sets this to the stream-K layouts.
DOTP = [(64, 256, 4, 4, 1), (64, 128, 6, 4, 1), (32, 256, 4, 4, 2), (32, 256, 4, 4, 3), (32, 128, 6, 4, 3),
        (16, 256, 4, 4, 4), (16, 512, 3, 4, 3), (16, 256, 4, 2, 4), (16, 128, 6, 4, 4), (32, 256, 3, 4, 4)]
# dot layouts with tma (BLOCK_N, BLOCK_K, stages, warps); named "dott", as round 41 (at 56c26f7, the
# descriptor body was a kernel of its own then) named them.
DOTT = []
DOTPT = []  # dotp layouts with tma, as DOTP


def configs(gemv, tiny):
    C = gemv.GemvConfig
    if tiny:
        return {"dot (default)": gemv.GEMV_CONFIG[8], "dotp n16 k32 s3 p1": C("dotp", 16, 32, 4, num_stages=3, per_sm=1),
                "dotp n16 k64 s2 p2": C("dotp", 16, 64, 4, num_stages=2, per_sm=2, evict_first=True),
                "dott n16 k32 s3": C("dot", 16, 32, 4, num_stages=3, tma=True),
                "dotp tma n16 k32 s3 p1": C("dotp", 16, 32, 4, num_stages=3, per_sm=1, tma=True)}
    out = {"dot (default)": gemv.GEMV_CONFIG[8], "dot n64 k128 s6": C("dot", 64, 128, 4, num_stages=6, evict_first=True)}
    for bn, bk, st, w, p in DOTP:
        out[f"dotp n{bn} k{bk} w{w} s{st} p{p}"] = C("dotp", bn, bk, w, num_stages=st, per_sm=p, evict_first=True)
    for bn, bk, st, w in DOTT:
        out[f"dott n{bn} k{bk} w{w} s{st}"] = C("dot", bn, bk, w, num_stages=st, tma=True)
    for bn, bk, st, w, p in DOTPT:
        out[f"dotp tma n{bn} k{bk} w{w} s{st} p{p}"] = C("dotp", bn, bk, w, num_stages=st, per_sm=p, tma=True)
    return out


def matvec_phase(dev, tiny):
    """Each layout checked against F.linear (fp32) at 8 rows, then timed per weight shape in graphs
    of the layers' own weights (round 34's phase). Returns (layouts, {shape: {name: median µs}})."""
    from mamba2_cli.kernels import gemv

    cfgs = configs(gemv, tiny)
    r34.log = log
    return cfgs, r34.matvec_phase(dev, tiny, cfgs, rows=ROWS)


def best(times, cfgs, weights):
    """The layout with the least weighted time over the shapes in `weights` (timed at all of them)."""
    scores = {}
    for name in cfgs:
        if all(name in times.get(lab, {}) for lab in weights):
            scores[name] = sum(w * times[lab][name] for lab, w in weights.items())
    return min(scores, key=scores.get) if scores else None


def model_phase(dev, tiny, cfgs, times):
    from mamba2_cli.kernels import gemv, step

    if not cfgs:
        log("  model phase: no layouts (the matvec phase did not run)")
        return
    default = dict(gemv.GEMV_CONFIG)
    default_pdl = step.STEP_CONFIG["pdl"]
    if dev.type == "cuda":
        one = best(times, cfgs, {"in_proj": 64, "out_proj": 64, "lm_head": 1})
        k4096 = best(times, cfgs, {"in_proj": 64, "lm_head": 1})
        k8192 = best(times, cfgs, {"out_proj": 64})
    else:
        one = k4096 = k8192 = list(cfgs)[-1]
    log(f"  model phase: one layout {one}; by K: 4096 {k4096}, 8192 {k8192}")
    K4096, K8192 = (32, 64) if tiny else (4096, 8192)

    def apply(cfg):
        gemv.GEMV_CONFIG.update(default)
        gemv.MULTI_BY_K.clear()
        step.STEP_CONFIG["pdl"] = bool(cfg.get("pdl")) or default_pdl
        if cfg.get("one"):
            for r in (2, 4, 8):
                gemv.GEMV_CONFIG[r] = cfgs[one]
        if cfg.get("by_k"):
            gemv.MULTI_BY_K.update({K4096: cfgs[k4096], K8192: cfgs[k8192]})

    variants = {"dot (default)": {}, f"one: {one}": {"one": True}}
    if (k4096, k8192) != (one, one):
        variants["by K"] = {"by_k": True}
    variants["step pdl"] = {"pdl": True}
    variants["one + step pdl"] = {"one": True, "pdl": True}
    r33.model_variants(dev, tiny, variants, apply, batch=ROWS)


def phases(dev, tiny):
    """The matvec phase, then the model phase with the layouts it found fastest."""
    got = {}

    def mv():
        got["cfgs"], got["times"] = matvec_phase(dev, tiny)

    return [("matvec", mv), ("model", lambda: model_phase(dev, tiny, got.get("cfgs") or {}, got.get("times") or {}))]


def main():
    r7.round_main(ROUND, phases)


if __name__ == "__main__":
    main()
