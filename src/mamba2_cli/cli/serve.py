"""`mamba2 serve`: an OpenAI-compatible HTTP server (the `serve` extra: FastAPI, uvicorn)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import fail, print_error, progress, stderr_console
from .options import (BackendOption, Device, DTypeOption, Model, NoCudaGraph, Offline, Preset, QuantOption, Threads,
                      choose_threads, value)


def serve(
    model: Model = None,
    preset: Preset = None,
    offline: Offline = False,
    device: Device = "auto",
    dtype: DTypeOption = "auto",
    backend: BackendOption = "auto",
    quant: QuantOption = None,
    threads: Threads = None,
    no_cuda_graph: NoCudaGraph = False,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="MAMBA2_API_KEY", show_envvar=True,
        help="Require `Authorization: Bearer KEY` on every /v1 request.")] = None,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", min=1, help="Most sequences decoded together; more requests wait in the queue.")] = 64,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=0, help="Most requests waiting for a free row; past it requests get 429.")] = 256,
    max_prompt_tokens: Annotated[int, typer.Option(
        "--max-prompt-tokens", min=1, help="Longest prompt accepted, in tokens (longer: 400).")] = 32768,
    state_cache_gb: Annotated[float, typer.Option(
        "--state-cache-gb", min=0.0,
        help="Prefix-state cache on the device, in GB (as much again in host memory on GPUs); 0 turns it off.")] = 4.0,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No access log.")] = False,
):
    """Serve the model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions)."""
    try:
        import uvicorn

        from ..server.app import create_app
    except ImportError as e:
        fail(f"mamba2 serve needs the serve extra ({e.name} is missing): pip install 'mamba2-cli[serve]'")
    from ..server.defaults import sampling_defaults
    from ..server.scheduler import Scheduler

    if model and preset:
        fail("give either -m/--model or --preset, not both")
    dtype, backend, quant = value(dtype), value(backend), value(quant)
    model_dir = None
    if preset is None:
        from ..hub import DEFAULT_MODEL, resolve_model

        model = model or DEFAULT_MODEL
        model_dir = resolve_model(model, offline=offline, progress=progress(quiet))  # downloads before serving
    else:
        from ..config import preset_config

        preset_config(preset)  # an unknown name fails before the server starts
    name = model if preset is None else f"preset:{preset}"

    def load():
        if threads:
            import torch

            torch.set_num_threads(threads)
        if preset is not None:
            from ..loader import load_preset

            m, tok = load_preset(preset, device, dtype, backend, batch_size=max_batch, quant=quant)
        else:
            from ..loader import load_model

            m, tok = load_model(str(model_dir), device, dtype, backend, max_batch, offline=True, progress=False,
                                quant=quant)
        choose_threads(m, threads)
        return m, tok

    scheduler = Scheduler(load, max_batch=max_batch, max_queue=max_queue, cache_bytes=int(state_cache_gb * 1e9),
                          cuda_graph=not no_cuda_graph)
    app = create_app(scheduler, name, api_key=api_key, max_prompt_tokens=max_prompt_tokens,
                     sampling_defaults=sampling_defaults(model_dir))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning" if quiet else "info",
                            access_log=not quiet, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def failed(message: str) -> None:
        print_error(message)
        server.should_exit = True

    scheduler.on_failure = failed
    if not quiet:
        where = f"http://{host}:{port}"
        stderr_console().print(f"[dim]serving {name} on {where} (OpenAI API under {where}/v1, status at "
                               f"{where}/health); loading the model ...[/]")
    scheduler.start()
    try:
        server.run()
    finally:
        scheduler.stop()
    if scheduler.status == "failed":
        raise typer.Exit(1)
