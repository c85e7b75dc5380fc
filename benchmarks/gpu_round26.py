"""GPU round 26 (session 7): batch-1 prefill cut into segments, run with the batch-8 configuration.

Round 25 (gpu_round23.py --round 25): a Codestral layer at batch 1, cut into 4 segments and run
with SCAN_CONFIG_MANY (chunk 32, P block 64, C B^T inline; 512 programs in the second pass)
and a third pipeline stage in the states-only pass, took 0.798 ms at L16384 against 0.926 for
the default, and 0.223 against 0.245 ms at L4096; the 65536-token prefill 1.759 s against
1.778. Fewer or more segments were slower (2: 1.02 ms, 8: 0.89-0.96): the second pass wants
about as many programs as the SMs hold at once. This round picks the rule: segments so that
the second pass has about SPLIT_PROGRAMS programs (T), each segment at least SPLIT_MIN_CHUNKS
chunks long (m), the states pass at `s` stages; at short lengths, at batch 2-3, and on the
smaller models' layers (mamba2-130m: 24 heads; mamba2-2.7b: 80 heads, 1 group).

    PYTHONPATH=src python3 benchmarks/gpu_round26.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round26.py --tiny  # CPU: runs

Each variant is checked against the default (which picks its own configuration, as
ssd_prefill does) and timed twice, alternated. Then the model prefill at 2048 and 65536 tokens
with the best rule at Codestral b1 L16384 against the default, alternated. Lines go to stdout
and $OUT/round26.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round21 as r21  # noqa: E402

T0 = time.time()
r7.LOG_NAME = "round26.txt"
log = r7.log


def variants():
    from mamba2_cli.kernels import ssd

    many = dict(ssd.SCAN_CONFIG_MANY)

    def rule(T, m, s, **extra):
        return {**many, "SPLIT_PROGRAMS": T, "SPLIT_MIN_CHUNKS": m, "states": {"num_stages": s}, **extra}

    return [
        ("default", {}),
        ("T384 m16 s3", rule(384, 16, 3)),
        ("T512 m16 s3", rule(512, 16, 3)),
        ("T640 m16 s3", rule(640, 16, 3)),
        ("T512 m8 s3", rule(512, 8, 3)),
        ("T512 m16 s4", rule(512, 16, 4)),
        ("T512 m16 s3 main s4", rule(512, 16, 3, num_stages=4)),
        ("T512 m16 s3 st p32", {**rule(512, 16, 3), "states": {"num_stages": 3, "BLOCK_P": 32}}),
    ]


def shapes(tiny):
    from mamba2_cli import kernel_bench as kb

    if tiny:
        return [(None, ((1, 256), (2, 128)))]
    s27 = kb.KernelShape("2.7b", 80, 64, 1, 128, 4, 256, 2560, prefill=(), decode_batches=(), decode_layers=64,
                         long_len=16384)
    return [
        (None, ((1, 1024), (1, 2048), (1, 4096), (1, 16384), (2, 4096), (3, 4096))),
        (kb.SHAPES["small"], ((1, 2048), (1, 16384))),
        (s27, ((1, 4096), (1, 16384))),
    ]


def model_phase(model, dev, best, vs, target=None, key=None):
    """The model's prefill at 2048 and 65536 tokens with the best variant at Codestral b1
    L16384 against the default, alternated: each variant's config updates `target`
    (ssd.SCAN_CONFIG by default), or its `key` entry when key is given."""
    from mamba2_cli.generate import owned_state
    from mamba2_cli.kernels import ssd

    times = best.get(16384) or {}
    if "default" not in times:
        log("  model: no scan times")
        return
    name = min(times.items(), key=lambda kv: kv[1])[0]
    if name == "default":
        log("  model: the default is best at L16384")
        return
    over = dict(vs)[name]
    target = ssd.SCAN_CONFIG if target is None else target
    base = dict(target)
    for L in (2048, 65536):
        ids = torch.randint(3, model.cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(4))
        state = owned_state(model, 1)
        res: dict = {}
        for rep in range(3):
            for label, cfg in (("default", {}), (name, over)):
                target.update({**base, **(cfg.get(key, {}) if key else cfg)})
                try:
                    p = r7.timed_prefill(model, ids, state, dev)
                    res.setdefault(label, []).append(p)
                    log(f"  model prefill {L} scan {label:20s} {p:.4f} s")
                finally:
                    target.clear()
                    target.update(base)
        for label, v in res.items():
            v = sorted(v)
            log(f"  summary model prefill {L} scan {label:20s} " + "/".join(f"{x:.4f}" for x in v)
                + f" median {v[len(v) // 2]:.4f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, _ = r7.setup(26, args.tiny, load=False)
    r7.T0 = T0
    vs = variants()
    best: dict = {}

    def scans():
        for shape, cases in shapes(args.tiny):
            best.update(r21.scan_phase(dev, args.tiny, vs, cases, shape))

    r7.run_phases([("scan", scans)])
    if dev.type == "cuda" and best:
        _, model = r7.setup(26, args.tiny)
        r7.run_phases([("model", lambda: model_phase(model, dev, best, vs))])


if __name__ == "__main__":
    main()
