"""The options several commands share, declared once, and what turns them into a model and sampling settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Optional

import typer

from .common import fail, progress, revision_of, stderr_console


def choices(name: str, *values: str) -> type[Enum]:
    """A typer choice: an Enum whose members are the accepted strings themselves."""
    return Enum(name, [(v, v) for v in values], type=str)


# dtype names as torch spells them, then the short ones the library accepts too.
WEIGHT_DTYPES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")
DType = choices("DType", "auto", *WEIGHT_DTYPES)
WeightDType = choices("WeightDType", *WEIGHT_DTYPES)
Backend = choices("Backend", "auto", "torch", "triton")
SaveAfter = choices("SaveAfter", "prompt", "generation")
QuantScheme = choices("QuantScheme", "int8", "int4")


def value(v: Any) -> Any:
    """The string behind a choice (None stays None)."""
    return v.value if isinstance(v, Enum) else v


MODEL_HELP = ("Model directory, built-in model or alias (`mamba2 models` lists them), or Hugging Face repo "
              "id\\[@revision], downloaded first when not in the local cache.")

Model = Annotated[Optional[str], typer.Option("-m", "--model", help=MODEL_HELP)]
Preset = Annotated[Optional[str], typer.Option(
    "--preset", help="Random-weight model of a known shape instead of a checkpoint.")]
Offline = Annotated[bool, typer.Option("--offline", help="Never touch the network: use only the local cache.")]
Device = Annotated[str, typer.Option("-d", "--device", help="cpu, auto, a GPU number (0) or cuda:N.")]
DTypeOption = Annotated[DType, typer.Option(
    "--dtype", case_sensitive=False, metavar="<auto|bfloat16|float16|float32>",
    help="auto: bfloat16 on GPUs; on CPUs float32 when it fits, else bfloat16 (bf16, fp16, fp32 too).")]
BackendOption = Annotated[Backend, typer.Option("--backend", help="auto: triton on CUDA, torch elsewhere.")]
QuantOption = Annotated[Optional[QuantScheme], typer.Option(
    "--quant", help="Quantize in_proj, out_proj and lm_head as they load: int8 (one scale per output channel) or "
    "int4 (one per group of up to 128 inputs). A quantized checkpoint loads quantized without it.")]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch.")]
Verbose = Annotated[bool, typer.Option(
    "-v", "--verbose",
    help="Also say where the time to the first token went (read, place, graph capture, compilation).")]
NoCudaGraph = Annotated[bool, typer.Option(
    "--no-cuda-graph", help="Prefill and decode eagerly on GPUs instead of replaying CUDA graphs.")]

# Sampling flags default to None: "not given", so the model's generation_config.json (as
# transformers reads it), then the library's defaults (greedy) fill in.
DEFAULTS_HELP = " Default: the model's generation_config.json, else "
Temperature = Annotated[Optional[float], typer.Option(
    "-t", "--temperature", "--temp", show_default=False, help="0 = greedy." + DEFAULTS_HELP + "0.")]
TopK = Annotated[Optional[int], typer.Option(
    "--top-k", show_default=False, help="Keep the k most likely tokens (0 = off)." + DEFAULTS_HELP + "0.")]
TopP = Annotated[Optional[float], typer.Option(
    "--top-p", show_default=False,
    help="Keep the smallest set of tokens with this much probability." + DEFAULTS_HELP + "1.")]
MinP = Annotated[Optional[float], typer.Option(
    "--min-p", show_default=False, help="Drop tokens less likely than min-p times the top one." + DEFAULTS_HELP + "0.")]
RepetitionPenalty = Annotated[Optional[float], typer.Option(
    "--repetition-penalty", show_default=False, help="> 1 discourages tokens already seen." + DEFAULTS_HELP + "1.")]

# Above this temperature sampling is close to uniform: the text is noise.
NOISE_TEMPERATURE = 2.0


def sampling(temperature: float | None, top_k: int | None, top_p: float | None, min_p: float | None,
             repetition_penalty: float | None, defaults: dict | None = None, *, warn: bool = False):
    """The sampling flags over the model's defaults over the library's, as checked SamplingParams
    (a bad value is a one-line error). warn: say so when the temperature makes noise."""
    from ..generation.sampling import SamplingParams

    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 repetition_penalty=repetition_penalty)
    merged = {**(defaults or {}), **{k: v for k, v in given.items() if v is not None}}
    params = SamplingParams(**merged).check()
    if warn and params.temperature > NOISE_TEMPERATURE:
        stderr_console().print(
            f"[yellow]warning:[/] temperature {params.temperature:g} samples nearly uniformly: expect noise "
            f"(-t is the temperature here; CPU threads are --threads)")
    return params


def sampling_note(defaults: dict, **given) -> str | None:
    """A line naming the sampling settings taken from the model's generation_config.json (no flag for them)."""
    names = {"temperature": "temperature", "top_k": "top-k", "top_p": "top-p", "min_p": "min-p",
             "repetition_penalty": "repetition penalty"}
    used = {k: v for k, v in defaults.items() if given.get(k) is None}
    if not used:
        return None
    return ("sampling defaults from the model's generation_config.json: "
            + ", ".join(f"{names[k]} {v:g}" for k, v in used.items())
            + (" (-t 0 for greedy)" if used.get("temperature") else ""))


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    name: str  # as the user gave it, or preset:NAME
    revision: Optional[str]  # the snapshot of a cached repo id
    load_s: float  # the load itself, without a download
    generation_defaults: dict = field(default_factory=dict)  # sampling defaults of generation_config.json


def load_split(loaded: Loaded) -> dict:
    """The load's seconds by part (read, place, setup: None for a preset), and the process's
    one-time work so far (CUDA graph capture, Triton compilation)."""
    from ..timings import first_token_work

    times = getattr(loaded.model, "load_times", None)
    split = {f"load_{k}_s": getattr(times, f"{k}_s", None) for k in ("read", "place", "setup")}
    return {**split, **first_token_work()}


def split_line(loaded: Loaded) -> str:
    """load_split as one line for -v."""
    s = load_split(loaded)
    parts = [f"{label} {s[key]:.2f} s" for label, key in (
        ("read", "load_read_s"), ("place", "load_place_s"), ("setup", "load_setup_s"),
        ("graph capture", "graph_capture_s"), ("compile", "compile_s")) if s[key] is not None]
    return f"load {loaded.load_s:.2f} s: " + " · ".join(parts)


def choose_threads(m, threads: Optional[int]) -> None:
    """Without --threads, CPU models choose their threads per forward (cpu_threads.py)."""
    if not threads:
        from ..cpu_threads import auto_threads

        m.cpu_threads = auto_threads(m)


def announce_compiling(m, quiet: bool) -> None:
    """On a terminal, say that the first token waits for kernels to compile, when Triton's
    cache holds none of ours (the first run on a machine)."""
    import sys

    if quiet or m.backend_name != "triton" or m.device.type != "cuda" or not sys.stderr.isatty():
        return
    from ..timings import cache_has_our_kernels

    if not cache_has_our_kernels():
        stderr_console().print("[dim]compiling kernels for this GPU, once[/]")


def load(model: Optional[str], preset: Optional[str], offline: bool, device: str, dtype, backend,
         threads: Optional[int], *, quiet: bool, batch_size: int = 1, quant=None) -> Loaded:
    """The model of -m (downloaded first if need be), of --preset, or the built-in default."""
    if model and preset:
        fail("give either -m/--model or --preset, not both")
    if threads:
        import torch

        torch.set_num_threads(threads)
    dtype, backend, quant = value(dtype), value(backend), value(quant)
    t0 = time.perf_counter()
    if model is None and preset is None:
        from ..hub import DEFAULT_MODEL

        model = DEFAULT_MODEL
        if not quiet:
            stderr_console().print(f"no model given (-m): using the built-in {DEFAULT_MODEL} model, a small Mamba-2 "
                                   "that writes Python (-m names another)")
    if model is None:
        from ..loader import load_preset

        m, tok = load_preset(preset, device, dtype, backend, batch_size=batch_size, quant=quant)
        load_s = time.perf_counter() - t0
        announce_compiling(m, quiet)
        choose_threads(m, threads)
        return Loaded(m, tok, f"preset:{preset}", None, load_s)
    from ..config import generation_defaults
    from ..hub import resolve_model
    from ..loader import load_model

    model_dir = resolve_model(model, offline=offline, progress=progress(quiet))
    defaults = generation_defaults(model_dir)
    t0 = time.perf_counter()  # the load, not the download
    m, tok = load_model(str(model_dir), device, dtype, backend, batch_size, offline=offline, progress=progress(quiet),
                        quant=quant)
    load_s = time.perf_counter() - t0
    announce_compiling(m, quiet)
    choose_threads(m, threads)
    return Loaded(m, tok, model, revision_of(model_dir), load_s, defaults)
