"""GPU round 8 (session 3): the round-7 leads, measured in the model.

    PYTHONPATH=src python3 benchmarks/gpu_round8.py [--budget-s 500]        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round8.py --tiny   # CPU: runs

  step   mixer_decode_step in a graph of 64 layers, batch 1/2/4/8/64: P block and warps with
         B and C convolved once per group first (bc_pre) against the defaults
  model  alternated A/B runs: decoding ahead on/off (b1; the loop issued the next step before
         reading the token: no gain, 226.5 vs 226.6 tok/s, so it was taken out again and the
         switch this script sets is now inert), add_rmsnorm with 16 warps (b1, prefill),
         the batch-8 step configurations (b8), prefill pieces of 4096/8192/16384 tokens (65536)
Lines go to stdout and $OUT/round8.txt.
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

r7.LOG_NAME = "round8.txt"
log = r7.log


def step_sweep(dev, tiny, deadline):
    pre = [{"bc_pre": True, "BLOCK_P": p, "num_warps": w} for p, w in
           ((16, 4), (16, 2), (16, 1), (32, 4), (32, 2), (32, 1), (64, 2), (64, 4))]

    def variants(b):
        if b == 1:
            return [{}, {"bc_pre": True, "BLOCK_P": 16, "num_warps": 4}, {"bc_pre": True, "BLOCK_P": 32, "num_warps": 4}]
        return [{}, {"BLOCK_P": 64, "num_warps": 2}] + pre

    return r7.sweep_step(dev, tiny, deadline, (1, 2) if tiny else (1, 2, 4, 8, 64), variants, t0=T0)


def scan_small(dev, tiny, deadline):
    """The sequence split where a batch-1 grid is small: a mamba2-130m layer (24 heads)."""
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import ssd

    s = kb.SHAPES["tiny" if tiny else "small"]
    dtype = torch.float16 if tiny else torch.bfloat16
    for L in ((256,) if tiny else (4096, 16384)):
        inp = kb.ssd_inputs(s, 1, L, dev, dtype)
        ref = None
        for nseg in (1, 2, 3, 4, 6, 8):
            if time.time() - T0 > deadline:
                return
            cfg = {"SEGMENTS": nseg}
            try:
                y, st = kb.run_ssd(ssd.ssd_prefill, inp, s.chunk, config=cfg)
                if ref is None:
                    ref, e = (y.clone(), st.clone()), 0.0
                else:
                    e = max(r7.rel_err(y, ref[0]), r7.rel_err(st, ref[1]))
                ms = kb.time_ms(lambda: kb.run_ssd(ssd.ssd_prefill, inp, s.chunk, config=cfg), dev)
                log(f"  scan small b1 L{L:<6d} segments {nseg}  {ms:8.4f} ms  err {e:.1e}{'  WRONG' if e > 2e-2 else ''}")
            except Exception as ex:
                r7.err_line(f"scan small L{L} seg{nseg}", ex)


def model_ab(model, dev, tiny, deadline, best_step):
    import mamba2_cli.generate as gen
    from mamba2_cli.bench import bench_model
    from mamba2_cli.generate import owned_state
    from mamba2_cli.kernels import norm, step

    def fresh():
        r7.drop_graphs(model)

    def decode(b, n=None):
        fresh()
        r = bench_model(model, prompt_len=64, gen_len=8 if tiny else (n or 128), batch_size=b, repeats=1 if tiny else 2)
        return r["decode_tok_s"]

    def set_(ahead=True, add16=False, step_batch=()):
        gen.DECODE_AHEAD = ahead
        norm.NORM_CONFIG["add_warps"] = 16 if add16 else None
        step.STEP_BATCH_CONFIG[:] = list(step_batch)

    reps = 1 if tiny else 3
    res: dict = {}
    b8_variants = [("defaults", ())]
    if 8 in best_step:
        b8_variants.append((f"best {best_step[8][1]}", [(2, best_step[8][1])]))
    b8_variants.append(("p64 w2", [(2, {"BLOCK_P": 64, "num_warps": 2})]))
    plan = [("b1 ahead", lambda: (set_(True), decode(1))[1]),
            ("b1 no ahead", lambda: (set_(False), decode(1))[1]),
            ("b1 ahead add16", lambda: (set_(True, True), decode(1))[1])]
    plan += [(f"b8 {name}", (lambda sb: lambda: (set_(step_batch=sb), decode(8))[1])(sb)) for name, sb in b8_variants]
    try:
        for rep in range(reps):
            for name, fn in plan:
                if time.time() - T0 > deadline * 0.6:
                    raise TimeoutError("decode: out of time")
                v = fn()
                res.setdefault(name, []).append(v)
                log(f"  {name:40s} {v:8.1f} tok/s/seq")
    except Exception as e:
        r7.err_line("decode", e)
    finally:
        set_()
    L = 256 if tiny else 65536
    ids = torch.randint(3, model.cfg.vocab_size, (1, L))
    state = owned_state(model, 1)

    def pf(piece, add16=False):
        set_(add16=add16)
        return r7.timed_prefill(model, ids, state, dev, chunk_tokens=piece)

    pieces = (64, 128) if tiny else (4096, 8192, 16384)
    try:
        pf(pieces[0])
        for rep in range(1 if tiny else 2):
            for piece in pieces:
                for add16 in (False, True):
                    if time.time() - T0 > deadline:
                        raise TimeoutError("prefill: out of time")
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    t = pf(piece, add16)
                    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
                    name = f"prefill {L} piece {piece}{' add16' if add16 else ''}"
                    res.setdefault(name, []).append(t)
                    log(f"  {name:40s} {t:8.4f} s  peak {peak:.1f} GiB")
    except Exception as e:
        r7.err_line("prefill", e)
    finally:
        set_()
    log("## summary")
    for k, v in res.items():
        log(f"  {k:40s} " + ", ".join(f"{x:.4g}" for x in v) + f"   median {sorted(v)[len(v) // 2]:.4g}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--budget-s", type=float, default=500.0)
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    log(f"# round 8 on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    best = {}
    with torch.inference_mode():
        if "step" not in skip:
            log(f"## step ({time.time() - T0:.0f} s)")
            best = step_sweep(dev, args.tiny, args.budget_s * 0.3)
        if "scan" not in skip:
            log(f"## scan small ({time.time() - T0:.0f} s)")
            scan_small(dev, args.tiny, args.budget_s * 0.38)
        if "model" not in skip:
            import gpu_round5 as r5

            r5.log = lambda m="": log(m)
            model = r5.load_model(dev, args.tiny)
            log(f"## model ({time.time() - T0:.0f} s)")
            model_ab(model, dev, args.tiny, args.budget_s, best)
    log(f"## done in {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
