"""`mamba2 run`: generate from one prompt, or from a batch of them, streaming to stdout."""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .common import (closed_stdout, dtype_name, dumps, fail, figure, interrupted, read_prompt, read_prompt_or_nothing, size,
                     stderr_console, versions)
from .options import (BackendOption, Device, DTypeOption, MinP, Model, NoCudaGraph, Offline, Preset,
                      QuantOption, RepetitionPenalty, SaveAfter, Temperature, Threads, TopK, TopP, Verbose, load, load_split,
                      sampling, sampling_note, split_line, value)
from .remote import Server, run_remote


def run(
    prompt: Annotated[Optional[List[str]], typer.Argument(help="Prompt text; read from stdin when absent.")] = None,
    prompt_option: Annotated[Optional[str], typer.Option(
        "-p", "--prompt", help="The prompt, as an option (instead of the arguments).")] = None,
    model: Model = None,
    preset: Preset = None,
    offline: Offline = False,
    file: Annotated[Optional[Path], typer.Option(
        "-f", "--file", help="Read the prompt (with --batch: the prompts) from this file.")] = None,
    device: Device = "auto",
    dtype: DTypeOption = "auto",
    backend: BackendOption = "auto",
    quant: QuantOption = None,
    threads: Threads = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", min=0, help="Most tokens to generate.")] = 256,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling (reported in --json).")] = None,
    stop: Annotated[Optional[List[str]], typer.Option("--stop", help="Stop at this text (repeatable).")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep going past the end-of-text token.")] = False,
    no_cuda_graph: NoCudaGraph = False,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the generated text.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object on stdout instead of text (JSONL with --batch).")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No statistics on stderr.")] = False,
    verbose: Verbose = False,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt for --chat.")] = None,
    save_state: Annotated[Optional[Path], typer.Option("--save-state", help="Save the model state to this file.")] = None,
    save_state_after: Annotated[SaveAfter, typer.Option(
        "--save-state-after", help="When --save-state saves: after the prompt or after the generated text.")] = "prompt",
    load_state: Annotated[Optional[Path], typer.Option(
        "--load-state", help="Continue from a saved state: the prompt (if any) follows its text.")] = None,
    batch: Annotated[bool, typer.Option(
        "--batch", help="One prompt per line (stdin or -f), generated together as a batch.")] = False,
    input_file: Annotated[Optional[Path], typer.Option(
        "--input", help="JSONL prompts ({\"prompt\": ..., per-prompt settings}) as one batch.")] = None,
    server: Server = None,
):
    """Generate text from a prompt, streaming it to stdout."""
    flags = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    sampling(**flags)  # bad values fail before any loading
    if prompt_option is not None:
        if prompt:
            fail("give the prompt as arguments or with -p/--prompt, not both")
        prompt = [prompt_option]
    if system is not None and not chat:
        fail("--system goes with --chat (or use mamba2 chat)")
    settings = dict(max_tokens=max_tokens, seed=seed, stop=list(stop or ()), ignore_eos=ignore_eos)
    loading = dict(model=model, preset=preset, offline=offline, device=device, dtype=dtype, backend=backend,
                   threads=threads, quiet=quiet, quant=quant)
    if server:
        local = dict(loading, no_cuda_graph=no_cuda_graph, save_state=save_state, load_state=load_state, batch=batch,
                     input_file=input_file, verbose=verbose)
        given = {k: v for k, v in flags.items() if v is not None}  # the others take the server's defaults
        return run_remote(server, read_prompt(prompt, file), dict(settings, **given), chat=chat, system=system, echo=echo,
                          as_json=as_json, quiet=quiet, local=local)
    if batch or input_file is not None:
        if prompt:
            fail("with --batch or --input the prompts come from stdin, -f or --input, not from arguments")
        if save_state or load_state:
            fail("--save-state and --load-state work on one prompt, not with --batch or --input")
        return _run_batch(loading, file, input_file, batch, flags, settings, not no_cuda_graph, echo, as_json, quiet,
                          chat, system, verbose)

    if load_state is not None:
        text_in = read_prompt_or_nothing(prompt, file)
        if chat:
            fail("--chat starts a conversation; to continue a saved one use mamba2 chat --load-state")
    else:
        text_in = read_prompt(prompt, file)
        if not text_in.strip():
            fail("the prompt is empty")
    if save_state is not None:
        from ..statefile import check_writable

        check_writable(save_state)
    # Under --json, Ctrl-C still ends in one object: before the first token it interrupts at
    # once; after it, generation stops at the next token, so the object holds every token
    # generated (finish_reason "interrupted"), then the exit code is 130.
    sigint = _JsonInterrupt() if as_json else None
    try:
        loaded = load(**loading)
    except KeyboardInterrupt:
        if sigint is None:
            raise
        sigint.restore()
        sys.stdout.write(dumps(_interrupted_json(model or preset, text_in or "", seed)) + "\n")
        interrupted(sys.stdout)
    m, tok = loaded.model, loaded.tokenizer
    settings.update(asdict(sampling(**flags, defaults=loaded.generation_defaults, warn=True)))
    if settings["temperature"] > 0 and seed is None:
        settings["seed"] = seed = random.randrange(2**31)
    note = sampling_note(loaded.generation_defaults, **flags)
    if note and not quiet:
        stderr_console().print(f"[dim]{note}[/]")
    from ..generation import stream_generate
    from ..statefile import StateRun

    states = StateRun(m, load_from=load_state, save_to=save_state, save_after=value(save_state_after),
                      max_tokens=max_tokens)
    prompt_arg = text_in
    if chat:
        from ..chat import ChatTemplate, one_shot_messages

        template = ChatTemplate(tok)
        prompt_arg = template.prompt_ids(one_shot_messages(text_in, system))
        settings["stop"] += template.stop

    out = sys.stdout
    result = None
    try:
        if echo and not as_json and text_in:
            out.write(text_in)
            out.flush()
        shown_progress = _PrefillProgress(m) if not (quiet or as_json) and sys.stderr.isatty() else None
        events = stream_generate(m, tok, prompt_arg, state=states.state, last_token=states.last_token,
                                 on_prompt=states.on_prompt, cuda_graph=not no_cuda_graph,
                                 keep_state=states.keeps_state, cancel=sigint and sigint.requested, **settings)
        for event in events:
            if shown_progress is not None:
                shown_progress = shown_progress.close()
            if sigint is not None:
                sigint.started = True
            if event.text and not as_json:
                out.write(event.text)
                out.flush()
            result = event.result or result
        if sigint is not None:
            sigint.restore()
        if as_json and sigint.requested():
            result.finish_reason = "interrupted"
            out.write(dumps(_result_json(loaded, result, text_in or "", seed)) + "\n")
            interrupted(out)
        states.save(result, model_name=loaded.name)
        note = _state_note(states)
        if as_json:
            obj = _result_json(loaded, result, text_in or "", seed)
            if note:
                obj["state"] = note
            out.write(dumps(obj) + "\n")
        elif result.text and not result.text.endswith("\n") and out.isatty():
            out.write("\n")
        out.flush()
    except BrokenPipeError:
        closed_stdout()
    except KeyboardInterrupt:
        if as_json:  # before the first token
            sigint.restore()
            out.write(dumps(_interrupted_json(loaded.name, text_in or "", seed, loaded)) + "\n")
        interrupted(out)
    if not quiet:
        s = result.stats
        notes = ""
        if states.loaded is not None:
            notes += f" · state of {states.loaded.tokens} tokens loaded in {states.load_s:.2f} s"
        if states.saved_tokens is not None:
            notes += f" · state of {states.saved_tokens} tokens saved to {save_state}"
        stderr_console().print(
            f"[dim]load {loaded.load_s:.2f} s · prompt {result.prompt_tokens} tokens · prefill "
            f"{figure(s['prefill_tok_s'], 'tok/s', digits=0)} · first token {figure(s['ttft_s'], 'ms', 1e3)} · "
            f"decode {figure(s['decode_tok_s'], 'tok/s')} ({len(result.token_ids)} tokens, "
            f"{result.finish_reason}) · peak memory {size(s['peak_memory_bytes'])} · "
            f"{m.backend_name} on {m.device}, {dtype_name(m.dtype)}{notes}[/]"
        )
        if verbose:
            stderr_console().print(f"[dim]{split_line(loaded)}[/]", soft_wrap=True)


class _PrefillProgress:
    """On a terminal, a prefill that takes more than PROGRESS_AFTER_S shows the tokens read and
    the rate on stderr, updated at each model call (a chunk of the prompt), until the first token."""

    def __init__(self, model):
        import os

        self.after = float(os.environ.get("MAMBA2_PROGRESS_AFTER_S", PROGRESS_AFTER_S))  # tests set 0
        self.t0, self.read, self.shown = time.perf_counter(), 0, False
        self.hook = model.register_forward_pre_hook(self._on_call)

    def _on_call(self, module, args):
        elapsed = time.perf_counter() - self.t0
        if self.read and elapsed >= self.after:
            sys.stderr.write(f"\r\x1b[2Kreading the prompt: {self.read:,} tokens, {self.read / elapsed:,.0f} tok/s")
            sys.stderr.flush()
            self.shown = True
        self.read += args[0].shape[1]

    def close(self) -> None:
        self.hook.remove()
        if self.shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


PROGRESS_AFTER_S = 1.0


class _JsonInterrupt:
    """SIGINT under --json: a KeyboardInterrupt until the first token, then a request to stop."""

    def __init__(self):
        import signal

        self.started, self._stop = False, False
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        if not self.started:
            raise KeyboardInterrupt
        self._stop = True

    def requested(self) -> bool:
        return self._stop

    def restore(self) -> None:
        import signal

        signal.signal(signal.SIGINT, self._previous)


def _interrupted_json(name, prompt: str, seed, loaded=None) -> dict:
    """The --json object of a run interrupted before its first token."""
    from ..generation.types import GenerationResult

    empty = GenerationResult("", [], None, "interrupted")
    if loaded is not None:
        return _result_json(loaded, empty, prompt, seed)
    return {"prompt": prompt, "text": "", "token_ids": [], "prompt_tokens": None, "generated_tokens": 0,
            "finish_reason": "interrupted", "model": name, "revision": None, "seed": seed, "dtype": None,
            "backend": None, "device": None, "versions": versions(), "stats": {}}


def _state_note(states) -> dict:
    """What --json reports of the state files read and written."""
    note = {}
    if states.loaded is not None:
        note.update(loaded=str(states.load_from), loaded_tokens=states.loaded.tokens, load_state_s=states.load_s)
    if states.saved_tokens is not None:
        note.update(saved=str(states.save_to), saved_tokens=states.saved_tokens)
    return note


def _result_json(loaded, result, prompt: str, seed, **more) -> dict:
    m = loaded.model
    return {
        **more, "prompt": prompt, "text": result.text, "token_ids": result.token_ids,
        "prompt_tokens": result.prompt_tokens, "generated_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason, "model": loaded.name, "revision": loaded.revision,
        "seed": seed, "dtype": dtype_name(m.dtype), "backend": m.backend_name,
        "device": str(m.device), "versions": versions(),
        "stats": {"load_s": loaded.load_s, **load_split(loaded), **result.stats},
    }


# As text, each completion of a batch ends with a NUL and a newline; a NUL of a prompt or
# completion prints as U+FFFD, so the end mark never occurs inside one (`--json` is exact).
BATCH_END = "\0\n"


def _read_batch(file: Optional[Path], input_file: Optional[Path], batch: bool) -> list[tuple[dict, str]]:
    """The prompts of --batch lines (stdin or -f) or of --input JSONL, as ({"prompt": ..., settings}, where)."""
    if batch and input_file is not None:
        fail("give --batch (one prompt per line) or --input FILE.jsonl, not both")
    items = []
    if input_file is not None:
        if file is not None:
            fail("--input is the prompt file; -f goes with --batch")
        text = read_prompt(None, input_file)
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{input_file} line {n}"
            try:
                items.append((json.loads(line), where))
            except ValueError as e:
                fail(f"{where}: not valid JSON ({e.msg})")
    else:
        text = read_prompt(None, file)
        items = [({"prompt": line}, "") for line in text.splitlines() if line.strip()]
    if not items:
        fail("no prompts: --batch reads one prompt per line, --input one JSON object per line")
    return items


def _requests(items: list[tuple[dict, str]], settings: dict) -> list:
    from ..generation import Request

    return [Request.from_json(obj, settings, where) for obj, where in items]


def _run_batch(loading: dict, file, input_file, batch: bool, flags: dict, settings: dict, cuda_graph: bool,
               echo: bool, as_json: bool, quiet: bool, chat: bool, system: Optional[str], verbose: bool = False):
    from ..generation import stream_batch

    items = _read_batch(file, input_file, batch)
    requests = _requests(items, {**settings, **asdict(sampling(**flags))})  # checked before any loading
    loaded = load(**loading, batch_size=len(requests))
    m = loaded.model
    requests = _requests(items, {**settings, **asdict(sampling(**flags, defaults=loaded.generation_defaults,
                                                                warn=True))})
    texts = [r.prompt for r in requests]
    for r in requests:
        if r.temperature > 0 and r.seed is None:
            r.seed = random.randrange(2**31)
    note = sampling_note(loaded.generation_defaults, **flags)
    if note and not quiet:
        stderr_console().print(f"[dim]{note}[/]")
    if chat:
        from ..chat import ChatTemplate, one_shot_messages

        template = ChatTemplate(loaded.tokenizer)
        for r in requests:
            r.prompt = template.prompt_ids(one_shot_messages(r.prompt, system))
            r.stop = list(r.stop) + list(template.stop)

    out = sys.stdout
    results = [None] * len(requests)
    shown = 0
    t0 = time.perf_counter()
    try:
        for i, event in stream_batch(m, loaded.tokenizer, requests, cuda_graph=cuda_graph):
            if event.result is None:
                continue
            results[i] = event.result
            while shown < len(results) and results[shown] is not None:  # in input order, as soon as possible
                r = results[shown]
                if as_json:
                    obj = _result_json(loaded, r, texts[shown], requests[shown].seed, index=shown)
                    out.write(dumps(obj) + "\n")
                else:
                    text = (texts[shown] if echo else "") + r.text
                    out.write(text.replace(BATCH_END[0], "\ufffd") + BATCH_END)
                out.flush()
                shown += 1
    except BrokenPipeError:
        closed_stdout()
    except KeyboardInterrupt:
        interrupted(out)
    wall = time.perf_counter() - t0
    if not quiet:
        prompt_tokens = sum(r.prompt_tokens for r in results)
        generated = sum(len(r.token_ids) for r in results)
        prefill_s = sum(r.stats["prefill_s"] for r in results)
        decode_s = wall - prefill_s
        stderr_console().print(
            f"[dim]load {loaded.load_s:.2f} s · batch of {len(results)} prompts, {prompt_tokens} tokens · prefill "
            f"{figure(prompt_tokens / prefill_s if prefill_s > 0 else None, 'tok/s', digits=0)} · generated "
            f"{generated} tokens, {figure(generated / decode_s if generated and decode_s > 0 else None, 'tok/s')} "
            f"over the batch · peak memory {size(max(r.stats['peak_memory_bytes'] for r in results))} · "
            f"{m.backend_name} on {m.device}, {dtype_name(m.dtype)}[/]"
        )
        if verbose:
            stderr_console().print(f"[dim]{split_line(loaded)}[/]", soft_wrap=True)
