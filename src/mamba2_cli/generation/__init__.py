"""Generation: the loop and its types, the decode steppers, the CUDA graphs they replay.

    types.py           Request, GenerationEvent, GenerationResult
    loop.py            prefill and the one loop: stream_generate, generate, stream_batch, generate_batch
    sequence.py        a request inside the loop: sampler, detokenizer, stop strings, stats
    sampling.py        token sampling on the device
    steppers.py        the decode step behind one launch/collect interface: eager, CUDA graph,
                       greedy graph (one step ahead when the caller does not keep the state)
    decode_graph.py    the decode step captured as a CUDA graph
    prefill_graphs.py  the prefill of short prompts captured per bucket length
    runner.py          the graph caches and lent states of one model (runner_for)
"""

from .loop import DEFAULT_PREFILL_CHUNK, generate, generate_batch, prefill, stream_batch, stream_generate
from .prefill_graphs import PREFILL_GRAPH_BUCKETS, PrefillGraphs
from .runner import Runner, runner_for
from .sampling import SamplingParams, sample
from .sequence import peak_memory_bytes
from .steppers import decode_one_token
from .types import GenerationEvent, GenerationResult, Request

__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "PREFILL_GRAPH_BUCKETS",
    "GenerationEvent",
    "GenerationResult",
    "PrefillGraphs",
    "Request",
    "Runner",
    "SamplingParams",
    "decode_one_token",
    "generate",
    "generate_batch",
    "peak_memory_bytes",
    "prefill",
    "runner_for",
    "sample",
    "stream_batch",
    "stream_generate",
]
