"""GPU round 36 (session 8), timing only: would in_proj cut in two, with the step on a graph branch
beside the z product, pay at batch 1? (NOTES.md session 8's last sketch.)

    PYTHONPATH=src timeout 300 python3 benchmarks/gpu_round36.py        # H200
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu_round36.py --tiny  # CPU: runs (no timing)

Per layer in CUDA graphs of 64 Codestral layers (each its own weights and state), alternated:
  whole   add_rmsnorm -> in_proj -> mixer_decode_step (one launch) -> out_proj   (what decode runs)
  split   add_rmsnorm -> in_proj's x, B, C, dt rows -> [the step's first kernel (split form) on the
          main stream | in_proj's z rows on a side stream] -> join -> the step's norm kernel -> out_proj
The split form's step reads a z the side stream is still writing, and the two products write
their own buffers, not the step's input: its outputs are garbage, its timing is what is asked.
Lines go to stdout and $OUT/round36.txt.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round7 as r7  # noqa: E402
import gpu_round33 as r33  # noqa: E402

r7.LOG_NAME = "round36.txt"
log = r7.log


def phase(dev, tiny):
    from mamba2_cli import kernel_bench as kb
    from mamba2_cli.kernels import gemv, norm, step

    s = kb.SHAPES["tiny" if tiny else "codestral"]
    dtype = torch.float16 if tiny else torch.bfloat16
    G, n = s.ngroups, (2 if tiny else 64)
    layers = kb.mixer_layers(s, n, 1, dev, dtype, seed=3)
    gen = torch.Generator(device=dev).manual_seed(4)
    for st in layers:
        st["W_in"] = (torch.randn(s.in_proj, s.d_model, generator=gen, device=dev) * 0.02).to(dtype)
        st["W_out"] = (torch.randn(s.d_model, s.d_inner, generator=gen, device=dev) * 0.02).to(dtype)
        st["nw"] = torch.ones(s.d_model, device=dev, dtype=dtype)
    h0 = torch.randn(1, s.d_model, generator=gen, device=dev).to(dtype)
    res0 = torch.randn(1, s.d_model, generator=gen, device=dev)
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    real_norm_kernel = step._group_norm_kernel

    def whole():
        h, res = h0, res0
        for st in layers:
            normed, res = norm.add_rmsnorm(h, res, st["nw"], 1e-5)
            st["zxbcdt"] = gemv.linear(normed, st["W_in"])
            h = gemv.linear(kb.call_mixer(step.mixer_decode_step, st, G), st["W_out"])
        return h

    class JoinFirst:  # the step's norm kernel, launched after the main stream waits for the side's z
        def __init__(self, ev):
            self.ev = ev

        def __getitem__(self, grid):
            def go(*a, **kw):
                if self.ev is not None:
                    torch.cuda.current_stream(dev).wait_event(self.ev)
                return real_norm_kernel[grid](*a, **kw)
            return go

    def split():
        h, res = h0, res0
        d = s.d_inner
        for st in layers:
            normed, res = norm.add_rmsnorm(h, res, st["nw"], 1e-5)
            gemv.linear(normed, st["W_in"][d:])
            ev = None
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    gemv.linear(normed, st["W_in"][:d])
                    ev = torch.cuda.Event()
                    ev.record(side)
            else:
                gemv.linear(normed, st["W_in"][:d])
            step._group_norm_kernel = JoinFirst(ev)
            try:
                y = kb.call_mixer(step.mixer_decode_step, st, G, config={"split": True})
            finally:
                step._group_norm_kernel = real_norm_kernel
            h = gemv.linear(y, st["W_out"])
        return h

    fns = {"whole": whole, "split": split}
    for name, f in fns.items():
        log(f"  {name}: ran, output finite {bool(torch.isfinite(f().float()).all())}")
    if dev.type != "cuda":
        return
    r33._timed("layer", {k: None for k in fns}, lambda name: [fns[name]], n, dev, reps=5)


def main():
    r7.round_main(36, lambda dev, tiny: [("split in_proj", lambda: phase(dev, tiny))])


if __name__ == "__main__":
    main()
