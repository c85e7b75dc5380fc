"""The kernel harness behind `mamba2 bench`'s kernel section (kernel_bench.py), on CPU.

Nothing here asserts a time: only that the figures exist, are finite and positive, follow
from the counts, and that the counts are the hand-computed ones.
"""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba2_cli import kernel_bench as kb  # noqa: E402
from test_cli import mamba2, no_traceback, ok  # noqa: E402

CPU = torch.device("cpu")
# Small enough for Triton's interpreter to get through every case in seconds.
MICRO = kb.KernelShape("micro", nheads=2, headdim=16, ngroups=1, d_state=16, d_conv=4, chunk=16, d_model=16,
                       prefill=((1, 32), (2, 20)), decode_batches=(1, 2), decode_layers=2, long_len=24)
# For the hand-computed counts: d_inner 32, conv_dim 64, in_proj 100.
HAND = kb.KernelShape("hand", nheads=4, headdim=8, ngroups=2, d_state=8, d_conv=4, chunk=4, d_model=16,
                      prefill=((1, 10),), decode_batches=(1, 2), decode_layers=1, long_len=10)
CEILINGS = {"copy_bytes_s": 20e9, "matmul_flop_s": 100e9}
ROW_KEYS = {"backend", "kernel", "case", "ms", "us", "flop", "bytes", "tflop_s", "gb_s", "share_of_matmul",
            "share_of_copy", "err", "timing", "note"}
KERNELS = ["ssd_prefill", "mixer_decode_step", "causal_conv1d", "gated_rmsnorm", "add_rmsnorm", "linear (matvec)"]


def test_counts_match_the_hand_computed_values():
    assert (HAND.d_inner, HAND.conv_dim, HAND.in_proj) == (32, 64, 100)
    # 3 chunks of 4; per chunk and head 2*4*4*8 + 2*2*4*8*8 = 256 + 1024; per chunk and group 2*4*4*8 = 256
    assert kb.ssd_flops(HAND, 1, 10) == 3 * (4 * (256 + 1024) + 2 * 256) == 16896
    assert kb.ssd_flops(HAND, 2, 12) == 2 * kb.ssd_flops(HAND, 1, 10)  # 12 tokens: still 3 chunks
    # per token x + y 2*32, B + C 2*2*8, dt 4 -> 100 elements of 2 bytes; state 4*8*8 fp32 twice; A, D, dt_bias
    assert kb.ssd_bytes(HAND, 1, 10, 2) == 10 * 100 * 2 + 2 * 256 * 4 + 3 * 4 * 4 == 4096
    assert kb.state_bytes(HAND, 2) == 2 * 2 * 256 * 4 == 4096
    # zxbcdt 2*100*2, conv window 2*2*64*3*2, conv weight + bias 64*5*2, state 4096, y 2*32*2, norm w 32*2, 48
    assert kb.decode_bytes(HAND, 2, 2) == 400 + 1536 + 640 + 4096 + 128 + 64 + 48 == 6912
    assert kb.conv_bytes(HAND, 1, 10, 2) == (2 * 10 * 64 + 2 * 64 * 3 + 64 * 5) * 2 == 3968
    assert kb.gated_norm_bytes(HAND, 10, 2) == (3 * 10 * 32 + 32) * 2 == 1984
    assert kb.add_norm_bytes(HAND, 10, 2) == 10 * 16 * (2 + 2 + 4 + 4) + 16 * 2 == 1952
    assert kb.matvec_bytes(HAND, 2) == (100 * 16 + 16 + 100) * 2 == 3432


def test_codestral_counts_match_the_layer_shape():
    s = kb.SHAPES["codestral"]
    assert (s.d_inner, s.conv_dim, s.in_proj) == (8192, 10240, 18560)  # in_proj: z, x, B, C and dt of 128 heads
    assert kb.ssd_flops(s, 1, 16384) == 146_028_888_064  # "about 145 GFLOP" (kernel_bench's docstring)
    assert kb.state_bytes(s, 1) == 2 * 4_194_304  # 4.2 MB read + 4.2 MB written
    assert round(kb.state_bytes(s, 64) / 1e6) == 537  # 537 MB of state traffic at batch 64
    assert [c for c in s.prefill] == [(1, 4096), (1, 16384), (8, 4096)] and s.decode_batches == (1, 64)


def test_shape_choice():
    assert kb.choose_shape("auto", torch.device("cuda"), ["triton"]).name == "codestral"
    assert kb.choose_shape("auto", CPU, ["torch"]).name == "small"
    assert kb.choose_shape("auto", CPU, ["torch", "triton"]).name == "tiny"
    assert kb.choose_shape("codestral", CPU, ["torch"]).name == "codestral"
    from mamba2_cli.errors import Mamba2Error

    with pytest.raises(Mamba2Error, match="unknown kernel shape"):
        kb.choose_shape("huge", CPU, ["torch"])


def test_time_ms_is_the_median_of_positive_call_times():
    calls = []
    ms = kb.time_ms(lambda: calls.append(1), CPU, min_reps=4, max_reps=4, clear_cache=False)
    assert ms > 0 and math.isfinite(ms)
    assert len(calls) == 1 + 4  # the first call (also the estimate), then the measured ones


def check_rows(rows, backend, shape, max_err, itemsize=4, graph=False):
    assert len(rows) == kb.case_count(shape)
    assert [r["kernel"] for r in rows] == ["ssd_prefill"] * len(shape.prefill) + KERNELS[1:2] * 2 + KERNELS[2:]
    for r in rows:
        assert ROW_KEYS <= set(r), r
        assert r["backend"] == backend and "error" not in r
        for k in ("ms", "gb_s", "share_of_copy"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["kernel"], k, r[k])
        assert r["us"] == pytest.approx(r["ms"] * 1e3)
        # The figures follow from the counts and the ceilings.
        assert r["gb_s"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert r["share_of_copy"] == pytest.approx(r["gb_s"] * 1e9 / CEILINGS["copy_bytes_s"])
        assert r["err"] is not None and r["err"] < max_err, (r["kernel"], r["err"])
    ssd = [r for r in rows if r["kernel"] == "ssd_prefill"]
    for r, (b, L) in zip(ssd, shape.prefill):
        assert (r["batch"], r["seqlen"], r["case"]) == (b, L, f"b{b} L{L}")
        assert r["flop"] == kb.ssd_flops(shape, b, L) and r["bytes"] == kb.ssd_bytes(shape, b, L, itemsize)
        assert r["tflop_s"] > 0 and r["share_of_matmul"] == pytest.approx(r["tflop_s"] * 1e12 / CEILINGS["matmul_flop_s"])
    dec = [r for r in rows if r["kernel"] == "mixer_decode_step"]
    assert [r["batch"] for r in dec] == list(shape.decode_batches)
    how = "CUDA graph" if graph else "eager loop"
    assert dec[0]["timing"] == f"per layer, {how} of {shape.decode_layers} layers"
    for r in dec:
        assert r["bytes"] == kb.decode_bytes(shape, r["batch"], itemsize)
        assert r["state_bytes"] == kb.state_bytes(shape, r["batch"])
        assert 0 < r["state_share_of_copy"] < r["share_of_copy"]


def test_harness_torch_backend():
    rows = kb.run_kernels("torch", CPU, MICRO, torch.float32, CEILINGS, min_reps=1)
    check_rows(rows, "torch", MICRO, 1e-5)
    assert "runs Q" not in rows[0]["note"]  # chunk 16 is what the torch backend runs on CPU too


def test_harness_triton_backend():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs on CPU under Triton's interpreter (the GPU tests below cover a real GPU)")
    rows = kb.run_kernels("triton", CPU, MICRO, torch.float32, CEILINGS)
    check_rows(rows, "triton", MICRO, 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_harness_on_the_gpu_times_decode_in_a_cuda_graph(backend):
    rows = kb.run_kernels(backend, torch.device("cuda"), kb.SHAPES["tiny"], torch.bfloat16, CEILINGS)
    check_rows(rows, backend, kb.SHAPES["tiny"], 2e-2, itemsize=2, graph=True)


def test_harness_reports_an_out_of_memory_case_and_goes_on(monkeypatch):
    real = kb.ssd_inputs

    def oom(s, b, L, *a, **k):
        if L == 32:
            raise torch.OutOfMemoryError("pretend")
        return real(s, b, L, *a, **k)

    monkeypatch.setattr(kb, "ssd_inputs", oom)
    steps = []
    rows = kb.run_kernels("torch", CPU, MICRO, torch.float32, CEILINGS, min_reps=1, on_step=lambda: steps.append(1))
    assert rows[0] == {"backend": "torch", "kernel": "ssd_prefill", "case": "b1 L32", "error": "out of memory"}
    assert rows[1]["ms"] > 0 and len(rows) == len(steps) == kb.case_count(MICRO)


BENCH = ("bench", "--backend", "torch", "--preset", "tiny", "--device", "cpu", "--prompt-len", "8", "--gen-len", "2",
         "--repeats", "1", "--kernel-shape", "tiny")


def test_bench_json_has_the_kernel_section():
    r = json.loads(ok(mamba2(*BENCH, "--json")).stdout)
    env = r["environment"]
    assert env["copy_bandwidth_bytes_s"] > 0 and env["matmul_flop_s"] > 0 and env["matmul"] == "float32 1024^3"
    assert r["results"][0]["prefill_share_of_matmul"] > 0
    k = r["kernels"]
    assert k["shape"]["name"] == "tiny" and k["shape"]["nheads"] == 8 and k["shape"]["dtype"] == "float32"
    assert k["shape"]["state_dtype"] == "float32" and k["interpreted"] is False
    rows = k["rows"]
    assert [x["kernel"] for x in rows] == ["ssd_prefill"] * 3 + ["mixer_decode_step"] * 2 + KERNELS[2:]
    assert all(x["backend"] == "torch" and x["ms"] > 0 and x["gb_s"] > 0 for x in rows)
    assert rows[1]["case"] == "b1 L256" and rows[1]["flop"] == kb.ssd_flops(kb.SHAPES["tiny"], 1, 256)
    assert rows[1]["share_of_matmul"] == pytest.approx(rows[1]["tflop_s"] * 1e12 / env["matmul_flop_s"])
    assert rows[3]["share_of_copy"] == pytest.approx(rows[3]["gb_s"] * 1e9 / env["copy_bandwidth_bytes_s"])


def test_bench_markdown_prints_the_kernel_table():
    out = ok(mamba2(*BENCH, "--format", "md")).stdout.decode()
    assert "**kernels · one tiny layer: H 8 · P 16 · G 2 · N 16 · K 4 · chunk 32 · d_model 64 · float32 inputs" in out
    assert "| kernel | case | backend | time | TFLOP/s | of matmul | GB/s | of copy | err | note |" in out
    assert "| ssd_prefill | b1 L256 | torch |" in out and "| mixer_decode_step | b2 | torch |" in out
    assert "per layer, eager loop of 2 layers" in out
    assert "ceilings measured here: copy" in out and "float32 matmul 1024³" in out
    assert out.index("**mamba2 bench") < out.index("**kernels")


def test_bench_without_kernels_and_with_a_bad_shape():
    r = json.loads(ok(mamba2(*BENCH, "--no-kernels", "--json")).stdout)
    assert r["kernels"] is None and r["results"][0]["decode_tok_s"] > 0
    p = mamba2(*BENCH, "--kernel-shape", "huge")
    assert p.returncode == 2 and "'huge' is not one of" in no_traceback(p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_all_backends_on_the_gpu_side_by_side():
    args = [a for a in BENCH if a not in ("--backend", "torch", "--device", "cpu")]
    r = json.loads(ok(mamba2(*args, "--backend", "all", "--device", "cuda", "--json")).stdout)
    assert r["environment"]["matmul"] == "bfloat16 8192^3" and r["kernels"]["interpreted"] is False
    rows = r["kernels"]["rows"]
    assert [x["backend"] for x in rows] == ["torch", "triton"] * kb.case_count(kb.SHAPES["tiny"])
    steps = [x for x in rows if x["kernel"] == "mixer_decode_step"]
    assert steps and all("CUDA graph" in x["timing"] for x in steps)
    large = [x for x in steps if x["batch"] > 1]
    assert large and all(x["one_call_ms"] > 0 and x["one_call_state_share_of_copy"] > 0 for x in large)


def test_bench_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = mamba2("bench", "--backend", "triton", "--preset", "tiny", "--device", "cpu", env=env)
    assert p.returncode == 1 and "needs an NVIDIA GPU" in no_traceback(p)


def _bench_script():
    path = Path(__file__).parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_script", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    return mod


def test_the_kernel_script_imports_the_shared_harness():
    mod = _bench_script()
    assert mod.kb is kb and mod.time_ms is kb.time_ms
    assert mod.S is kb.SHAPES["codestral"]


def test_the_kernel_script_runs_under_the_interpreter_with_a_configuration_set(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs on CPU under Triton's interpreter")
    from mamba2_cli.kernels.triton import configs

    mod = _bench_script()
    monkeypatch.setitem(kb.SHAPES, "micro", MICRO)
    monkeypatch.setitem(configs.MATVEC, "rows1", dict(configs.MATVEC["rows1"]))  # --set changes it for the run
    assert mod.main(["--device", "cpu", "--shape", "micro", "--dtype", "float32", "--out", str(tmp_path),
                     "--set", "matvec.rows1.num_warps=2"]) == 0
    assert configs.MATVEC["rows1"]["num_warps"] == 2
    out = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert out["set"] == ["matvec.rows1.num_warps=2"] and out["shape"]["name"] == "micro"
    sections = {r["section"] for r in out["rows"]}
    assert {"ceiling", "ssd_prefill", "mixer_decode_step", "matvec"} <= sections
    assert all(r["ms"] >= 0 for r in out["rows"])
    with pytest.raises(SystemExit, match="no such entry"):
        mod.set_config("matvec.rows3.num_warps=2")
