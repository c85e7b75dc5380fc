"""The options several commands share, declared once, and what turns them into a model and sampling settings."""

from __future__ import annotations

import time
from dataclasses import dataclass
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
NoCudaGraph = Annotated[bool, typer.Option(
    "--no-cuda-graph", help="Prefill and decode eagerly on GPUs instead of replaying CUDA graphs.")]

Temperature = Annotated[float, typer.Option("-t", "--temperature", help="0 = greedy.")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")]
TopP = Annotated[float, typer.Option("--top-p", help="Keep the smallest set of tokens with this much probability.")]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens less likely than min-p times the top one.")]
RepetitionPenalty = Annotated[float, typer.Option(
    "--repetition-penalty", help="> 1 discourages tokens already seen.")]


def sampling(temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float):
    """The sampling flags as checked SamplingParams (a bad value is a one-line error)."""
    from ..generation.sampling import SamplingParams

    return SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty).check()


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    name: str  # as the user gave it, or preset:NAME
    revision: Optional[str]  # the snapshot of a cached repo id
    load_s: float  # the load itself, without a download


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
        return Loaded(m, tok, f"preset:{preset}", None, time.perf_counter() - t0)
    from ..hub import resolve_model
    from ..loader import load_model

    model_dir = resolve_model(model, offline=offline, progress=progress(quiet))
    t0 = time.perf_counter()  # the load, not the download
    m, tok = load_model(str(model_dir), device, dtype, backend, batch_size, offline=offline, progress=progress(quiet),
                        quant=quant)
    return Loaded(m, tok, model, revision_of(model_dir), time.perf_counter() - t0)
