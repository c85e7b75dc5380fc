"""The `mamba2` command: parses flags, prints, and calls the library. Nothing else lives here."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .errors import Mamba2Error

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Generate text with Mamba-2 language models.",
)

DEFAULT_PRESET = "tiny"
EXIT_USER_ERROR = 1
EXIT_SIGPIPE = 141
EXIT_INTERRUPTED = 130


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _fail(message: str, code: int = EXIT_USER_ERROR):
    _print_error(message)
    raise typer.Exit(code)


def _silence_stdout():
    # Nothing more can reach the reader; point stdout at /dev/null so the interpreter's
    # own flush at exit does not complain.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def _closed_stdout():
    _silence_stdout()
    raise typer.Exit(EXIT_SIGPIPE)


def _read_prompt(words: Optional[List[str]], file: Optional[Path]) -> str:
    if words and file:
        _fail("give the prompt as arguments or with -f, not both")
    if words:
        return " ".join(words)
    if file is not None:
        try:
            data = file.read_bytes()
        except OSError as e:
            _fail(f"cannot read prompt file {file}: {e.strerror or e}")
        source = str(file)
    else:
        if sys.stdin is None or sys.stdin.isatty():
            _fail("no prompt: give it as an argument, pipe it on stdin, or use -f FILE")
        data = sys.stdin.buffer.read()
        source = "stdin"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(f"the prompt on {source} is not valid UTF-8 (byte {e.start})")
    # `echo` ends its line with a newline the user did not mean as part of the prompt.
    return text[:-1] if text.endswith("\n") else text


def _versions() -> dict:
    import platform

    import torch

    v = {"mamba2": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        from importlib.metadata import version

        v["triton"] = version("triton")
    except Exception:
        v["triton"] = None
    return v


def _human_bytes(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _fmt(v, unit: str, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if v is None else f"{v * scale:,.{digits}f} {unit}"


@app.command()
def run(
    prompt: Optional[List[str]] = typer.Argument(None, help="Prompt text; read from stdin when absent."),
    model: Optional[str] = typer.Option(None, "-m", "--model", help="Model directory or Hugging Face repo id (in the local cache)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Random-weight model of a known shape instead of a checkpoint."),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="Read the prompt from this file."),
    device: str = typer.Option("auto", "-d", "--device", help="cpu, auto, a GPU number (0) or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bfloat16, float16 or float32."),
    backend: str = typer.Option("auto", "--backend", help="auto, torch or triton."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch."),
    max_tokens: int = typer.Option(256, "-n", "--max-tokens", min=0, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "-t", "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Keep the smallest set of tokens with this much probability."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens less likely than min-p times the top one."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages tokens already seen."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling (reported in --json)."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop at this text (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep going past the end-of-text token."),
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph", help="Decode eagerly on GPUs instead of replaying a CUDA graph."),
    echo: bool = typer.Option(False, "--echo", help="Print the prompt before the generated text."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout instead of text."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No statistics on stderr."),
):
    """Generate text from a prompt, streaming it to stdout."""
    from .generate import stream_generate
    from .sampling import SamplingParams

    err = _stderr()
    text_in = _read_prompt(prompt, file)
    if not text_in.strip():
        _fail("the prompt is empty")
    SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty).check()
    if model and preset:
        _fail("give either -m/--model or --preset, not both")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if temperature > 0 and seed is None:
        seed = random.randrange(2**31)

    t0 = time.perf_counter()
    if model is None:
        from .loader import load_preset

        name = preset or DEFAULT_PRESET
        if not preset and not quiet:
            err.print(f"no model given (-m): using the random-weight preset '{name}', which writes noise")
        m, tok = load_preset(name, device, dtype, backend)
        model_name, revision = f"preset:{name}", None
    else:
        from .loader import load_model

        m, tok = load_model(model, device, dtype, backend)
        model_name, revision = model, _revision_of(model)
    load_s = time.perf_counter() - t0

    out = sys.stdout
    result = None
    try:
        if echo and not as_json:
            out.write(text_in)
            out.flush()
        events = stream_generate(
            m, tok, text_in, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop or (),
            ignore_eos=ignore_eos, cuda_graph=not no_cuda_graph,
        )
        for event in events:
            if event.text and not as_json:
                out.write(event.text)
                out.flush()
            result = event.result or result
        if as_json:
            import torch

            obj = {
                "prompt": text_in, "text": result.text, "token_ids": result.token_ids,
                "prompt_tokens": result.prompt_tokens, "generated_tokens": len(result.token_ids),
                "finish_reason": result.finish_reason, "model": model_name, "revision": revision,
                "seed": seed, "dtype": str(m.dtype).removeprefix("torch."), "backend": m.backend_name,
                "device": str(m.device), "versions": _versions(),
                "stats": {"load_s": load_s, **result.stats},
            }
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        elif result.text and not result.text.endswith("\n") and out.isatty():
            out.write("\n")
        out.flush()
    except BrokenPipeError:
        _closed_stdout()
    except KeyboardInterrupt:
        try:
            out.flush()
        except BrokenPipeError:
            pass
        err.print("\ninterrupted")
        raise typer.Exit(EXIT_INTERRUPTED)
    if not quiet:
        s = result.stats
        err.print(
            f"[dim]load {load_s:.2f} s · prompt {result.prompt_tokens} tokens · prefill "
            f"{_fmt(s['prefill_tok_s'], 'tok/s', digits=0)} · first token {_fmt(s['ttft_s'], 'ms', 1e3)} · "
            f"decode {_fmt(s['decode_tok_s'], 'tok/s')} ({len(result.token_ids)} tokens, "
            f"{result.finish_reason}) · peak memory {_human_bytes(s['peak_memory_bytes'])} · "
            f"{m.backend_name} on {m.device}, {str(m.dtype).removeprefix('torch.')}[/]"
        )


def _revision_of(model: str) -> str | None:
    """The snapshot hash a cached repo id resolved to (None for a plain directory)."""
    from .hub import resolve_model_dir

    p = resolve_model_dir(model)
    return p.name if p.parent.name == "snapshots" else None


@app.command()
def bench(
    preset: Optional[str] = typer.Option(None, "--preset", help="Random-weight shape: mamba2-130m, mamba2-2.7b, codestral-7b, ..."),
    model: Optional[str] = typer.Option(None, "-m", "--model", help="Benchmark a real checkpoint instead."),
    backend: str = typer.Option("auto", "--backend", help="auto, torch, triton or all (side by side)."),
    device: str = typer.Option("auto", "-d", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    prompt_len: int = typer.Option(128, "--prompt-len", min=1),
    gen_len: int = typer.Option(64, "--gen-len", min=1),
    batch_size: int = typer.Option(1, "--batch-size", min=1),
    depth: Optional[int] = typer.Option(None, "--depth", min=1, help="Also measure decode after a context of this many tokens."),
    repeats: int = typer.Option(3, "--repeats", min=1),
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph", help="Decode eagerly on GPUs."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    fmt: str = typer.Option("table", "--format", help="table or md."),
):
    """Measure prefill and decode speed on random-weight presets or a real checkpoint."""
    from .bench import bench_model, bytes_per_decode_step, copy_bandwidth, environment
    from .checkpoint import resolve_device

    if fmt not in ("table", "md"):
        _fail(f"unknown format {fmt!r}; choose table or md")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if model and preset:
        _fail("give either -m/--model or --preset, not both")
    preset = preset or (None if model else "mamba2-130m")
    dev = resolve_device(device)
    backends = ["torch", "triton"] if backend == "all" else [backend]
    lengths = [prompt_len] + ([depth] if depth else [])
    m = tok = None
    rows = []
    from rich.progress import Progress

    with Progress(transient=True, console=_stderr(), disable=as_json) as progress:
        task = progress.add_task("benchmarking", total=len(backends) * len(lengths) * (repeats + 1) + 1)
        bw = copy_bandwidth(dev)
        progress.advance(task)
        for b in backends:
            if m is None:
                if model:
                    from .loader import load_model

                    m, tok = load_model(model, dev, dtype, b, batch_size)
                else:
                    from .loader import load_preset

                    m, _ = load_preset(preset, dev, dtype, b, batch_size=batch_size)
            else:
                m.set_backend(b)
            for L in lengths:
                r = bench_model(m, L, gen_len, batch_size, repeats, cuda_graph=not no_cuda_graph, tokenizer=tok,
                                on_step=lambda: progress.advance(task))
                step_bytes = bytes_per_decode_step(m, batch_size)
                r.update(backend=m.backend_name, model=model or f"preset:{preset}",
                         dtype=str(m.dtype).removeprefix("torch."), bytes_per_step=step_bytes,
                         bandwidth_share=step_bytes * r["decode_tok_s"] / bw)
                rows.append(r)
    env = environment(dev)
    env["copy_bandwidth_bytes_s"] = bw
    if as_json:
        sys.stdout.write(json.dumps({"environment": env, "results": rows}, indent=1) + "\n")
        return
    cols = ("backend", "prompt", "graph", "first token ms", "prefill tok/s", "decode tok/s", "ms/token",
            "of copy bw", "peak memory")
    cells = [(r["backend"], str(r["prompt_len"]), "yes" if r["cuda_graph"] else "no", f"{r['ttft_s'] * 1e3:,.1f}",
              f"{r['prefill_tok_s']:,.0f}", f"{r['decode_tok_s']:,.1f}", f"{r['decode_ms_per_step']:.2f}",
              f"{r['bandwidth_share'] * 100:.0f} %", _human_bytes(r["peak_memory_bytes"])) for r in rows]
    title = f"mamba2 bench · {rows[0]['model']} · {rows[0]['dtype']} · batch {batch_size}"
    footer = (f"{env['device']} · copy {bw / 1e9:,.0f} GB/s · {env['threads']} threads · torch {env['torch']} · "
              f"triton {env['triton']} · commit {env['commit']}")
    if fmt == "md":
        lines = [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        sys.stdout.write("\n".join(lines + ["", footer, ""]))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in cols:
        t.add_column(col, justify="right")
    for c in cells:
        t.add_row(*c)
    Console().print(t)
    Console().print(f"[dim]{footer}[/]")


@app.command()
def version():
    """Print the version."""
    typer.echo(__version__)


def main():
    """Entry point: every way out is an exit code and at most a short message, never a traceback."""
    click_error, abort = _click_exception_types()
    try:
        code = app(standalone_mode=False)
    except Mamba2Error as e:
        _print_error(str(e))
        code = EXIT_USER_ERROR
    except (KeyboardInterrupt, abort):  # click turns Ctrl-C into Abort
        sys.stderr.write("\ninterrupted\n")
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        code = EXIT_SIGPIPE
    except click_error as e:
        e.show()
        code = e.exit_code
    except MemoryError:
        _print_error("out of memory")
        code = EXIT_USER_ERROR
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        _print_error("out of memory on the device; try a smaller --batch-size, a shorter prompt or --dtype bfloat16")
        code = EXIT_USER_ERROR
    sys.exit(code if isinstance(code, int) else 0)


def _click_exception_types():
    # Typer ships its own copy of click; find its exception classes through Typer's names.
    base = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    return base, typer.Abort


def _print_error(msg: str) -> None:
    from rich.markup import escape

    try:
        _stderr().print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
    except Exception:
        sys.stderr.write(f"error: {msg}\n")


if __name__ == "__main__":
    main()
