"""GPU round 21 (session 6): the scan's B, C and C B^T reach the loop body late.

Triton's pipeliner (num_stages 2) issues the next chunk's copies of B, C and C B^T at the end
of the loop body and waits for them at the start of the next trip (read off the TTGIR here),
so every chunk step waits one trip to memory for them. Variants: a third stage (copies two
trips ahead; more shared memory), C B^T prefetched into registers (PREFETCH 3) or B and C
(PREFETCH 4), and a chunk of 32 (a third of the shared memory per stage).

    PYTHONPATH=src python3 benchmarks/gpu_round21.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round21.py --tiny  # CPU: runs

Each variant is checked against the default (y and final state, relative error) and timed
twice, alternated, at b1 L4096 and L16384 (bench's inputs). If one beats the default at
L16384 by more than 3 %, the 65536-token prefill runs with it against the default, alternated.
Lines go to stdout and $OUT/round21.txt.
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
r7.LOG_NAME = "round21.txt"
log = r7.log

VARIANTS = [
    ("default", {}),
    ("s3", {"num_stages": 3}),
    ("pf3", {"PREFETCH": 3}),
    ("pf3 s3", {"PREFETCH": 3, "num_stages": 3}),
    ("pf4", {"PREFETCH": 4}),
    ("pf4 s3", {"PREFETCH": 4, "num_stages": 3}),
    ("q32 s3", {"CHUNK": 32, "num_stages": 3}),
    ("q32 s4", {"CHUNK": 32, "num_stages": 4}),
    ("q32 pf3 s3", {"CHUNK": 32, "PREFETCH": 3, "num_stages": 3}),
    ("q32 p64 w4 s3", {"CHUNK": 32, "BLOCK_P": 64, "num_stages": 3}),
]


def scan_phase(dev, tiny, variants=None, cases=None, shape=None):
    """variants: (name, config) pairs, the first the reference (VARIANTS by default); cases:
    (batch, L) pairs (batch 1 at L4096 and L16384 by default); shape: a KernelShape (one
    Codestral layer by default). Returns the best time of each variant per case, keyed by L
    for batch 1 and by (batch, L) otherwise."""
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import ssd

    s = shape or kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    variants = VARIANTS if variants is None else variants
    cases = cases or (((1, 256),) if tiny else ((1, 4096), (1, 16384)))
    best = {}
    for b, L in cases:
        inp = kb.ssd_inputs(s, b, L, dev, dtype)
        ref = None
        times: dict = {}
        tag = (f"L{L}" if b == 1 else f"b{b} L{L}") + ("" if shape is None else f" {s.name}")
        for rep in range(2):
            for name, cfg in variants:
                try:
                    if rep == 0:
                        y, st = kb.run_ssd(ssd.ssd_prefill, inp, s.chunk, config=cfg)
                        if ref is None:
                            ref = (y.clone(), st.clone())
                        ey, es = r7.rel_err(y, ref[0]), r7.rel_err(st, ref[1])
                        log(f"  scan {tag} {name:16s} y {ey:.1e} state {es:.1e}{'' if max(ey, es) < 2e-2 else '  WRONG'}")
                        if max(ey, es) >= 2e-2:
                            times[name] = None
                    if dev.type != "cuda" or times.get(name, 0) is None:
                        continue
                    ms = kb.time_ms(lambda: kb.run_ssd(ssd.ssd_prefill, inp, s.chunk, config=cfg), dev)
                    times.setdefault(name, []).append(ms)
                    log(f"  scan {tag} {name:16s} {ms:8.4f} ms")
                except Exception as e:
                    r7.err_line(f"scan {tag} {name}", e)
                    times[name] = None
        for name, v in times.items():
            if v:
                log(f"  summary scan {tag} {name:16s} " + ", ".join(f"{x:.4f}" for x in v) + " ms")
        key = (L if b == 1 else (b, L)) if shape is None else (s.name, b, L)
        best[key] = {n: min(v) for n, v in times.items() if v}
    return best


def model_phase(model, dev, best, threshold=0.97, variants=None):
    """The 65536-token prefill with the best variant at L16384 against the default, if it
    beats the default there by more than 1 - threshold."""
    from mamba2_cli.generate import owned_state
    from mamba2_cli.kernels import ssd

    times = best.get(16384) or {}
    if "default" not in times:
        log("  model: no scan times")
        return
    name, t = min(times.items(), key=lambda kv: kv[1])
    if t > times["default"] * threshold:
        log(f"  model: no variant beats the default by {100 * (1 - threshold):.1f} % at L16384 (best {name} {t:.4f} ms against "
            f"{times['default']:.4f})")
        return
    cfg = dict(VARIANTS if variants is None else variants)[name]
    L = 65536
    ids = torch.randint(3, model.cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(4))
    state = owned_state(model, 1)
    base = dict(ssd.SCAN_CONFIG)
    res: dict = {}
    for rep in range(3):
        for label, over in (("default", {}), (name, cfg)):
            ssd.SCAN_CONFIG.clear()
            ssd.SCAN_CONFIG.update({**base, **over})
            try:
                p = r7.timed_prefill(model, ids, state, dev)
                res.setdefault(label, []).append(p)
                log(f"  model prefill {L} scan {label:16s} {p:.4f} s")
            finally:
                ssd.SCAN_CONFIG.clear()
                ssd.SCAN_CONFIG.update(base)
    for label, v in res.items():
        v = sorted(v)
        log(f"  summary model prefill {L} scan {label:16s} " + "/".join(f"{x:.4f}" for x in v) + f" median {v[1]:.4f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, _ = r7.setup(21, args.tiny, load=False)
    r7.T0 = T0
    out = {}
    r7.run_phases([("scan", lambda: out.setdefault("best", scan_phase(dev, args.tiny)))])
    if dev.type == "cuda" and out.get("best"):
        _, model = r7.setup(21, args.tiny)
        r7.run_phases([("model", lambda: model_phase(model, dev, out["best"]))])


if __name__ == "__main__":
    main()
