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
MODEL_HELP = ("Model directory, alias (`mamba2 models` lists them) or Hugging Face repo id[@revision]; "
              "downloaded first when not in the local cache.")
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


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _fmt(v, unit: str, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if v is None else f"{v * scale:,.{digits}f} {unit}"


@app.command()
def run(
    prompt: Optional[List[str]] = typer.Argument(None, help="Prompt text; read from stdin when absent."),
    model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
    preset: Optional[str] = typer.Option(None, "--preset", help="Random-weight model of a known shape instead of a checkpoint."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network: use only the local cache."),
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
        from .hub import resolve_model
        from .loader import load_model

        model_dir = resolve_model(model, offline=offline, progress=_progress(quiet))
        t0 = time.perf_counter()  # the load, not the download
        m, tok = load_model(str(model_dir), device, dtype, backend, offline=offline, progress=_progress(quiet))
        model_name, revision = model, _revision_of(model_dir)
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


def _revision_of(model_dir: Path) -> str | None:
    """The snapshot hash a cached repo id resolved to (None for a plain directory)."""
    return model_dir.name if model_dir.parent.name == "snapshots" else None


def _progress(quiet: bool):
    from .download import progress_display

    return progress_display(quiet)


@app.command()
def bench(
    preset: Optional[str] = typer.Option(None, "--preset", help="Random-weight shape: mamba2-130m, mamba2-2.7b, codestral-7b, ..."),
    model: Optional[str] = typer.Option(None, "-m", "--model", help="Benchmark a real checkpoint instead: " + MODEL_HELP),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network: use only the local cache."),
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
    if model:  # fetched first, if need be, with the terminal to itself; loading then finds it cached
        from .hub import resolve_model

        resolve_model(model, offline=offline)
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
def download(
    repo_id: str = typer.Argument(..., help="org/name, org/name@revision, or an alias (`mamba2 models` lists them)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit (default main)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="hf or mistral, for repos that ship both (default hf)."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Only files matching this glob (repeatable), instead of the format's files."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Skip files matching this glob (repeatable)."),
    local_dir: Optional[Path] = typer.Option(None, "--local-dir", help="Put the files in this directory instead of the Hugging Face cache."),
    token: Optional[str] = typer.Option(None, "--token", help="Hugging Face token (default: HF_TOKEN, or the one `hf auth login` saved)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress on stderr."),
):
    """Download the files of a model that mamba2 reads; print the directory they are in."""
    from .download import download as fetch, human_bytes
    from .hub import parse_repo_spec

    repo, at = parse_repo_spec(repo_id)
    if at and revision and at != revision:
        _fail(f"two revisions given: @{at} and --revision {revision}")
    r = fetch(repo, revision or at, fmt=fmt, include=include, exclude=exclude, local_dir=local_dir, token=token,
              progress=_progress(quiet))
    if not quiet:
        what = f"{r.format} checkpoint, {len(r.files)} files" if r.format else f"{len(r.files)} files"
        if r.tokenizer_files:
            what += f" + GPT-NeoX tokenizer ({len(r.tokenizer_files)} files)"
        fetched = (f"fetched {r.fetched_files} files, {human_bytes(r.fetched_bytes)}" if r.fetched_files
                   else "nothing to fetch")
        checked = f"; SHA-256 verified for {r.verified_files}" if r.verified_files else ""
        _stderr().print(f"{repo} @ {r.commit[:12]}: {what}, {human_bytes(r.total_bytes)}; {fetched}{checked}",
                        highlight=False, markup=False, soft_wrap=True)
    typer.echo(str(r.path))


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")):
    """List the Mamba-2 models in the local Hugging Face cache, and the aliases for real checkpoints."""
    from .download import human_bytes
    from .hub import ALIASES, cached_models

    cached = cached_models()
    aliased = {m.repo_id for m in cached if not m.missing}
    if as_json:
        obj = {"cached": [{"repo_id": m.repo_id, "commit": m.commit, "refs": m.refs, "path": str(m.path),
                           "format": m.format, "size": m.size, "complete": not m.missing, "missing": m.missing}
                          for m in cached],
               "aliases": [{"alias": a, "repo_id": r, "cached": r in aliased} for a, r in ALIASES.items()]}
        sys.stdout.write(json.dumps(obj, indent=1) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    if cached:
        t = Table(title="Mamba-2 models in the local cache")
        for col in ("model", "revision", "format", "size", "status"):
            t.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
        for m in cached:
            rev = ", ".join(m.refs) + f" ({m.commit[:8]})" if m.refs else m.commit[:12]
            status = "complete" if not m.missing else f"partial: missing {', '.join(m.missing[:2])}"
            t.add_row(m.repo_id, rev, m.format, human_bytes(m.size), status)
        out.print(t)
    else:
        out.print("no Mamba-2 models in the local cache")
    t = Table(title="aliases (for -m; --preset names random-weight shapes)")
    for col in ("alias", "repo", "cached"):
        t.add_column(col)
    for a, r in ALIASES.items():
        t.add_row(a, r, "yes" if r in aliased else "no")
    out.print(t)


@app.command()
def info(
    model: str = typer.Argument(..., help=MODEL_HELP),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Sequences in flight, for the memory figure."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16, float16 or float32 (default: as stored)."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network: use only the local cache."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Format, shape, parameters, size, dtype, and the memory for weights and state of a model."""
    from .download import human_bytes
    from .hub import resolve_model
    from .info import describe

    model_dir = resolve_model(model, offline=offline, progress=_progress(as_json))
    d = describe(model_dir, batch_size, dtype)
    d["model"] = model
    d["revision"] = _revision_of(model_dir)
    if as_json:
        sys.stdout.write(json.dumps(d, indent=1) + "\n")
        return
    c, st, mem = d["config"], d["state_per_sequence"], d["memory"]
    rev = f" @ {d['revision'][:12]}" if d["revision"] else ""
    rows = [
        ("model", f"{model}{rev}  ({d['path']})"),
        ("format", d["format"]),
        ("config", f"d_model {c['d_model']} · {c['n_layer']} layers · {c['expand'] * c['d_model'] // c['headdim']} heads × "
                   f"headdim {c['headdim']} · {c['ngroups']} group(s) · d_state {c['d_state']} · d_conv {c['d_conv']} · "
                   f"chunk {c['chunk_size']} · vocab {c['vocab_size']}" + (" · tied embeddings" if c["tie_embeddings"] else "")),
        ("parameters", f"{d['parameters']:,} ({_count(d['parameters'])})"),
        ("on disk", f"{human_bytes(d['bytes_on_disk'])} ({len(d['weight_files'])} weight file(s), "
                    f"{human_bytes(d['weights_bytes_on_disk'])})"),
        ("dtype", f"{d['stored_dtype'] or '?'} (as stored)"),
        ("state", f"{human_bytes(st['total'])} per sequence: conv {human_bytes(st['conv'])} ({mem['dtype']}) + "
                  f"SSM {human_bytes(st['ssm'])} (float32), whatever the context length"),
        ("memory", f"{human_bytes(mem['total'])} at batch {mem['batch_size']}: weights {human_bytes(mem['weights'])} "
                   f"({mem['dtype']}) + state {human_bytes(mem['state'])}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{width}}  {v}")


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
