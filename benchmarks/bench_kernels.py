"""The triton backend's kernels on one layer, checked against the PyTorch backend and timed.

    PYTHONPATH=src python benchmarks/bench_kernels.py [--set KERNEL.ENTRY.KEY=VALUE ...] [--out DIR]

Prints the ceilings (device copy bandwidth, matmul FLOP/s), then every kernel case of
`mamba2 bench` (SSD prefill, the decode step, conv, norms; `mamba2_cli.kernel_bench` holds
the inputs, counts and timer) and the decode matvecs (in_proj, out_proj, lm_head at 1 and
8 rows, against cuBLAS), and writes the rows to DIR/bench_kernels.json.

`--set` changes one entry of a launch configuration table (kernels/triton/configs.py) for
the run, e.g. `--set decode_step.batch8+.bc_pre=False` or `--set matvec.rows1.num_warps=4`:
a sweep is one run per value. `--device cpu --shape tiny --dtype float32` runs the kernels
in Triton's CPU interpreter (TRITON_INTERPRET=1): a smoke test whose times mean nothing.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from mamba2_cli import kernel_bench as kb
from mamba2_cli.kernel_bench import rel_err, time_ms

S = kb.SHAPES["codestral"]  # main() may change these three
DEV = torch.device("cuda")
DTYPE = torch.bfloat16
ROWS: list[dict] = []


def row(section: str, what: str, ms: float, **extra) -> dict:
    r = {"section": section, "what": what, "ms": ms, **extra}
    ROWS.append(r)
    tail = " ".join(f"{k}={v}" for k, v in extra.items() if v is not None)
    print(f"{section:8s} {what:52s} {ms * 1e3:10.1f} us  {tail}", flush=True)
    return r


def set_config(assignment: str) -> None:
    """KERNEL.ENTRY.KEY=VALUE: that key of every capability's table entry (VALUE a Python literal)."""
    from mamba2_cli.kernels.triton import configs

    path, _, text = assignment.partition("=")
    kernel, entry, key = path.split(".", 2) if path.count(".") >= 2 else (path, "", "")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    for table in configs.TABLES.values():
        if kernel not in table or entry not in table[kernel] or key not in table[kernel][entry]:
            known = {k: sorted(v) for k, v in table.items()}
            raise SystemExit(f"--set {assignment}: no such entry; the tables hold {json.dumps(known)}")
        table[kernel][entry][key] = value


def ceilings() -> dict:
    bw = kb.copy_bandwidth(DEV)
    flop_s, n = kb.matmul_ceiling(DEV, DTYPE)
    row("ceiling", "device copy (read + write)", 0.0, TBps=round(bw / 1e12, 3))
    row("ceiling", f"matmul {n}^3 {str(DTYPE).removeprefix('torch.')}", 2 * n**3 / flop_s * 1e3,
        TFLOPs=round(flop_s / 1e12, 1))
    return {"copy_bytes_s": bw, "matmul_flop_s": flop_s}


def bench_layer(ceil: dict) -> None:
    """Every case of `mamba2 bench`'s kernel table, triton backend."""
    for r in kb.run_kernels("triton", DEV, S, DTYPE, ceil):
        if "error" in r:
            print(f"{r['kernel']:8s} {r['case']}: {r['error']}", flush=True)
            continue
        row(r["kernel"], f"{r['case']} {r.get('timing', '')}".strip(), r["ms"], err=_fmt(r.get("err")),
            of_copy=_pct(r.get("share_of_copy")), of_matmul=_pct(r.get("share_of_matmul")))


def bench_matvec(ceil: dict) -> None:
    """Decode's three projections at 1 and 8 rows: the matvec kernels against cuBLAS (F.linear)."""
    from mamba2_cli.kernels.triton import matvec

    g = torch.Generator(device=DEV).manual_seed(5)
    vocab = 32768 if S.name == "codestral" else 1024
    shapes = {"in_proj": (S.in_proj, S.d_model), "out_proj": (S.d_model, S.d_inner), "lm_head": (vocab, S.d_model)}
    for name, (n_out, k_in) in shapes.items():
        w = (torch.randn(n_out, k_in, generator=g, device=DEV) * k_in ** -0.5).to(DTYPE)
        for rows in (1, 8):
            x = torch.randn(rows, k_in, generator=g, device=DEV).to(DTYPE)
            err = rel_err(matvec.matvec(x, w), F.linear(x.float(), w.float()))
            nbytes = (n_out * k_in + rows * (k_in + n_out)) * w.element_size()
            entry = matvec.entry_for(rows, k_in)
            for who, fn in (("triton " + entry, lambda: matvec.matvec(x, w)), ("cublas", lambda: F.linear(x, w))):
                if who == "cublas" and DEV.type != "cuda":
                    continue
                ms = time_ms(fn, DEV)
                row("matvec", f"{name} {n_out}x{k_in} b{rows} {who}", ms, err=_fmt(err) if who != "cublas" else None,
                    of_copy=_pct(nbytes / (ms * 1e-3) / ceil["copy_bytes_s"]))


def _fmt(v) -> str | None:
    return None if v is None else f"{v:.1e}"


def _pct(v) -> str | None:
    return None if v is None else f"{100 * v:.1f}%"


def main(argv=None) -> int:
    global S, DEV, DTYPE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], metavar="KERNEL.ENTRY.KEY=VALUE",
                    help="change one launch configuration entry for this run (repeatable)")
    ap.add_argument("--only", choices=["layer", "matvec"], help="one section only")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_kernels.json")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with TRITON_INTERPRET=1")
    ap.add_argument("--shape", default="codestral", choices=sorted(kb.SHAPES), help="layer shape (kernel_bench.SHAPES)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    S, DEV, DTYPE = kb.SHAPES[args.shape], torch.device(args.device), getattr(torch, args.dtype)
    from mamba2_cli.errors import Mamba2Error
    from mamba2_cli.kernels import get_backend

    try:
        get_backend("triton", DEV.type)
    except Mamba2Error as e:
        raise SystemExit(f"bench_kernels: {e}")
    for assignment in args.set:
        set_config(assignment)
    import triton

    if DEV.type == "cuda":
        props = torch.cuda.get_device_properties(DEV)
        device_name = f"{props.name}, {props.multi_processor_count} SMs"
    else:
        device_name = "cpu (Triton interpreter)"
    print(f"# {device_name}, torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today()}; "
          f"{S.name} layer: {S.describe()}, {args.dtype}" + "".join(f"; --set {a}" for a in args.set), flush=True)
    t0 = time.time()
    with torch.inference_mode():
        ceil = ceilings()
        if args.only in (None, "layer"):
            bench_layer(ceil)
        if args.only in (None, "matvec"):
            bench_matvec(ceil)
    print(f"# total {time.time() - t0:.0f} s", flush=True)
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump({"device": device_name, "shape": S.as_dict(), "dtype": args.dtype, "set": args.set,
                   "rows": ROWS}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
