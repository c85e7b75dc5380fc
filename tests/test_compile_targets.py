"""Every Triton kernel the backend launches compiles for each GPU architecture and fits it.

No GPU is needed: the backend's operations run on fake CUDA tensors (torch's FakeTensorMode:
shapes, strides and dtypes, no memory) with the device's compute capability set to each
target's, so every decision the wrappers take (configs.py's table for that capability, PDL,
tensor descriptors, stages, blocks, warps) is the one a real GPU of that kind would get. Each
launch is bound by Triton's own binder for that target instead of being run, and every
distinct specialisation (kernel, signature, constexprs, options, target) is then compiled
once with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))` and checked
against the architecture's limits:

- it compiles (ptxas refuses griddepcontrol, PDL's instruction, below sm_90);
- shared memory per block, from the compiled metadata, within the architecture's maximum;
- registers and spills, from the -v log of Triton's bundled ptxas: registers x threads within
  the SM's 64K, and spills within SPILL_ALLOWANCE of what the same kernel spills on Hopper.

The work runs in a child process: conftest's TRITON_INTERPRET=1 makes every kernel an
interpreted function, which cannot be compiled for a GPU. The child compiles on every core.

To cover a new kernel, add the backend call that launches it to OPERATIONS.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Per-block limits of each target: shared memory per block (the opt-in maximum, bytes),
# 64K 32-bit registers per SM (a block's threads x registers must fit it), 255 per thread.
TARGETS = {
    80: {"smem": 163 * 1024},  # A100
    86: {"smem": 99 * 1024},  # RTX 30xx, A10, A40
    89: {"smem": 99 * 1024},  # RTX 40xx, L4, L40
    90: {"smem": 227 * 1024},  # H100, H200
}
REGISTERS_PER_SM = 64 * 1024
REGISTERS_PER_THREAD = 255
# Spill bytes per thread a kernel may add to Hopper's: Ampere's and Ada's mma.sync holds both
# dot operands in registers, where Hopper's wgmma reads them from shared memory (the scan's
# batch-1 configuration spills 448 bytes on sm_86 and sm_89, 168 on sm_90).
SPILL_ALLOWANCE = 512

# Model shapes: the presets and the built-in model.
MODELS = ("codestral-7b", "mamba2-130m", "mamba2-1.3b", "mamba2-2.7b", "tiny-code")
# Decode batch sizes: one per configs.DECODE_STEP entry (1, 2-3, 4-7, 8+) and the matvecs' 1-8 rows.
DECODE_BATCHES = (1, 2, 4, 8)
# Prefills (batch, length): a short prompt, a long batch-1 prompt (cut into segments), batches
# that take the scan's "many" configuration.
PREFILLS = ((1, 100), (1, 16384), (4, 2048), (8, 4096))
# dtypes by model: bf16 (the GPU default) and the built-in model as stored (fp16).
DTYPES = {"tiny-code": ("float16",)}
# fp32 (its own scan entry, half the matvec's stages) on a d_state-128 shape, fewer prefills:
# its scans are the slowest compiles.
FP32 = ("mamba2-130m", ((1, 2048), (8, 4096)))


# ---------------------------------------------------------------------------------------
# The backend calls, on fake tensors (child process only).


class _Proj:
    """A plain projection as the backends take it (`proj.weight`, `proj.bias`)."""

    def __init__(self, out_features, in_features, dtype, bias=False):
        import torch

        self.weight = torch.empty(out_features, in_features, device="cuda", dtype=dtype)
        self.bias = torch.empty(out_features, device="cuda", dtype=dtype) if bias else None


def _shape(name):
    from mamba2_cli.config import preset_config, read_config
    from mamba2_cli.hub import BUILTIN

    return read_config(BUILTIN[name]) if name in BUILTIN else preset_config(name)


def _empty(*shape, dtype):
    import torch

    return torch.empty(*shape, device="cuda", dtype=dtype)


def _layer(c, dtype):
    """One layer's parameters, laid out as model.py holds them."""
    import torch

    H, P = c.nheads, c.headdim
    return dict(
        in_proj=_Proj(c.in_proj_dim, c.d_model, dtype, c.bias),
        out_proj=_Proj(c.d_model, c.d_inner, dtype, c.bias),
        z_proj=_Proj(c.d_inner, c.d_model, dtype, c.bias),
        lm_head=_Proj(c.padded_vocab_size, c.d_model, dtype),
        norm=_empty(c.d_model, dtype=dtype),
        gated_norm=_empty(c.d_inner, dtype=dtype),
        conv_w=_empty(c.conv_dim, c.d_conv, dtype=dtype),
        conv_b=_empty(c.conv_dim, dtype=dtype) if c.conv_bias else None,
        A=_empty(H, dtype=torch.float32),
        D=_empty(H, P, dtype=torch.float32) if c.D_has_hdim else _empty(H, dtype=torch.float32),
        dt_bias=_empty(H, dtype=torch.float32),
    )


def _decode(be, c, p, b, dtype):
    """One decode token of one layer and the logits, as model._decode calls the backend."""
    import torch

    h = _empty(b, c.d_model, dtype=dtype)
    zxbcdt, residual = be.norm_linear(h, None, p["norm"], 1e-5, c.residual_in_fp32, p["in_proj"])
    conv_state = _empty(b, c.conv_dim, c.d_conv - 1, dtype=dtype)
    ssm_state = _empty(b, c.nheads, c.headdim, c.d_state, dtype=torch.float32)
    y = be.mixer_decode_step(zxbcdt, p["conv_w"], p["conv_b"], conv_state, p["A"], p["D"], p["dt_bias"],
                             c.dt_limit, p["gated_norm"], ssm_state, c.ngroups, 1e-5, c.norm_before_gate,
                             state_settled=True)
    h = be.linear(y, p["out_proj"])
    be.norm_linear(h, residual, p["norm"], 1e-5, c.residual_in_fp32, p["lm_head"])


def _decode_parts(be, c, p, b, dtype):
    """The step's parts as backend operations of their own."""
    import torch

    G, N = c.ngroups, c.d_state
    conv_state = _empty(b, c.conv_dim, c.d_conv - 1, dtype=dtype)
    be.conv1d_step(_empty(b, c.conv_dim, dtype=dtype), p["conv_w"], p["conv_b"], conv_state)
    x = _empty(b, c.nheads, c.headdim, dtype=dtype)
    be.ssd_decode_step(x, _empty(b, c.nheads, dtype=dtype), p["A"], _empty(b, G, N, dtype=dtype),
                       _empty(b, G, N, dtype=dtype), p["D"], p["dt_bias"], c.dt_limit,
                       _empty(b, c.nheads, c.headdim, N, dtype=torch.float32))


def _prefill(be, c, p, b, L, dtype):
    """One layer of a prompt and its kept rows' projections, as Mamba2Mixer.forward calls the
    backend: a batch of prompts padded to L (seq_len), one prompt as it is."""
    import torch

    H, P, G, N = c.nheads, c.headdim, c.ngroups, c.d_state
    for seq_len in (torch.empty(b, device="cuda", dtype=torch.int32) if b > 1 else None,):
        u = _empty(b, L, c.d_model, dtype=dtype)
        normed, residual = be.add_rmsnorm(u, None, p["norm"], 1e-5, c.residual_in_fp32)
        zxbcdt = be.linear(normed, p["in_proj"])
        z, xBC, dt = torch.split(zxbcdt, [c.d_inner, c.conv_dim, H], dim=-1)
        conv_state = _empty(b, c.conv_dim, c.d_conv - 1, dtype=dtype)
        xBC = be.causal_conv1d(xBC, p["conv_w"], p["conv_b"], conv_state, seq_len=seq_len)
        x, B, C = torch.split(xBC, [c.d_inner, G * N, G * N], dim=-1)
        ssm_state = _empty(b, H, P, N, dtype=torch.float32)
        y, _ = be.ssd_prefill(x.reshape(b, L, H, P), dt, p["A"], B.reshape(b, L, G, N), C.reshape(b, L, G, N),
                              p["D"], p["dt_bias"], c.dt_limit, c.chunk_size, initial_state=ssm_state,
                              seq_len=seq_len, final_state=ssm_state)
        y = be.gated_rmsnorm(y.reshape(b, L, c.d_inner), z, p["gated_norm"], c.d_inner // G, 1e-5,
                             c.norm_before_gate)
        be.linear(y, p["out_proj"])
        # The last layer projects its kept positions alone: one row per sequence.
        be.linear(_empty(b, 1, c.d_model, dtype=dtype), p["z_proj"])
        be.linear(_empty(b, 1, c.d_inner, dtype=dtype), p["out_proj"])


def _quantized(c, dtype, scheme):
    """The model's projections quantized with `scheme` as quant.py lays them out (qweight,
    scales in the model's dtype, int4's group size per projection from spec_for)."""
    import torch

    from mamba2_cli.linear import quantized_class
    from mamba2_cli.quant import spec_for

    spec, cls = spec_for(c, scheme), quantized_class(scheme)
    projs = {"in_proj": (c.in_proj_dim, c.d_model, c.bias), "out_proj": (c.d_model, c.d_inner, c.bias),
             "lm_head": (c.padded_vocab_size, c.d_model, False)}
    out = {}
    for name, (N, K, bias) in projs.items():
        with torch.device("meta"):
            lin = cls(K, N, bias, spec.group_for(name))
        lin.qweight = _empty(*lin._qshape(), dtype=cls.QDTYPE)
        lin.scales = _empty(*lin._sshape(), dtype=dtype)
        if bias:
            lin.bias = torch.nn.Parameter(_empty(N, dtype=dtype), requires_grad=False)
        out[name] = lin
    return out


def _quant_decode(be, c, p, b, dtype):
    """Decode's quantized projections: b rows (the one-row and the 2-8-row kernels)."""
    for scheme in ("int8", "int4"):
        for proj in _quantized(c, dtype, scheme).values():
            be.linear(_empty(b, proj.in_features, dtype=dtype), proj)


def _quant_prefill(be, c, p, b, L, dtype):
    """A prompt's quantized projections: the weight dequantized by one kernel, then F.linear."""
    for scheme in ("int8", "int4"):
        for proj in _quantized(c, dtype, scheme).values():
            be.linear(_empty(b, L, proj.in_features, dtype=dtype), proj)


# Every way the model reaches the backend: (name, "decode" | "prefill", call). A new kernel
# is covered by adding the call that launches it here.
OPERATIONS = (
    ("decode", "decode", _decode),
    ("decode parts", "decode", _decode_parts),
    ("prefill", "prefill", _prefill),
    ("quantized decode", "decode", _quant_decode),
    ("quantized prefill", "prefill", _quant_prefill),
)


# ---------------------------------------------------------------------------------------
# The child: record every launch for every target, compile each distinct one, check it.


def _index(t, idx):
    """Tensor indexing by slices, ints and None through view ops (indexing or copying a fake
    CUDA tensor asks torch for a CUDA build)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in idx):
        at = idx.index(Ellipsis)
        real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:at] + (slice(None),) * (t.dim() - real) + idx[at + 1:]
    dim = 0
    for i in idx:
        if i is None:
            t = t.unsqueeze(dim)
            dim += 1
        elif isinstance(i, int):
            t = t.select(dim, i)
        elif isinstance(i, slice):
            start, stop, step = i.indices(t.shape[dim])
            if step != 1:
                raise TypeError("strided slices")
            t = t.narrow(dim, start, stop - start)
            dim += 1
        else:
            raise TypeError(f"index {i!r}")
    return t


def _record(targets):
    """{key: (kernel, target, source args, options)} of every distinct launch."""
    import warnings

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    import mamba2_cli.kernels.triton as be
    from mamba2_cli.kernels.triton import configs

    warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
    launches, current, binders = {}, {}, {}

    def run(self, *args, grid, warmup, **kwargs):
        target = current["target"]
        if (self, target.arch) not in binders:
            backend = make_backend(target)
            binders[self, target.arch] = backend, create_function_from_signature(self.signature, self.params, backend)
        backend, binder = binders[self, target.arch]
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        # One compile per kernel, constexpr parameters, argument types and options for each
        # target: integer arguments that Triton specialises (equal to 1, divisible by 16)
        # change a few instructions, not the kernel's tiles, so the first launch seen stands
        # for the others.
        params = {self.arg_names[k[0]]: v for k, v in constexprs.items()
                  if len(k) == 1 and self.params[k[0]].is_constexpr}
        types = [v for v in signature.values() if v != "constexpr" and not v.startswith("i")]
        key = (self.cache_key, target.arch, repr(types), repr(sorted(params.items())),
               repr(sorted(options.__dict__.items())))
        if key not in launches:
            launches[key] = dict(fn=self, arch=target.arch, signature=signature, constexprs=constexprs,
                                 attrs=attrs, options=options.__dict__, op=current["op"], dtype=types[0],
                                 label=" ".join([self.__name__] + [f"{k}={v}" for k, v in params.items()
                                                                  if v is not None] + types))
        return None

    saved = (JITFunction.run, torch.Tensor.__getitem__, torch.Tensor.copy_, torch.cuda.get_device_capability,
             torch.cuda.current_device, torch.cuda.get_device_name)
    JITFunction.run = run
    torch.Tensor.__getitem__ = _index
    torch.Tensor.copy_ = lambda self, src, non_blocking=False: self  # no data to copy
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_name = lambda *a: "fake"
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            for arch in targets:
                cap = divmod(arch, 10)
                torch.cuda.get_device_capability = lambda *a, cap=cap: cap
                configs._CAPABILITY.clear()
                current["target"] = GPUTarget("cuda", arch, 32)
                runs = [(model, dtype, PREFILLS) for model in MODELS for dtype in DTYPES.get(model, ("bfloat16",))]
                runs.append((FP32[0], "float32", FP32[1]))
                for model, dtype_name, prefills in runs:
                    c = _shape(model)
                    dtype = getattr(torch, dtype_name)
                    p = _layer(c, dtype)
                    for name, phase, call in OPERATIONS:
                        for shape in DECODE_BATCHES if phase == "decode" else prefills:
                            current["op"] = f"{name} {model} {dtype_name} " + (
                                f"batch {shape}" if phase == "decode" else f"batch {shape[0]} L{shape[1]}")
                            args = (shape,) if phase == "decode" else shape
                            call(be, c, p, *args, dtype)
                configs._CAPABILITY.clear()
    finally:
        (JITFunction.run, torch.Tensor.__getitem__, torch.Tensor.copy_, torch.cuda.get_device_capability,
         torch.cuda.current_device, torch.cuda.get_device_name) = saved
    return list(launches.values())


_LAUNCHES: list = []


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of the kernel, from Triton's bundled ptxas -v."""
    import tempfile

    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={nv.sm_arch_from_capability(arch)}", str(src),
                              "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode:
        return {"error": log.strip().splitlines()[-1] if log.strip() else f"ptxas exit {out.returncode}"}
    return _ptxas_log(log)


def _ptxas_log(log: str) -> dict:
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return {"registers": max(regs, default=0), "spill_bytes": sum(spills)}


def _compile(i: int) -> dict:
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rec = _LAUNCHES[i]
    out = {"kernel": rec["fn"].__name__, "label": rec["label"], "arch": rec["arch"], "op": rec["op"],
           "dtype": rec["dtype"],
           "num_warps": rec["options"]["num_warps"], "num_stages": rec["options"].get("num_stages")}
    t0 = time.perf_counter()
    try:
        src = ASTSource(rec["fn"], rec["signature"], rec["constexprs"], rec["attrs"])
        knobs.nvidia.dump_ptxas_log = True  # Triton's own ptxas -v log, printed
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", rec["arch"], 32), options=rec["options"])
    except Exception as e:  # the failure is the finding: report it
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # ptxas's own line ("error   : Instruction 'griddepcontrol' requires .target sm_90 ...")
        # says more than Triton's summary above it.
        hit = [ln for ln in lines if re.match(r"ptxas .*error\s*:", ln)] or lines or [""]
        out["error"] = type(e).__name__ + ": " + re.sub(r"^.*?error\s*:\s*", "", hit[0])[:300]
        out["seconds"] = time.perf_counter() - t0
        return out
    out["shared"] = compiled.metadata.shared
    # From Triton's cache no ptxas ran: run it on the cached PTX.
    usage = _ptxas_log(log.getvalue()) if "registers" in log.getvalue() else None
    out.update(usage or _ptxas_usage(compiled.asm["ptx"], rec["arch"]))
    out["seconds"] = time.perf_counter() - t0
    return out


def child(targets) -> list[dict]:
    """Record, then compile every distinct launch on every core (forked workers)."""
    import multiprocessing

    _LAUNCHES.extend(_record(targets))
    # The slowest compiles first, so that no worker is left with one at the end.
    order = sorted(range(len(_LAUNCHES)), key=lambda i: "_ssd_scan" not in _LAUNCHES[i]["fn"].__name__)
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_compile, order, chunksize=1)


# ---------------------------------------------------------------------------------------
# The tests.


@pytest.fixture(scope="module")
def results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *map(str, TARGETS)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{len(res)} compiles in {time.perf_counter() - t0:.0f} s")
    return res


def _same_kernel(r):
    """A compile's kernel, tiles and options, whatever the target."""
    return r["kernel"], r["label"], r["num_warps"], r["num_stages"]


@pytest.mark.parametrize("arch", list(TARGETS))
def test_every_kernel_compiles_and_fits(results, arch):
    mine = [r for r in results if r["arch"] == arch]
    # Every kernel the backend launches (the operations of kernels/__init__).
    assert len({r["kernel"] for r in mine}) >= 12, sorted({r["kernel"] for r in mine})
    # Spills are a cost, not a limit of the hardware. A 16-bit kernel (the default path) may
    # spill no more than the same kernel at the same configuration does on Hopper, whose
    # figures are measured with it, plus SPILL_ALLOWANCE; a configuration Hopper does not run,
    # SPILL_ALLOWANCE. Kernels on fp32 inputs (first argument; a reference path: Hopper's scan
    # spills 40 KB there) are held to compiling, shared memory and registers.
    hopper = {_same_kernel(r): r.get("spill_bytes", 0) for r in results if r["arch"] == 90}
    limit = TARGETS[arch]["smem"]
    problems = []
    for r in mine:
        where = f"sm_{arch} {r['label']} (warps {r['num_warps']}, stages {r['num_stages']}; {r['op']})"
        if "error" in r:
            problems.append(f"{where}: {r['error']}")
            continue
        if r["shared"] > limit:
            problems.append(f"{where}: {r['shared']} bytes of shared memory, past {limit}")
        if "fp32" not in r["dtype"] and r["spill_bytes"] > hopper.get(_same_kernel(r), 0) + SPILL_ALLOWANCE:
            problems.append(f"{where}: spills {r['spill_bytes']} bytes (Hopper: {hopper.get(_same_kernel(r))})")
        if r["registers"] > REGISTERS_PER_THREAD or r["registers"] * 32 * r["num_warps"] > REGISTERS_PER_SM:
            problems.append(f"{where}: {r['registers']} registers x {32 * r['num_warps']} threads")
    assert not problems, "\n".join(problems)


def test_each_capability_gets_its_table_and_the_cli_names_it(monkeypatch):
    import torch

    from mamba2_cli.kernels import describe_device
    from mamba2_cli.kernels.triton import configs, pdl

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cases = {(9, 0): ("sm_90 (Hopper)", "table 9.0"), (8, 0): ("sm_80 (Ampere)", "table 8.0"),
             (8, 6): ("sm_86 (Ampere)", "table 8.6"), (8, 9): ("sm_89 (Ada)", "table 8.9"),
             (12, 0): ("sm_120 (Blackwell)", "fallback"), (7, 5): ("sm_75 (Turing)", "fallback")}
    cuda = torch.device("cuda", 0)
    for cap, (arch, table) in cases.items():
        monkeypatch.setitem(configs._CAPABILITY, 0, cap)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert describe_device(cuda) == {"gpu": "a GPU", "architecture": arch, "kernel_table": table}
        hopper = cap == (9, 0)
        assert configs.config_for(cuda, "matvec", "rows2-8")["tma"] is hopper
        assert configs.config_for(cuda, "gpu", "pdl") is hopper
        # griddepcontrol needs sm_90 (and the fallback's entries never ask for PDL).
        assert pdl.usable(True, cuda) is (cap >= (9, 0) and pdl.HAS_PDL)
        assert not any(cfg.get("pdl") for cfg in configs.table_for_capability(cap)["matvec"].values()) or hopper
    # The interpreter runs Hopper's table; Hopper's is the module's tables themselves.
    assert configs.config_for(torch.device("cpu"), "matvec", "rows2-8") is configs.MATVEC["rows2-8"]
    assert describe_device(torch.device("cpu")) == {"gpu": None, "architecture": None, "kernel_table": None}


# A kernel whose compile fails as it would on a GPU it does not fit: Triton's error for too much
# shared memory, raised from the kernel's launch (the interpreter's, on this CPU).
_FAILING = """
import sys
from triton.runtime.errors import OutOfResources
from triton.runtime.interpreter import InterpretedFunction

def run(self, *args, **kwargs):
    raise OutOfResources(235520, 101376, "shared memory")

InterpretedFunction.run = run
from mamba2_cli.cli import main
sys.argv = ["mamba2", *sys.argv[1:]]
main()
"""


def test_a_kernel_that_fails_is_one_line_naming_it_and_the_way_around():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", _FAILING, "run", "-q", "-n", "2", "--device", "cpu", "--backend", "triton",
                        "def f(x):"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "kernel _" in lines[0] and "--backend torch" in lines[0] and "shared memory" in lines[0], lines[0]


if __name__ == "__main__":
    print(json.dumps(child([int(a) for a in sys.argv[1:]])))
