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

from .common import (closed_stdout, dtype_name, fail, figure, interrupted, read_prompt, read_prompt_or_nothing, size,
                     stderr_console, versions)
from .options import (BackendOption, Device, DTypeOption, MinP, Model, NoCudaGraph, Offline, Preset,
                      QuantOption, RepetitionPenalty, SaveAfter, Temperature, Threads, TopK, TopP, load, sampling,
                      value)


def run(
    prompt: Annotated[Optional[List[str]], typer.Argument(help="Prompt text; read from stdin when absent.")] = None,
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
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling (reported in --json).")] = None,
    stop: Annotated[Optional[List[str]], typer.Option("--stop", help="Stop at this text (repeatable).")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep going past the end-of-text token.")] = False,
    no_cuda_graph: NoCudaGraph = False,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the generated text.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object on stdout instead of text (JSONL with --batch).")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No statistics on stderr.")] = False,
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
):
    """Generate text from a prompt, streaming it to stdout."""
    params = sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    if system is not None and not chat:
        fail("--system goes with --chat (or use mamba2 chat)")
    settings = dict(max_tokens=max_tokens, **asdict(params), seed=seed, stop=list(stop or ()), ignore_eos=ignore_eos)
    loading = dict(model=model, preset=preset, offline=offline, device=device, dtype=dtype, backend=backend,
                   threads=threads, quiet=quiet, quant=quant)
    if batch or input_file is not None:
        if prompt:
            fail("with --batch or --input the prompts come from stdin, -f or --input, not from arguments")
        if save_state or load_state:
            fail("--save-state and --load-state work on one prompt, not with --batch or --input")
        return _run_batch(loading, file, input_file, batch, settings, not no_cuda_graph, echo, as_json, quiet, chat,
                          system)

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
    if temperature > 0 and seed is None:
        settings["seed"] = seed = random.randrange(2**31)

    loaded = load(**loading)
    m, tok = loaded.model, loaded.tokenizer
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
        events = stream_generate(m, tok, prompt_arg, state=states.state, last_token=states.last_token,
                                 on_prompt=states.on_prompt, cuda_graph=not no_cuda_graph,
                                 keep_state=states.keeps_state, **settings)
        for event in events:
            if event.text and not as_json:
                out.write(event.text)
                out.flush()
            result = event.result or result
        states.save(result, model_name=loaded.name)
        note = _state_note(states)
        if as_json:
            obj = _result_json(loaded, result, text_in or "", seed)
            if note:
                obj["state"] = note
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        elif result.text and not result.text.endswith("\n") and out.isatty():
            out.write("\n")
        out.flush()
    except BrokenPipeError:
        closed_stdout()
    except KeyboardInterrupt:
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
        "stats": {"load_s": loaded.load_s, **result.stats},
    }


def _read_batch(file: Optional[Path], input_file: Optional[Path], batch: bool, settings: dict):
    """The Requests of --batch lines (stdin or -f) or of --input JSONL."""
    from ..generation import Request

    if batch and input_file is not None:
        fail("give --batch (one prompt per line) or --input FILE.jsonl, not both")
    if input_file is not None:
        if file is not None:
            fail("--input is the prompt file; -f goes with --batch")
        text = read_prompt(None, input_file)
        requests = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{input_file} line {n}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                fail(f"{where}: not valid JSON ({e.msg})")
            requests.append(Request.from_json(obj, settings, where))
    else:
        text = read_prompt(None, file)
        requests = [Request(line, **settings) for line in text.splitlines() if line.strip()]
    if not requests:
        fail("no prompts: --batch reads one prompt per line, --input one JSON object per line")
    return requests


def _run_batch(loading: dict, file, input_file, batch: bool, settings: dict, cuda_graph: bool, echo: bool,
               as_json: bool, quiet: bool, chat: bool, system: Optional[str]):
    from ..generation import stream_batch

    requests = _read_batch(file, input_file, batch, settings)
    texts = [r.prompt for r in requests]
    for r in requests:
        if r.temperature > 0 and r.seed is None:
            r.seed = random.randrange(2**31)
    loaded = load(**loading, batch_size=len(requests))
    m = loaded.model
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
                    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                else:
                    text = (texts[shown] if echo else "") + r.text
                    out.write(("\n" if shown else "") + text + ("" if text.endswith("\n") else "\n"))
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
