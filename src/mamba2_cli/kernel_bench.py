"""Per-kernel figures for one Mamba-2 layer: what `mamba2 bench` and benchmarks/bench_kernels.py share.

Every backend provides the same operations (see `kernels/__init__.py`), so one harness
times them all: the SSD chunked-scan prefill, the fused decode step, the causal conv, the
two norms and the single-row product (matvec) of decode. Each figure stands beside the
ceilings measured on the same device in the same run: the copy bandwidth (bytes read +
written by a device-to-device copy) and a matmul's FLOP/s in the inputs' dtype.

Conventions:
- SSD FLOP: the usual count of the chunked algorithm at the layer's chunk size Q (256 for
  Codestral), whatever block length a backend really uses: per chunk and head
  2·Q²·P (scores × x) + 2·2·Q·P·N (chunk state, and C times the carried state), plus per
  chunk and group 2·Q²·N (C Bᵀ). About 145 GFLOP for one Codestral layer at L = 16384.
- Bytes: what any implementation must move at least: every input read once, every output
  written once (states in fp32), intermediates not counted. GB/s is those bytes over the
  time; "of copy" divides that by the copy bandwidth.
- Decode: batch 1 per layer inside a CUDA graph of many layer calls (each with its own
  state), so launch overhead is off the clock as in generation; large batches one call per
  measurement. The state's own share (fp32 state read + written) is given apart.
- err: relative L2 error of the outputs and updated states against the torch reference in
  fp32 on the same inputs (a fast but wrong kernel shows here).
Times are medians. On GPUs: `triton.testing.do_bench` (CUDA events, L2 cleared before each
measured call); on CPUs: the wall clock.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

INF = float("inf")
EPS = 1e-5


@dataclass(frozen=True)
class KernelShape:
    """One layer's dimensions and the workloads measured on it."""

    name: str
    nheads: int  # H
    headdim: int  # P
    ngroups: int  # G
    d_state: int  # N
    d_conv: int  # K
    chunk: int  # Q of the FLOP count
    d_model: int
    prefill: tuple[tuple[int, int], ...]  # (batch, length) of each SSD case
    decode_batches: tuple[int, int]  # (1, large): the small one in a graph of `decode_layers` calls
    decode_layers: int
    long_len: int  # length of the conv and norm cases

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    def describe(self) -> str:
        return (f"H {self.nheads} · P {self.headdim} · G {self.ngroups} · N {self.d_state} · K {self.d_conv} · "
                f"chunk {self.chunk} · d_model {self.d_model}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prefill"] = [list(c) for c in self.prefill]
        d["decode_batches"] = list(self.decode_batches)
        return d


SHAPES = {
    # One Codestral-7B layer, at the prompt lengths upstream's kernels are usually quoted for.
    "codestral": KernelShape("codestral", 128, 64, 8, 128, 4, 256, 4096,
                             prefill=((1, 4096), (1, 16384), (8, 4096)), decode_batches=(1, 64),
                             decode_layers=64, long_len=16384),
    # One mamba2-130m layer at shorter lengths: seconds on a small CPU.
    "small": KernelShape("small", 24, 64, 1, 128, 4, 256, 768,
                         prefill=((1, 512), (1, 2048), (8, 512)), decode_batches=(1, 64),
                         decode_layers=24, long_len=2048),
    # Tests and Triton's CPU interpreter: a blink, and the times mean nothing.
    "tiny": KernelShape("tiny", 8, 16, 2, 16, 4, 32, 64,
                        prefill=((1, 64), (1, 256), (2, 64)), decode_batches=(1, 2),
                        decode_layers=2, long_len=128),
}


def choose_shape(spec: str, device: torch.device, backends) -> KernelShape:
    """'auto' -> codestral on GPUs; on CPUs small, or tiny when Triton's interpreter is among the backends."""
    if spec == "auto":
        if device.type == "cuda":
            spec = "codestral"
        else:
            spec = "tiny" if "triton" in backends else "small"
    if spec not in SHAPES:
        from .errors import Mamba2Error

        raise Mamba2Error(f"unknown kernel shape {spec!r}; choose auto, {', '.join(SHAPES)}")
    return SHAPES[spec]


# ---------------------------------------------------------------------------------------
# Timing and ceilings

_CACHE_FLUSH: dict = {}


def _clear_cache(device: torch.device) -> None:
    """Overwrite a buffer larger than a CPU's last-level cache (64 MiB)."""
    buf = _CACHE_FLUSH.get(device)
    if buf is None:
        buf = _CACHE_FLUSH[device] = torch.empty(64 << 20, dtype=torch.int8, device=device)
    buf.zero_()


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup_s: float | None = None,
            rep_s: float | None = None, min_reps: int | None = None, max_reps: int | None = None,
            clear_cache: bool = True) -> float:
    """Median milliseconds of one call of `fn`, after a first call (compilation) and a warm-up.

    GPUs: triton.testing.do_bench, ~25 ms of warm-up and ~100 ms of measured calls, the L2
    cleared before each. CPUs: the wall clock, the last-level cache cleared before each call
    (unless clear_cache is off), ~0.3 s of calls (min_reps to max_reps, 3 to 30 by default);
    min_reps, max_reps and clear_cache apply to CPUs only.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        with torch.cuda.device(device):
            return do_bench(fn, warmup=1e3 * (0.025 if warmup_s is None else warmup_s),
                            rep=1e3 * (0.1 if rep_s is None else rep_s), return_mode="median")
    warmup_s = 0.0 if warmup_s is None else warmup_s
    rep_s = 0.3 if rep_s is None else rep_s
    min_reps = 3 if min_reps is None else min_reps
    max_reps = 30 if max_reps is None else max_reps
    t0 = time.perf_counter()
    fn()  # also the estimate: nothing compiles on CPUs but Triton's interpreter, which does not cache
    est = time.perf_counter() - t0
    for _ in range(min(int(warmup_s / max(est, 1e-7)), 100)):
        fn()
    times = []
    for _ in range(max(min_reps, min(max_reps, int(rep_s / max(est, 1e-7))))):
        if clear_cache:
            _clear_cache(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second a device-to-device copy moves (read + written): the memory ceiling."""
    if device.type == "cpu":
        nbytes = min(nbytes, 256 << 20)
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    a.fill_(1)
    ms = time_ms(lambda: b.copy_(a), device, rep_s=0.2 if device.type == "cuda" else 0.5, clear_cache=False)
    return 2 * nbytes / (ms * 1e-3)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int | None = None) -> tuple[float, int]:
    """(FLOP/s, n) of an n³ matmul in `dtype`: 8192³ on GPUs, 1024³ on CPUs (the compute ceiling)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.matmul(a, b, out=c), device, clear_cache=False)
    return 2 * n**3 / (ms * 1e-3), n


# ---------------------------------------------------------------------------------------
# FLOP and byte counts

def ssd_flops(s: KernelShape, b: int, L: int) -> int:
    """FLOP of the chunked SSD scan at chunk size s.chunk (the usual count; ~145 GFLOP at Codestral L=16384)."""
    Q, P, N = s.chunk, s.headdim, s.d_state
    nc = math.ceil(L / Q)
    per_chunk_head = 2 * Q * Q * P + 2 * 2 * Q * P * N
    return b * nc * (s.nheads * per_chunk_head + s.ngroups * 2 * Q * Q * N)


def ssd_bytes(s: KernelShape, b: int, L: int, itemsize: int) -> int:
    """x, B, C, dt read and y written once (inputs' dtype); initial state read, final state written (fp32); A, D, dt_bias."""
    H, P = s.nheads, s.headdim
    per_token = 2 * H * P + 2 * s.ngroups * s.d_state + H  # x and y, B and C, dt
    return b * L * per_token * itemsize + 2 * b * H * P * s.d_state * 4 + 3 * H * 4


def state_bytes(s: KernelShape, b: int) -> int:
    """The fp32 SSM state of one layer read and written once."""
    return 2 * b * s.nheads * s.headdim * s.d_state * 4


def decode_bytes(s: KernelShape, b: int, itemsize: int) -> int:
    """One decode token of one layer's mixer: zxbcdt read, conv window read and written, conv weight and bias,
    SSM state read and written, y written, norm weight, A, D, dt_bias."""
    K = s.d_conv
    return (b * s.in_proj * itemsize + 2 * b * s.conv_dim * (K - 1) * itemsize + s.conv_dim * (K + 1) * itemsize
            + state_bytes(s, b) + b * s.d_inner * itemsize + s.d_inner * itemsize + 3 * s.nheads * 4)


def conv_bytes(s: KernelShape, b: int, L: int, itemsize: int) -> int:
    """xBC read and the output written; conv state read and written; weight and bias."""
    K = s.d_conv
    return (2 * b * L * s.conv_dim + 2 * b * s.conv_dim * (K - 1) + s.conv_dim * (K + 1)) * itemsize


def gated_norm_bytes(s: KernelShape, rows: int, itemsize: int) -> int:
    """y and z read, the output written, the weight."""
    return (3 * rows * s.d_inner + s.d_inner) * itemsize


def add_norm_bytes(s: KernelShape, rows: int, itemsize: int) -> int:
    """x read; the fp32 residual read and written; the output written; the weight."""
    return rows * s.d_model * (2 * itemsize + 8) + s.d_model * itemsize


def matvec_bytes(s: KernelShape, itemsize: int) -> int:
    """in_proj for one token: the weight [in_proj, d_model], x and the output."""
    return (s.in_proj * s.d_model + s.d_model + s.in_proj) * itemsize


# ---------------------------------------------------------------------------------------
# Inputs, laid out as the model passes them

def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _dt_bias(s: KernelShape, g, device) -> torch.Tensor:
    # softplus^-1 of dt drawn log-uniformly in [1e-3, 0.1], as checkpoints initialise it
    dt = torch.exp(torch.rand(s.nheads, generator=g, device=device) * (math.log(0.1) - math.log(1e-3))
                   + math.log(1e-3))
    return dt + torch.log(-torch.expm1(-dt))


def ssd_inputs(s: KernelShape, b: int, L: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """x, B, C as views into one conv output and dt a view into in_proj's output, as in the model."""
    g = _gen(device, seed)
    H, P, G, N = s.nheads, s.headdim, s.ngroups, s.d_state
    zxbcdt = torch.randn(b, L, s.in_proj, generator=g, device=device).to(dtype)
    xBC = torch.randn(b, L, s.conv_dim, generator=g, device=device).to(dtype)
    x, B, C = torch.split(xBC, [s.d_inner, G * N, G * N], dim=-1)
    return dict(
        x=x.reshape(b, L, H, P), dt=zxbcdt[..., -H:],
        A=-torch.exp(torch.rand(H, generator=g, device=device) * math.log(16.0)),
        B=B.reshape(b, L, G, N), C=C.reshape(b, L, G, N), D=torch.randn(H, generator=g, device=device),
        dt_bias=_dt_bias(s, g, device),
        initial_state=torch.randn(b, H, P, N, generator=g, device=device) * 0.1,
    )


def run_ssd(fn, inp: dict, chunk: int, **kw):
    return fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["dt_bias"], (0.0, INF), chunk,
              inp["initial_state"], **kw)


def mixer_layers(s: KernelShape, nlayers: int, b: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> list[dict]:
    """`nlayers` independent layers' decode inputs, weights and states (batch b)."""
    g = _gen(device, seed)
    H, K = s.nheads, s.d_conv
    layers = []
    for _ in range(nlayers):
        layers.append(dict(
            conv_weight=(torch.randn(s.conv_dim, K, generator=g, device=device) * 0.5).to(dtype),
            conv_bias=(torch.randn(s.conv_dim, generator=g, device=device) * 0.1).to(dtype),
            conv_state=torch.randn(b, s.conv_dim, K - 1, generator=g, device=device).to(dtype),
            A=-torch.exp(torch.rand(H, generator=g, device=device) * 2.77),
            D=torch.randn(H, generator=g, device=device),
            dt_bias=_dt_bias(s, g, device),
            norm_weight=torch.ones(s.d_inner, device=device, dtype=dtype),
            ssm_state=torch.randn(b, H, s.headdim, s.d_state, generator=g, device=device) * 0.1,
            zxbcdt=torch.randn(b, s.in_proj, generator=g, device=device).to(dtype),
        ))
    return layers


def call_mixer(fn, st: dict, ngroups: int, **kw):
    return fn(st["zxbcdt"], st["conv_weight"], st["conv_bias"], st["conv_state"], st["A"], st["D"], st["dt_bias"],
              (0.0, INF), st["norm_weight"], st["ssm_state"], ngroups, EPS, False, **kw)


# Layers in the CUDA graph that times the large decode batch: at Codestral shapes and batch 64,
# 8 layers hold 2.1 GB of state, 43 times the H200's L2.
LARGE_BATCH_GRAPH_LAYERS = 8


def graph_of(fn, layers: list[dict], ngroups: int, **kw) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of one decode step through every layer in `layers`, warmed up first (compiling
    kernels, allocating scratch and library workspaces) on a side stream, as generation/decode_graph.py does.
    The timing graphs pass state_settled, as decode does: in a replay each layer's state was
    last written by the replay before, which has completed."""
    device = layers[0]["ssm_state"].device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            for st in layers:
                call_mixer(fn, st, ngroups, **kw)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        for st in layers:
            call_mixer(fn, st, ngroups, **kw)
    return graph


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _fp32(t):
    return t.float() if torch.is_tensor(t) and t.is_floating_point() else t


def _fp32_copy(d: dict) -> dict:
    return {k: _fp32(v).clone() for k, v in d.items()}


# ---------------------------------------------------------------------------------------
# The harness

def case_count(s: KernelShape) -> int:
    """Rows (and progress steps) per backend."""
    return len(s.prefill) + 2 + 4


def _row(backend: str, kernel: str, case: str, ms: float, flop: int | None, nbytes: int,
         ceilings: dict, **extra) -> dict:
    copy_bw, mm = ceilings.get("copy_bytes_s"), ceilings.get("matmul_flop_s")
    tflop_s = flop / (ms * 1e-3) / 1e12 if flop else None
    gb_s = nbytes / (ms * 1e-3) / 1e9
    r = dict(backend=backend, kernel=kernel, case=case, ms=ms, us=ms * 1e3, flop=flop, bytes=nbytes,
             tflop_s=tflop_s, gb_s=gb_s,
             share_of_matmul=tflop_s * 1e12 / mm if tflop_s and mm else None,
             share_of_copy=gb_s * 1e9 / copy_bw if copy_bw else None, err=None, timing="per call", note=None)
    r.update(extra)
    return r


def run_kernels(backend: str, device: torch.device, shape: KernelShape, dtype: torch.dtype, ceilings: dict, *,
                cuda_graph: bool = True, check: bool = True, min_reps: int | None = None,
                on_step: Callable[[], None] | None = None) -> list[dict]:
    """Time every kernel of `backend` ('torch' or 'triton') at `shape`; one row (a dict) per case.

    `ceilings`: {'copy_bytes_s': ..., 'matmul_flop_s': ...} (either may be missing) for the shares.
    A case that runs out of device memory gives a row with `error` and no figures.
    `min_reps`: fewest measured calls per case (default: time_ms's; 1 under Triton's CPU
    interpreter, whose times mean nothing and whose calls take a good part of a second).
    """
    from .kernels import get_backend
    from .kernels import pytorch
    from .linear import Linear

    be = get_backend(backend, device.type)
    s, isz = shape, torch.tensor([], dtype=dtype).element_size()
    G = s.ngroups
    choose = getattr(be, "scan_chunk_size", lambda q, device_type: q)
    chunk = choose(s.chunk, device.type)  # the block length the model would run this backend's scan at
    use_graph = cuda_graph and device.type == "cuda"
    if min_reps is None and be.name == "triton" and device.type != "cuda":
        min_reps = 1

    def time_it(fn):
        return time_ms(fn, device, min_reps=min_reps)

    rows: list[dict] = []

    def ssd_case(b, L):
        def go():
            inp = ssd_inputs(s, b, L, device, dtype, seed=L + b)
            err = None
            if check:
                y, st = run_ssd(be.ssd_prefill, inp, chunk)
                y_ref, st_ref = run_ssd(pytorch.ssd_prefill, {k: _fp32(v) for k, v in inp.items()}, s.chunk)
                err = max(rel_err(y, y_ref), rel_err(st, st_ref))
                del y, st, y_ref, st_ref
            ms = time_it(lambda: run_ssd(be.ssd_prefill, inp, chunk))
            return _row(be.name, "ssd_prefill", f"b{b} L{L}", ms, ssd_flops(s, b, L), ssd_bytes(s, b, L, isz),
                        ceilings, batch=b, seqlen=L, err=err,
                        note=f"FLOP at Q={s.chunk}" + (f", runs Q={chunk}" if chunk != s.chunk else ""))
        return "ssd_prefill", f"b{b} L{L}", go

    def decode_check(b) -> float:
        st = mixer_layers(s, 1, b, device, dtype, seed=100 + b)[0]
        ref = _fp32_copy(st)
        errs = []
        for _ in range(2):
            out = call_mixer(be.mixer_decode_step, st, G)
            out_ref = call_mixer(pytorch.mixer_decode_step, ref, G)
            errs.append(max(rel_err(out, out_ref), rel_err(st["ssm_state"], ref["ssm_state"]),
                            rel_err(st["conv_state"], ref["conv_state"])))
        return max(errs)

    def decode_small():
        b, n = s.decode_batches[0], s.decode_layers

        def go():
            err = decode_check(b) if check else None
            layers = mixer_layers(s, n, b, device, dtype)
            if use_graph:
                graph = graph_of(be.mixer_decode_step, layers, G, state_settled=True)
                ms = time_it(graph.replay) / n
                timing = f"per layer, CUDA graph of {n} layers"
            else:
                def loop():
                    for st in layers:
                        call_mixer(be.mixer_decode_step, st, G)
                ms = time_it(loop) / n
                timing = f"per layer, eager loop of {n} layers"
            sb = state_bytes(s, b)
            return _row(be.name, "mixer_decode_step", f"b{b}", ms, None, decode_bytes(s, b, isz), ceilings,
                        batch=b, err=err, timing=timing, state_bytes=sb,
                        state_share_of_copy=_share(sb, ms, ceilings))
        return "mixer_decode_step", f"b{b}", go

    def decode_large():
        b = s.decode_batches[1]

        def go():
            err = decode_check(b) if check else None
            st = mixer_layers(s, 1, b, device, dtype, seed=b)[0]
            one_ms = time_it(lambda: call_mixer(be.mixer_decode_step, st, G))
            sb = state_bytes(s, b)
            ms, timing, extra = one_ms, "per call", {}
            if use_graph:
                # As decode runs it: inside the model's graph, layer after layer, each with a state
                # of its own (far more than L2 holds), so no launch gap sits between two calls.
                # The one-call figure stays beside it.
                n = LARGE_BATCH_GRAPH_LAYERS
                del st
                layers = mixer_layers(s, n, b, device, dtype, seed=b)
                graph = graph_of(be.mixer_decode_step, layers, G, state_settled=True)
                ms = time_it(graph.replay) / n
                timing = f"per layer, CUDA graph of {n} layers"
                extra = dict(one_call_ms=one_ms, one_call_state_share_of_copy=_share(sb, one_ms, ceilings))
                del graph, layers
            return _row(be.name, "mixer_decode_step", f"b{b}", ms, None, decode_bytes(s, b, isz), ceilings,
                        batch=b, err=err, timing=timing, state_bytes=sb, state_share_of_copy=_share(sb, ms, ceilings),
                        **extra)
        return "mixer_decode_step", f"b{b}", go

    def conv_case():
        L = s.long_len

        def go():
            g = _gen(device, 1)
            zxbcdt = torch.randn(1, L, s.in_proj, generator=g, device=device).to(dtype)
            xBC = zxbcdt[..., s.d_inner:s.d_inner + s.conv_dim]  # a view, as in the model
            w = torch.randn(s.conv_dim, s.d_conv, generator=g, device=device).to(dtype)
            bias = torch.randn(s.conv_dim, generator=g, device=device).to(dtype)
            cs = torch.randn(1, s.conv_dim, s.d_conv - 1, generator=g, device=device).to(dtype)
            err = None
            if check:
                cs_ref = _fp32(cs).clone()
                out = be.causal_conv1d(xBC, w, bias, cs.clone())
                err = rel_err(out, pytorch.causal_conv1d(_fp32(xBC), _fp32(w), _fp32(bias), cs_ref))
            ms = time_it(lambda: be.causal_conv1d(xBC, w, bias, cs))
            return _row(be.name, "causal_conv1d", f"b1 L{L}", ms, None, conv_bytes(s, 1, L, isz), ceilings,
                        batch=1, seqlen=L, err=err)
        return "causal_conv1d", f"b1 L{L}", go

    def gated_norm_case():
        L = s.long_len

        def go():
            g = _gen(device, 2)
            y = torch.randn(1, L, s.d_inner, generator=g, device=device).to(dtype)
            z = torch.randn(1, L, s.d_inner, generator=g, device=device).to(dtype)
            w = torch.randn(s.d_inner, generator=g, device=device).to(dtype)
            gs = s.d_inner // G
            err = None
            if check:
                err = rel_err(be.gated_rmsnorm(y, z, w, gs, EPS),
                              pytorch.gated_rmsnorm(_fp32(y), _fp32(z), _fp32(w), gs, EPS))
            ms = time_it(lambda: be.gated_rmsnorm(y, z, w, gs, EPS))
            return _row(be.name, "gated_rmsnorm", f"L{L} d{s.d_inner}", ms, None, gated_norm_bytes(s, L, isz),
                        ceilings, batch=1, seqlen=L, err=err, note=f"{G} group{'s' if G > 1 else ''}")
        return "gated_rmsnorm", f"L{L} d{s.d_inner}", go

    def add_norm_case():
        L = s.long_len

        def go():
            g = _gen(device, 3)
            x = torch.randn(L, s.d_model, generator=g, device=device).to(dtype)
            res = torch.randn(L, s.d_model, generator=g, device=device)
            w = torch.randn(s.d_model, generator=g, device=device).to(dtype)
            err = None
            if check:
                out, r = be.add_rmsnorm(x, res, w, EPS)
                out_ref, r_ref = pytorch.add_rmsnorm(_fp32(x), res, _fp32(w), EPS)
                err = max(rel_err(out, out_ref), rel_err(r, r_ref))
            ms = time_it(lambda: be.add_rmsnorm(x, res, w, EPS))
            return _row(be.name, "add_rmsnorm", f"L{L} d{s.d_model}", ms, None, add_norm_bytes(s, L, isz),
                        ceilings, batch=1, seqlen=L, err=err, note="fp32 residual")
        return "add_rmsnorm", f"L{L} d{s.d_model}", go

    def matvec_case():
        def go():
            g = _gen(device, 4)
            x = torch.randn(1, s.d_model, generator=g, device=device).to(dtype)
            proj = Linear.from_tensors(
                (torch.randn(s.in_proj, s.d_model, generator=g, device=device) * s.d_model ** -0.5).to(dtype))
            ref = Linear.from_tensors(_fp32(proj.weight.detach()))
            err = rel_err(be.linear(x, proj), pytorch.linear(_fp32(x), ref)) if check else None
            ms = time_it(lambda: be.linear(x, proj))
            return _row(be.name, "linear (matvec)", f"b1 {s.in_proj}x{s.d_model}", ms, 2 * s.in_proj * s.d_model,
                        matvec_bytes(s, isz), ceilings, batch=1, err=err, note="in_proj, 1 token")
        return "linear (matvec)", f"b1 {s.in_proj}x{s.d_model}", go

    cases = [ssd_case(b, L) for b, L in s.prefill] + [decode_small(), decode_large(), conv_case(),
                                                      gated_norm_case(), add_norm_case(), matvec_case()]
    assert len(cases) == case_count(s)
    for kernel, case, go in cases:
        try:
            with torch.inference_mode():
                rows.append(go())
        except torch.OutOfMemoryError:
            rows.append(dict(backend=be.name, kernel=kernel, case=case, error="out of memory"))
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if on_step:
            on_step()
    return rows


def _share(nbytes: int, ms: float, ceilings: dict) -> float | None:
    bw = ceilings.get("copy_bytes_s")
    return nbytes / (ms * 1e-3) / bw if bw else None
