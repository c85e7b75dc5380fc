"""`mamba2 bench`: prefill and decode speed, and each kernel of one layer, against the device's measured ceilings."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from .common import dtype_name, dumps, fail, size, stderr_console
from .options import MODEL_HELP, Device, DTypeOption, NoCudaGraph, Offline, Threads, choices, value

BenchBackend = choices("BenchBackend", "auto", "torch", "triton", "all")
# The kernel bench's layer shapes (kernel_bench.SHAPES), and auto.
KernelShapeName = choices("KernelShapeName", "auto", "codestral", "small", "tiny")
ReportFormat = choices("ReportFormat", "table", "md")
BenchQuant = choices("BenchQuant", "int8", "int4", "all")


def bench(
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help="Random-weight shape: mamba2-130m (the default without -m), mamba2-2.7b, codestral-7b, ...")]
    = None,
    model: Annotated[Optional[str], typer.Option(
        "-m", "--model", help="Benchmark a real checkpoint instead: " + MODEL_HELP)] = None,
    offline: Offline = False,
    backend: Annotated[BenchBackend, typer.Option(
        "--backend", help="auto: triton on CUDA, torch elsewhere; all: torch and triton side by side.")] = "auto",
    device: Device = "auto",
    dtype: DTypeOption = "auto",
    quant: Annotated[Optional[BenchQuant], typer.Option(
        "--quant", help="Quantized projections (int8, int4), or all: unquantized, int8 and int4 side by side.")] = None,
    threads: Threads = None,
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, help="Prompt tokens of the prefill measured.")] = 128,
    gen_len: Annotated[int, typer.Option("--gen-len", min=1, help="Tokens decoded after it.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences generated together.")] = 1,
    depth: Annotated[Optional[int], typer.Option(
        "--depth", min=1, help="Also measure decode after a context of this many tokens.")] = None,
    repeats: Annotated[int, typer.Option(
        "--repeats", min=1, help="Timed runs after the warm-up; figures are their medians.")] = 3,
    no_cuda_graph: Annotated[bool, typer.Option("--no-cuda-graph", help="Prefill and decode eagerly on GPUs.")] = False,
    kernels: Annotated[bool, typer.Option(
        "--kernels/--no-kernels",
        help="Also time each kernel of one layer (SSD scan, decode step, conv, norms, matvec).")] = True,
    kernel_shape: Annotated[KernelShapeName, typer.Option(
        "--kernel-shape", help="Layer of the kernel figures: codestral, small (a mamba2-130m layer, shorter lengths), "
        "tiny, or auto (codestral on GPUs, small on CPUs, tiny under Triton's CPU interpreter).")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    fmt: Annotated[ReportFormat, typer.Option("--format", help="A terminal table, or Markdown.")] = "table",
):
    """Measure prefill and decode speed, and each kernel of one layer, against the device's measured ceilings."""
    from ..bench import bench_model, bytes_per_decode_step, environment, prefill_flops
    from ..checkpoint import resolve_device
    from ..kernel_bench import case_count, choose_shape, copy_bandwidth, matmul_ceiling, run_kernels
    from .options import choose_threads

    backend, dtype, kernel_shape, fmt = value(backend), value(dtype), value(kernel_shape), value(fmt)
    quants = [None, "int8", "int4"] if value(quant) == "all" else [value(quant)]
    import torch

    if threads:
        torch.set_num_threads(threads)
    threads_before = torch.get_num_threads()
    if model and preset:
        fail("give either -m/--model or --preset, not both")
    if model:  # fetched first, if need be, with the terminal to itself; loading then finds it cached
        from ..hub import resolve_model

        resolve_model(model, offline=offline)
    if not model and not preset:
        preset = "mamba2-130m"
        if not as_json:
            stderr_console().print(f"[dim]no model given: measuring random weights of the {preset} shape (--preset "
                                   f"{preset}); -m MODEL measures a checkpoint, --preset NAME another shape[/]")
    dev = resolve_device(device)
    backends = ["torch", "triton"] if backend == "all" else [backend]
    lengths = [prompt_len] + ([depth] if depth else [])
    kshape = choose_shape(kernel_shape, dev, backends) if kernels else None
    m = tok = None
    rows, krows = [], []
    from rich.progress import Progress

    with Progress(transient=True, console=stderr_console(), disable=as_json) as progress:
        warmups = 2 if dev.type == "cuda" and not no_cuda_graph else 1  # as bench_model runs them
        total = len(backends) * (len(quants) * len(lengths) * (repeats + warmups) + (case_count(kshape) if kshape else 0)) + 2
        task = progress.add_task("copy bandwidth", total=total)
        bw = copy_bandwidth(dev)
        progress.advance(task)
        loaded_quant = None
        for q, b in [(q, b) for q in quants for b in backends]:
            progress.update(task, description=f"loading · {b}" + (f" · {q}" if q else ""))
            if m is None or q != loaded_quant:
                m, loaded_quant = None, q
                _free_device_memory(dev)
                if model:
                    from ..loader import load_model

                    m, tok = load_model(model, dev, dtype, b, batch_size, quant=q)
                else:
                    from ..loader import load_preset

                    m, _ = load_preset(preset, dev, dtype, b, batch_size=batch_size, quant=q)
                choose_threads(m, threads)
            else:
                m.set_backend(b)
            for L in lengths:
                progress.update(task, description=f"{m.backend_name} · prefill {L} tokens, decode {gen_len} · "
                                                  f"batch {batch_size}")
                r = bench_model(m, L, gen_len, batch_size, repeats, cuda_graph=not no_cuda_graph, tokenizer=tok,
                                on_step=lambda: progress.advance(task))
                step_bytes = bytes_per_decode_step(m, batch_size)
                r.update(backend=m.backend_name, model=model or f"preset:{preset}",
                         weights=m.quant.scheme if m.quant else dtype_name(m.dtype),
                         dtype=dtype_name(m.dtype), bytes_per_step=step_bytes,
                         bandwidth_share=step_bytes * r["decode_tok_s"] / bw,
                         prefill_flop=prefill_flops(m, batch_size, L))
                rows.append(r)
        torch.set_num_threads(threads_before)  # the thread policy sets torch's count per forward
        progress.update(task, description="matmul ceiling")
        mm_flop_s, mm_n = matmul_ceiling(dev, m.dtype)
        progress.advance(task)
        for r in rows:
            r["prefill_share_of_matmul"] = r["prefill_flop"] / r["prefill_s"] / mm_flop_s
        kdtype = m.dtype
        ran = list(dict.fromkeys(r["backend"] for r in rows))  # 'auto' resolved; each once
        if kshape:
            del m  # the kernels' inputs get the device to themselves
            _free_device_memory(dev)
            ceilings = {"copy_bytes_s": bw, "matmul_flop_s": mm_flop_s}
            for name in ran:
                progress.update(task, description=f"kernels · {name}")
                krows += run_kernels(name, dev, kshape, kdtype, ceilings, cuda_graph=not no_cuda_graph,
                                     on_step=lambda: progress.advance(task))
    env = environment(dev)
    kdtype_name = dtype_name(kdtype)
    env.update(copy_bandwidth_bytes_s=bw, matmul_flop_s=mm_flop_s, matmul=f"{kdtype_name} {mm_n}^3")
    interpreted = "triton" in ran and dev.type != "cuda"
    ksection = None
    if kshape:
        order = {}
        for r in krows:
            order.setdefault((r["kernel"], r["case"]), len(order))
        krows.sort(key=lambda r: order[(r["kernel"], r["case"])])  # stable: backends side by side per case
        ksection = {"shape": {**kshape.as_dict(), "dtype": kdtype_name, "state_dtype": "float32"},
                    "interpreted": interpreted, "rows": krows}
    if as_json:
        sys.stdout.write(dumps({"environment": env, "results": rows, "kernels": ksection}, indent=1) + "\n")
        return
    cols = ("backend", "weights", "prompt", "graph", "first token ms", "prefill tok/s", "prefill of matmul", "decode tok/s",
            "ms/token", "of copy bw", "kernels per token", "peak memory")
    cells = [(r["backend"], r["weights"], str(r["prompt_len"]), "yes" if r["cuda_graph"] else "no", f"{r['ttft_s'] * 1e3:,.1f}",
              f"{r['prefill_tok_s']:,.0f}", _pct(r["prefill_share_of_matmul"]), f"{r['decode_tok_s']:,.1f}",
              f"{r['decode_ms_per_step']:.2f}", _pct(r["bandwidth_share"]),
              "-" if r.get("kernels_per_token") is None else f"{r['kernels_per_token']:g}",
              size(r["peak_memory_bytes"])) for r in rows]
    title = f"mamba2 bench · {rows[0]['model']} · {rows[0]['dtype']} · batch {batch_size}"
    ceilings_line = (f"ceilings measured here: copy {bw / 1e9:,.0f} GB/s (read + written) · {kdtype_name} matmul "
                     f"{mm_n}³ {_num(mm_flop_s / 1e12)} TFLOP/s")
    arch = f" ({env['architecture']}, kernels: {env['kernel_table'] or 'no triton'})" if env["architecture"] else ""
    footer = (f"{env['device']}{arch} · {env['threads']} threads · torch {env['torch']} · "
              f"triton {env['triton']} · commit {env['commit']}")
    tables = [(title, cols, cells)]
    notes = []
    if kshape:
        kcols = ("kernel", "case", "backend", "time", "TFLOP/s", "of matmul", "GB/s", "of copy", "err", "note")
        tables.append((f"kernels · one {kshape.name} layer: {kshape.describe()} · {kdtype_name} inputs, float32 state",
                       kcols, [_kernel_cells(r) for r in krows]))
        notes.append("kernels: medians; TFLOP/s by the chunked-scan count at the layer's chunk size, GB/s by the bytes "
                     "each kernel must move (inputs read, outputs written once); err: relative error against the torch "
                     "reference in float32")
        if interpreted:
            notes.append("the triton rows ran in Triton's CPU interpreter: their times mean nothing")
    elif not kernels:
        notes.append("kernel figures skipped (--no-kernels)")
    if fmt == "md":
        lines = []
        for t_title, t_cols, t_cells in tables:
            lines += [f"**{t_title}**", "", "| " + " | ".join(t_cols) + " |", "|" + "---|" * len(t_cols)]
            lines += ["| " + " | ".join(c) + " |" for c in t_cells]
            lines.append("")
        sys.stdout.write("\n".join(lines + [ceilings_line, ""] + notes + ([""] if notes else []) + [footer, ""]))
        return
    from rich.console import Console
    from rich import box
    from rich.table import Table

    out = Console()
    if not out.is_terminal:  # a file or a pipe: every cell whole, whatever the width
        lines = []
        for t_title, t_cols, t_cells in tables:
            lines += [t_title, *_aligned(t_cols, t_cells, _left(t_cols, cols)), ""]
        sys.stdout.write("\n".join(lines + [ceilings_line, *notes, footer, ""]))
        return
    for t_title, t_cols, t_cells in tables:
        # Headers on two lines, one space between columns, and the kernels' notes under their
        # table: the tables fit a 100-column terminal.
        t = Table(title=t_title, box=box.SIMPLE_HEAD, pad_edge=False, padding=0)
        left = _left(t_cols, cols)
        shown = [i for i, col in enumerate(t_cols) if col != "note"]
        for i in shown:
            t.add_column(_two_lines(t_cols[i]), justify="left" if i in left else "right", no_wrap=True)
        for c in t_cells:
            t.add_row(*(c[i] for i in shown))
        out.print(t)
        if "note" in t_cols:
            at = t_cols.index("note")
            for c in t_cells:
                if c[at]:
                    out.print(f"[dim]{c[0]} {c[1]} ({c[2]}): {c[at]}[/]")
    out.print(ceilings_line)
    for n in notes:
        out.print(f"[dim]{n}[/]")
    out.print(f"[dim]{footer}[/]")


def _two_lines(header: str) -> str:
    """A header of several words split at the space nearest its middle."""
    spaces = [i for i, ch in enumerate(header) if ch == " "]
    if len(header) <= 8 or not spaces:
        return header
    at = min(spaces, key=lambda i: abs(i - len(header) / 2))
    return header[:at] + "\n" + header[at + 1:]


def _left(t_cols, model_cols) -> set[int]:
    """The columns of names (left-aligned): the kernel table's first three and its note; figures go right."""
    return set() if t_cols is model_cols else {i for i, c in enumerate(t_cols) if i < 3 or c == "note"}


def _aligned(cols, cells, left: set[int]) -> list[str]:
    """A plain table: columns padded to their widest cell, two spaces apart."""
    widths = [max(len(c[i]) for c in [cols, *cells]) for i in range(len(cols))]

    def line(row):
        parts = [v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))]
        return "  ".join(parts).rstrip()

    return [line(cols), *(line(c) for c in cells)]


def _free_device_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _num(v) -> str:
    if v is None:
        return "–"
    a = abs(v)
    return f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"


def _pct(v) -> str:
    if v is None:
        return "–"
    p = v * 100
    return f"{p:.0f} %" if p >= 10 else f"{p:.1f} %" if p >= 1 else f"{p:.2g} %"


def _kernel_cells(r: dict) -> tuple:
    if r.get("error"):
        return (r["kernel"], r["case"], r["backend"], r["error"], "–", "–", "–", "–", "–", "")
    ms = r["ms"]
    time_s = f"{ms:,.2f} ms" if ms >= 1 else f"{ms * 1e3:,.1f} µs"
    note = [x for x in (r["timing"] if r["timing"] != "per call" else None, r.get("note")) if x]
    if r.get("state_share_of_copy") is not None:
        note.append(f"fp32 state alone: {_pct(r['state_share_of_copy'])} of copy")
    if r.get("one_call_ms") is not None:
        note.append(f"one call: {r['one_call_ms'] * 1e3:,.1f} µs, state {_pct(r.get('one_call_state_share_of_copy'))} of copy")
    return (r["kernel"], r["case"], r["backend"], time_s, _num(r["tflop_s"]), _pct(r["share_of_matmul"]),
            _num(r["gb_s"]), _pct(r["share_of_copy"]), "–" if r["err"] is None else f"{r['err']:.1e}",
            "; ".join(note))
