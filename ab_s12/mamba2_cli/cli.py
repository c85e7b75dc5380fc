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

MODEL_HELP = ("Model directory, built-in model or alias (`mamba2 models` lists them), or Hugging Face repo "
              "id[@revision], downloaded first when not in the local cache.")
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


def _read_prompt_or_nothing(words: Optional[List[str]], file: Optional[Path]) -> Optional[str]:
    """The prompt when one is given; None when there is none and nothing on stdin (continuing a state)."""
    if words or file is not None or (sys.stdin is not None and not sys.stdin.isatty()):
        text = _read_prompt(words, file)
        return text or None
    return None


def _load(model: Optional[str], preset: Optional[str], device: str, dtype: str, backend: str,
          threads: Optional[int], quiet: bool, offline: bool = False, batch_size: int = 1):
    """(model, tokenizer, model name, revision, load seconds) for -m (downloaded first if need be) or --preset."""
    if model and preset:
        _fail("give either -m/--model or --preset, not both")
    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if model is None and preset is None:
        from .hub import DEFAULT_MODEL

        model = DEFAULT_MODEL
        if not quiet:
            _stderr().print(f"no model given (-m): using the built-in {DEFAULT_MODEL} model, a small Mamba-2 "
                            "that writes Python (-m names another)")
    if model is None:
        from .loader import load_preset

        m, tok = load_preset(preset, device, dtype, backend, batch_size=batch_size)
        model_name, revision = f"preset:{preset}", None
    else:
        from .hub import resolve_model
        from .loader import load_model

        model_dir = resolve_model(model, offline=offline, progress=_progress(quiet))
        t0 = time.perf_counter()  # the load, not the download
        m, tok = load_model(str(model_dir), device, dtype, backend, batch_size, offline=offline,
                            progress=_progress(quiet))
        model_name, revision = model, _revision_of(model_dir)
    return m, tok, model_name, revision, time.perf_counter() - t0


def _result_json(m, result, prompt: str, model_name: str, revision, seed, load_s: float, **more) -> dict:
    return {
        **more, "prompt": prompt, "text": result.text, "token_ids": result.token_ids,
        "prompt_tokens": result.prompt_tokens, "generated_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason, "model": model_name, "revision": revision,
        "seed": seed, "dtype": str(m.dtype).removeprefix("torch."), "backend": m.backend_name,
        "device": str(m.device), "versions": _versions(),
        "stats": {"load_s": load_s, **result.stats},
    }


@app.command()
def run(
    prompt: Optional[List[str]] = typer.Argument(None, help="Prompt text; read from stdin when absent."),
    model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
    preset: Optional[str] = typer.Option(None, "--preset", help="Random-weight model of a known shape instead of a checkpoint."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network: use only the local cache."),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="Read the prompt (with --batch: the prompts) from this file."),
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
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph", help="Prefill and decode eagerly on GPUs instead of replaying CUDA graphs."),
    echo: bool = typer.Option(False, "--echo", help="Print the prompt before the generated text."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout instead of text (JSONL with --batch)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No statistics on stderr."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt for --chat."),
    save_state: Optional[Path] = typer.Option(None, "--save-state", help="Save the model state to this file."),
    save_state_after: str = typer.Option("prompt", "--save-state-after", help="prompt or generation: when --save-state saves."),
    load_state: Optional[Path] = typer.Option(None, "--load-state", help="Continue from a saved state: the prompt (if any) follows its text."),
    batch: bool = typer.Option(False, "--batch", help="One prompt per line (stdin or -f), generated together as a batch."),
    input_file: Optional[Path] = typer.Option(None, "--input", help="JSONL prompts ({\"prompt\": ..., per-prompt settings}) as one batch."),
):
    """Generate text from a prompt, streaming it to stdout."""
    from .sampling import SamplingParams

    SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty).check()
    if save_state_after not in ("prompt", "generation"):
        _fail(f"--save-state-after must be prompt or generation, not {save_state_after!r}")
    if system is not None and not chat:
        _fail("--system goes with --chat (or use mamba2 chat)")
    settings = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, seed=seed, stop=list(stop or ()), ignore_eos=ignore_eos)
    if batch or input_file is not None:
        if prompt:
            _fail("with --batch or --input the prompts come from stdin, -f or --input, not from arguments")
        if save_state or load_state:
            _fail("--save-state and --load-state work on one prompt, not with --batch or --input")
        return _run_batch(model, preset, offline, file, device, dtype, backend, threads, settings, not no_cuda_graph,
                          echo, as_json, quiet, chat, system, input_file, batch)

    if load_state is not None:
        text_in = _read_prompt_or_nothing(prompt, file)
        if chat:
            _fail("--chat starts a conversation; to continue a saved one use mamba2 chat --load-state")
    else:
        text_in = _read_prompt(prompt, file)
        if not text_in.strip():
            _fail("the prompt is empty")
    if save_state is not None:
        from .statefile import check_writable

        check_writable(save_state)
    if temperature > 0 and seed is None:
        settings["seed"] = seed = random.randrange(2**31)

    m, tok, model_name, revision, load_s = _load(model, preset, device, dtype, backend, threads, quiet, offline)
    from .generate import stream_generate

    saved, state_note = None, {}
    if load_state is not None:
        from .statefile import load_state as read_state

        t0 = time.perf_counter()
        saved = read_state(load_state, m)
        state_note.update(loaded=str(load_state), loaded_tokens=saved.tokens, load_state_s=time.perf_counter() - t0)
    prompt_arg = text_in
    if chat:
        from .chat import ChatTemplate, one_shot_messages

        template = ChatTemplate(tok)
        prompt_arg = template.prompt_ids(one_shot_messages(text_in, system))
        settings["stop"] += template.stop
    snapshot = {}
    if save_state is not None and (save_state_after == "prompt" or max_tokens == 0):
        def on_prompt(st, ids):  # the state before the prompt's last token: a file needs one unconsumed
            snapshot.update(state=st.clone(), ids=ids)
    else:
        on_prompt = None
    state = saved.state if saved is not None else m.new_state(1)

    out = sys.stdout
    result = None
    try:
        if echo and not as_json and text_in:
            out.write(text_in)
            out.flush()
        events = stream_generate(m, tok, prompt_arg, state=state, last_token=saved.last_token if saved else None,
                                 on_prompt=on_prompt, cuda_graph=not no_cuda_graph, **settings)
        for event in events:
            if event.text and not as_json:
                out.write(event.text)
                out.flush()
            result = event.result or result
        if save_state is not None:
            from .statefile import save_state as write_state

            before = saved.tokens - 1 if saved is not None else 0  # the loaded last token is in prompt_tokens
            if snapshot:
                tokens, last, st = before + result.prompt_tokens, snapshot["ids"][-1], snapshot["state"]
            else:
                tokens = before + result.prompt_tokens + len(result.token_ids)
                last, st = result.token_ids[-1], state
            write_state(save_state, m, st, tokens, last, model_name=model_name)
            state_note.update(saved=str(save_state), saved_tokens=tokens)
        if as_json:
            obj = _result_json(m, result, text_in or "", model_name, revision, seed, load_s)
            if state_note:
                obj["state"] = state_note
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
        _stderr().print("\ninterrupted")
        raise typer.Exit(EXIT_INTERRUPTED)
    if not quiet:
        s = result.stats
        notes = ""
        if "loaded" in state_note:
            notes += f" · state of {state_note['loaded_tokens']} tokens loaded in {state_note['load_state_s']:.2f} s"
        if "saved" in state_note:
            notes += f" · state of {state_note['saved_tokens']} tokens saved to {state_note['saved']}"
        _stderr().print(
            f"[dim]load {load_s:.2f} s · prompt {result.prompt_tokens} tokens · prefill "
            f"{_fmt(s['prefill_tok_s'], 'tok/s', digits=0)} · first token {_fmt(s['ttft_s'], 'ms', 1e3)} · "
            f"decode {_fmt(s['decode_tok_s'], 'tok/s')} ({len(result.token_ids)} tokens, "
            f"{result.finish_reason}) · peak memory {_human_bytes(s['peak_memory_bytes'])} · "
            f"{m.backend_name} on {m.device}, {str(m.dtype).removeprefix('torch.')}{notes}[/]"
        )


def _read_batch(file: Optional[Path], input_file: Optional[Path], batch: bool, settings: dict):
    """(prompt texts, Requests) from --batch lines (stdin or -f) or --input JSONL."""
    from .generate import Request

    if batch and input_file is not None:
        _fail("give --batch (one prompt per line) or --input FILE.jsonl, not both")
    if input_file is not None:
        if file is not None:
            _fail("--input is the prompt file; -f goes with --batch")
        text = _read_prompt(None, input_file)
        requests = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{input_file} line {n}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                _fail(f"{where}: not valid JSON ({e.msg})")
            requests.append(Request.from_json(obj, settings, where))
    else:
        text = _read_prompt(None, file)
        requests = [Request(line, **settings) for line in text.splitlines() if line.strip()]
    if not requests:
        _fail("no prompts: --batch reads one prompt per line, --input one JSON object per line")
    return requests


def _run_batch(model, preset, offline, file, device, dtype, backend, threads, settings, cuda_graph, echo, as_json,
               quiet, chat, system, input_file, batch):
    from .generate import stream_batch

    requests = _read_batch(file, input_file, batch, settings)
    texts = [r.prompt for r in requests]
    for r in requests:
        if r.temperature > 0 and r.seed is None:
            r.seed = random.randrange(2**31)
    m, tok, model_name, revision, load_s = _load(model, preset, device, dtype, backend, threads, quiet, offline,
                                                 batch_size=len(requests))
    if chat:
        from .chat import ChatTemplate, one_shot_messages

        template = ChatTemplate(tok)
        for r in requests:
            r.prompt = template.prompt_ids(one_shot_messages(r.prompt, system))
            r.stop = list(r.stop) + list(template.stop)

    out = sys.stdout
    results = [None] * len(requests)
    shown = 0
    t0 = time.perf_counter()
    try:
        for i, event in stream_batch(m, tok, requests, cuda_graph=cuda_graph):
            if event.result is None:
                continue
            results[i] = event.result
            while shown < len(results) and results[shown] is not None:  # in input order, as soon as possible
                r = results[shown]
                if as_json:
                    obj = _result_json(m, r, texts[shown], model_name, revision, requests[shown].seed, load_s,
                                       index=shown)
                    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                else:
                    text = (texts[shown] if echo else "") + r.text
                    out.write(("\n" if shown else "") + text + ("" if text.endswith("\n") else "\n"))
                out.flush()
                shown += 1
    except BrokenPipeError:
        _closed_stdout()
    except KeyboardInterrupt:
        try:
            out.flush()
        except BrokenPipeError:
            pass
        _stderr().print("\ninterrupted")
        raise typer.Exit(EXIT_INTERRUPTED)
    wall = time.perf_counter() - t0
    if not quiet:
        prompt_tokens = sum(r.prompt_tokens for r in results)
        generated = sum(len(r.token_ids) for r in results)
        prefill_s = sum(r.stats["prefill_s"] for r in results)
        decode_s = wall - prefill_s
        _stderr().print(
            f"[dim]load {load_s:.2f} s · batch of {len(results)} prompts, {prompt_tokens} tokens · prefill "
            f"{_fmt(prompt_tokens / prefill_s if prefill_s > 0 else None, 'tok/s', digits=0)} · generated "
            f"{generated} tokens, {_fmt(generated / decode_s if generated and decode_s > 0 else None, 'tok/s')} "
            f"over the batch · peak memory {_human_bytes(max(r.stats['peak_memory_bytes'] for r in results))} · "
            f"{m.backend_name} on {m.device}, {str(m.dtype).removeprefix('torch.')}[/]"
        )


@app.command()
def chat(
    model: Optional[str] = typer.Option(None, "-m", "--model", help=MODEL_HELP),
    preset: Optional[str] = typer.Option(None, "--preset", help="Random-weight model of a known shape instead of a checkpoint."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network: use only the local cache."),
    device: str = typer.Option("auto", "-d", "--device", help="cpu, auto, a GPU number (0) or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bfloat16, float16 or float32."),
    backend: str = typer.Option("auto", "--backend", help="auto, torch or triton."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch."),
    max_tokens: int = typer.Option(512, "-n", "--max-tokens", min=1, help="Most tokens per reply."),
    temperature: float = typer.Option(0.0, "-t", "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Keep the smallest set of tokens with this much probability."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens less likely than min-p times the top one."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages tokens already seen."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling (turn n uses seed + n)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    load_state: Optional[Path] = typer.Option(None, "--load-state", help="Continue a conversation saved with /save."),
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph", help="Prefill and decode eagerly on GPUs instead of replaying CUDA graphs."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No model summary on stderr."),
):
    """Chat in the terminal; each turn reads only its new tokens, from the carried state."""
    from .chat import ChatSession
    from .repl import ChatREPL
    from .sampling import SamplingParams

    SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty).check()
    m, tok, model_name, _, load_s = _load(model, preset, device, dtype, backend, threads, quiet, offline)
    session = ChatSession(m, tok, system=system, model_name=model_name, max_tokens=max_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed, cuda_graph=not no_cuda_graph)
    if load_state is not None:
        session.load(load_state)
    if system and not session.template.shows_system_prompt():
        _stderr().print("note: this model's chat template leaves system prompts out")
    if not quiet:
        template = "plain fallback template" if session.template.is_fallback else "the model's chat template"
        _stderr().print(f"[dim]{model_name} · load {load_s:.2f} s · {m.backend_name} on {m.device}, "
                        f"{str(m.dtype).removeprefix('torch.')} · {template}[/]")
    try:
        ChatREPL(session).run()
    except BrokenPipeError:
        _closed_stdout()


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
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph", help="Prefill and decode eagerly on GPUs."),
    kernels: bool = typer.Option(True, "--kernels/--no-kernels", help="Also time each kernel of one layer (SSD scan, decode step, conv, norms, matvec)."),
    kernel_shape: str = typer.Option("auto", "--kernel-shape", help="Layer of the kernel figures: codestral, small (a mamba2-130m layer, shorter lengths), tiny, or auto (codestral on GPUs, small on CPUs, tiny under Triton's CPU interpreter)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    fmt: str = typer.Option("table", "--format", help="table or md."),
):
    """Measure prefill and decode speed, and each kernel of one layer, against the device's measured ceilings."""
    from .bench import bench_model, bytes_per_decode_step, environment, prefill_flops
    from .checkpoint import resolve_device
    from .kernel_bench import SHAPES, case_count, choose_shape, copy_bandwidth, matmul_ceiling, run_kernels

    if fmt not in ("table", "md"):
        _fail(f"unknown format {fmt!r}; choose table or md")
    if kernel_shape != "auto" and kernel_shape not in SHAPES:
        _fail(f"unknown kernel shape {kernel_shape!r}; choose auto, {', '.join(SHAPES)}")
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
    kshape = choose_shape(kernel_shape, dev, backends) if kernels else None
    m = tok = None
    rows, krows = [], []
    from rich.progress import Progress

    with Progress(transient=True, console=_stderr(), disable=as_json) as progress:
        warmups = 2 if dev.type == "cuda" and not no_cuda_graph else 1  # as bench_model runs them
        total = len(backends) * (len(lengths) * (repeats + warmups) + (case_count(kshape) if kshape else 0)) + 2
        task = progress.add_task("benchmarking", total=total)
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
                         bandwidth_share=step_bytes * r["decode_tok_s"] / bw,
                         prefill_flop=prefill_flops(m, batch_size, L))
                rows.append(r)
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
    dtype_name = str(kdtype).removeprefix("torch.")
    env.update(copy_bandwidth_bytes_s=bw, matmul_flop_s=mm_flop_s, matmul=f"{dtype_name} {mm_n}^3")
    interpreted = "triton" in ran and dev.type != "cuda"
    ksection = None
    if kshape:
        order = {}
        for r in krows:
            order.setdefault((r["kernel"], r["case"]), len(order))
        krows.sort(key=lambda r: order[(r["kernel"], r["case"])])  # stable: backends side by side per case
        ksection = {"shape": {**kshape.as_dict(), "dtype": dtype_name, "state_dtype": "float32"},
                    "interpreted": interpreted, "rows": krows}
    if as_json:
        sys.stdout.write(json.dumps({"environment": env, "results": rows, "kernels": ksection}, indent=1) + "\n")
        return
    cols = ("backend", "prompt", "graph", "first token ms", "prefill tok/s", "prefill of matmul", "decode tok/s",
            "ms/token", "of copy bw", "kernels/token", "peak memory")
    cells = [(r["backend"], str(r["prompt_len"]), "yes" if r["cuda_graph"] else "no", f"{r['ttft_s'] * 1e3:,.1f}",
              f"{r['prefill_tok_s']:,.0f}", _pct(r["prefill_share_of_matmul"]), f"{r['decode_tok_s']:,.1f}",
              f"{r['decode_ms_per_step']:.2f}", _pct(r["bandwidth_share"]),
              "-" if r.get("kernels_per_token") is None else f"{r['kernels_per_token']:g}",
              _human_bytes(r["peak_memory_bytes"])) for r in rows]
    title = f"mamba2 bench · {rows[0]['model']} · {rows[0]['dtype']} · batch {batch_size}"
    ceilings_line = (f"ceilings measured here: copy {bw / 1e9:,.0f} GB/s (read + written) · {dtype_name} matmul "
                     f"{mm_n}³ {_num(mm_flop_s / 1e12)} TFLOP/s")
    footer = (f"{env['device']} · {env['threads']} threads · torch {env['torch']} · "
              f"triton {env['triton']} · commit {env['commit']}")
    tables = [(title, cols, cells)]
    notes = []
    if kshape:
        kcols = ("kernel", "case", "backend", "time", "TFLOP/s", "of matmul", "GB/s", "of copy", "err", "note")
        tables.append((f"kernels · one {kshape.name} layer: {kshape.describe()} · {dtype_name} inputs, float32 state",
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
    from rich.table import Table

    out = Console()
    for t_title, t_cols, t_cells in tables:
        t = Table(title=t_title)
        for i, col in enumerate(t_cols):
            left = t_cols is not cols and (i < 3 or col == "note")
            t.add_column(col, justify="left" if left else "right", no_wrap=col != "note")
        for c in t_cells:
            t.add_row(*c)
        out.print(t)
    out.print(ceilings_line)
    for n in notes:
        out.print(f"[dim]{n}[/]")
    out.print(f"[dim]{footer}[/]")


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
    from .hub import builtin_dir, parse_repo_spec

    builtin = builtin_dir(repo_id)
    if builtin is not None:  # nothing to fetch: print where it is, as for a download
        if not quiet:
            _stderr().print(f"{repo_id} is built into mamba2: nothing to download", highlight=False)
        typer.echo(str(builtin))
        return
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
    from .hub import ALIASES, BUILTIN, DEFAULT_MODEL, cached_models

    cached = cached_models()
    aliased = {m.repo_id for m in cached if not m.missing}
    builtin = [{"name": n, "path": str(p), "default": n == DEFAULT_MODEL,
                "size": sum(f.stat().st_size for f in p.glob("*.safetensors"))} for n, p in BUILTIN.items()]
    if as_json:
        obj = {"builtin": builtin, "cached": [{"repo_id": m.repo_id, "commit": m.commit, "refs": m.refs, "path": str(m.path),
                           "format": m.format, "size": m.size, "complete": not m.missing, "missing": m.missing}
                          for m in cached],
               "aliases": [{"alias": a, "repo_id": r, "cached": r in aliased} for a, r in ALIASES.items()]}
        sys.stdout.write(json.dumps(obj, indent=1) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    t = Table(title="built into mamba2 (no download)")
    for col in ("model", "weights", "note"):
        t.add_column(col)
    for b in builtin:
        t.add_row(b["name"], human_bytes(b["size"]), "default for run and chat; writes Python" if b["default"] else "")
    out.print(t)
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
