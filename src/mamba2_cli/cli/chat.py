"""`mamba2 chat`: a conversation in the terminal, each turn reading only its new tokens."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import EXIT_USER_ERROR, closed_stdout, dtype_name, stderr_console
from .options import (BackendOption, Device, DTypeOption, MinP, Model, NoCudaGraph, Offline, Preset,
                      QuantOption, RepetitionPenalty, Temperature, Threads, TopK, TopP, load, sampling, sampling_note)
from .remote import Server, chat_remote


def chat(
    model: Model = None,
    preset: Preset = None,
    offline: Offline = False,
    device: Device = "auto",
    dtype: DTypeOption = "auto",
    backend: BackendOption = "auto",
    quant: QuantOption = None,
    threads: Threads = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", min=1, help="Most tokens per reply.")] = 512,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling (turn n uses seed + n).")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt.")] = None,
    load_state: Annotated[Optional[Path], typer.Option(
        "--load-state", help="Continue a conversation saved with /save.")] = None,
    no_cuda_graph: NoCudaGraph = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No model summary on stderr.")] = False,
    server: Server = None,
):
    """Chat in the terminal; each turn reads only its new tokens, from the carried state."""
    from ..chat import ChatSession
    from .repl import ChatREPL

    flags = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    sampling(**flags)  # bad values fail before any loading
    if server:  # flags not given take the server's defaults
        local = dict(model=model, preset=preset, offline=offline, device=device, dtype=dtype, backend=backend,
                     quant=quant, threads=threads, no_cuda_graph=no_cuda_graph, load_state=load_state)
        given = {k: v for k, v in flags.items() if v is not None}
        return chat_remote(server, dict(max_tokens=max_tokens, **given, seed=seed), system=system,
                           quiet=quiet, local=local)
    loaded = load(model, preset, offline, device, dtype, backend, threads, quiet=quiet, quant=quant)
    m = loaded.model
    params = sampling(**flags, defaults=loaded.generation_defaults, warn=True)
    note = sampling_note(loaded.generation_defaults, **flags)
    if note and not quiet:
        stderr_console().print(f"[dim]{note}[/]")
    session = ChatSession(m, loaded.tokenizer, system=system, model_name=loaded.name, max_tokens=max_tokens,
                          **asdict(params), seed=seed, cuda_graph=not no_cuda_graph)
    if load_state is not None:
        session.load(load_state)
    if system and not session.template.shows_system_prompt():
        stderr_console().print("note: this model's chat template leaves system prompts out")
    if not quiet:
        template = "plain fallback template" if session.template.is_fallback else "the model's chat template"
        stderr_console().print(f"[dim]{loaded.name} · load {loaded.load_s:.2f} s · {m.backend_name} on {m.device}, "
                               f"{dtype_name(m.dtype)} · {template}[/]")
    repl = ChatREPL(session)
    try:
        repl.run()
    except BrokenPipeError:
        closed_stdout()
    if repl.failed:  # a script goes on past an error, like a shell script, and reports it in its exit code
        raise typer.Exit(EXIT_USER_ERROR)
