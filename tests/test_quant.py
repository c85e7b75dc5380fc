"""Quantized weights (quant.py): the schemes' arithmetic, load-time quantization, quantized
checkpoints, their errors, state files, the torch backend, and quality on the built-in model."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mamba2_cli import quant
from mamba2_cli.errors import Mamba2Error
from mamba2_cli.kernels import pytorch as torch_backend
from mamba2_cli.linear import Int4Linear, Int8Linear
from mamba2_cli.loader import load_model

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200"}


def mamba2(*args):
    return subprocess.run([sys.executable, "-m", "mamba2_cli", *args], capture_output=True, env=ENV, timeout=300)


def one_line_error(p, *words):
    err = p.stderr.decode().strip()
    assert p.returncode == 1 and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


# ---------------------------------------------------------------------------------------
# Arithmetic


def test_int8_round_trip_and_scale_per_channel():
    w = torch.randn(7, 50) * torch.logspace(-3, 1, 7)[:, None]
    q, s = quant.quantize_int8(w, torch.float32)
    assert q.dtype == torch.int8 and s.shape == (7,) and q.abs().max() == 127
    err = (quant.dequantize_int8(q, s, torch.float32) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()  # half a step of each row's own scale


def test_int4_packing_two_to_a_byte_low_nibble_first():
    w = torch.tensor([[1.0, -7.0, 7.0, 0.0] + [0.0] * 28])
    q, s = quant.quantize_int4(w, 32, torch.float32)
    assert q.dtype == torch.uint8 and q.shape == (1, 16) and s.shape == (1, 1) and s.item() == 1.0
    assert q[0, 0].item() == (1 + 8) | ((-7 + 8) << 4) and q[0, 1].item() == (7 + 8) | (8 << 4)
    assert torch.equal(quant.dequantize_int4(q, s, torch.float32), w)


def test_int4_groups_scale_separately():
    w = torch.randn(5, 96)
    w[:, 32:64] *= 100
    q, s = quant.quantize_int4(w, 32, torch.float32)
    err = (quant.dequantize_int4(q, s, torch.float32) - w).abs().view(5, 3, 32)
    assert (err <= s[:, :, None] / 2 + 1e-6).all()


def test_group_size_is_the_largest_that_divides():
    from mamba2_cli.config import Mamba2Config

    cfg = Mamba2Config(d_model=288, n_layer=1, vocab_size=10)  # tiny-code's widths: 288 and 576
    assert quant.spec_for(cfg, "int4").group_size == {"in_proj": 32, "out_proj": 64, "lm_head": 32}
    assert quant.group_size_for(4096) == 128
    with pytest.raises(Mamba2Error, match="no group size"):
        quant.group_size_for(200)
    with pytest.raises(Mamba2Error, match="does not divide"):
        quant.quantize_int4(torch.zeros(2, 96), 64, torch.float32)
    with pytest.raises(Mamba2Error, match="unknown quantization 'int3'"):
        quant.spec_for(cfg, "int3")


def test_rows_are_views_of_the_same_quantization():
    lin = Int4Linear.from_weight(torch.randn(10, 64), torch.randn(10), 32)
    part = lin.rows(3, 8)
    assert torch.equal(part.dequantize(torch.float32), lin.dequantize(torch.float32)[3:8])
    assert part.qweight.data_ptr() == lin.qweight[3].data_ptr()


def test_torch_backend_int8_matches_dequantized_reference(monkeypatch):
    # K 96: PyTorch's int8 op, which rounds x and its sums to bf16 (about 2^-9 each); K 70
    # and float64: the dequantizing path, exact to x's dtype.
    op = torch.ops.aten._weight_int8pack_mm
    calls = []
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda *a: calls.append(1) or op(*a))
    for dtype, K, most, packed in ((torch.float32, 96, 4e-3, True), (torch.bfloat16, 96, 1e-2, True),
                                   (torch.float32, 70, 1e-5, False), (torch.bfloat16, 70, 1e-2, False),
                                   (torch.float64, 96, 1e-12, False)):
        calls.clear()
        lin = Int8Linear.from_weight(torch.randn(33, K), torch.randn(33).to(dtype), 0, dtype)
        x = torch.randn(3, 1, K).to(dtype)
        ref = x.double() @ lin.dequantize(torch.float64).t() + lin.bias.double()
        y = torch_backend.linear(x, lin)
        assert y.dtype == dtype and y.shape == (3, 1, 33) and bool(calls) == packed, (dtype, K)
        assert ((y.double() - ref).norm() / ref.norm()).item() < most, (dtype, K)


# ---------------------------------------------------------------------------------------
# Loading and checkpoints


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-code", "cpu", "float32", "torch")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_load_time_quantization_equals_quantizing_the_loaded_model(tiny, scheme):
    m, _ = load_model("tiny-code", "cpu", "float32", "torch", quant=scheme)
    assert m.quant.scheme == scheme and type(m.lm_head).__name__ == f"Int{scheme[3]}Linear"
    ref = quant.quantize_model(load_model("tiny-code", "cpu", "float32", "torch")[0], scheme)
    sd, ref_sd = m.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and "backbone.layers.0.mixer.in_proj.qweight" in sd
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    # Everything but the projections is as loaded.
    for k, v in tiny[0].state_dict().items():
        if not k.endswith(("in_proj.weight", "out_proj.weight", "lm_head.weight")):
            assert torch.equal(sd[k], v), k


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-int4"
    p = mamba2("quantize", "tiny-code", "--to", "int4", "-o", str(out), "--device", "cpu")
    assert p.returncode == 0, p.stderr.decode()
    return out


def test_quantized_checkpoint_loads_as_written(int4_dir):
    cfg = json.loads((int4_dir / "config.json").read_text())
    assert cfg["quantization"] == {"scheme": "int4", "format_version": 1,
                                   "group_size": {"in_proj": 32, "out_proj": 64, "lm_head": 32}}
    m, tok = load_model(str(int4_dir), "cpu", "float32", "torch")
    # Written as stored (fp16 scales): the same tensors as quantizing at load time in fp16.
    ref, _ = load_model("tiny-code", "cpu", "float16", "torch", quant="int4")
    sd, ref_sd = m.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    assert all(torch.equal(sd[k], ref_sd[k].to(sd[k].dtype)) for k in sd)
    ids = torch.tensor([tok.encode("def f(x):\n    return", add_bos=True)])
    assert m(ids, m.new_state(1)).isfinite().all()
    files = sorted(p.name for p in int4_dir.iterdir())
    assert "tokenizer.json" in files and "model.safetensors" in files
    src = ROOT / "src" / "mamba2_cli" / "assets" / "tiny-code" / "model.safetensors"
    assert (int4_dir / "model.safetensors").stat().st_size < 0.5 * src.stat().st_size


def test_info_shows_the_scheme_and_memory(int4_dir):
    p = mamba2("info", str(int4_dir), "--json")
    d = json.loads(p.stdout)
    assert d["quantization"]["scheme"] == "int4" and d["stored_dtype"] == "float16"
    assert d["memory"]["weights"] < 0.6 * d["parameters"] * 2
    text = mamba2("info", str(int4_dir)).stdout.decode()
    assert "quantization  int4" in text


def test_run_loads_a_quantized_checkpoint_and_refuses_quant_again(int4_dir):
    p = mamba2("run", "-m", str(int4_dir), "-n", "4", "-q", "--device", "cpu", "def f():")
    assert p.returncode == 0, p.stderr.decode()
    one_line_error(mamba2("run", "-m", str(int4_dir), "--quant", "int4", "-n", "1", "x"),
                   "already quantized", "drop --quant")
    one_line_error(mamba2("run", "-m", str(int4_dir), "--quant", "int8", "-n", "1", "x"), "already quantized (int4)")


def _broken_copy(src: Path, dst: Path, tensors=None, config=None) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(src / "model.safetensors"))
    save_file(tensors(sd) if tensors else sd, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    return dst


def test_bad_quantized_checkpoints_are_one_line_errors(int4_dir, tmp_path):
    name = "backbone.layers.1.mixer.out_proj.scales"

    def drop(sd):
        del sd[name]
        return sd

    def reshape(sd):
        sd[name] = sd[name][:, :-1].contiguous()
        return sd

    def group(cfg):
        cfg["quantization"]["group_size"]["out_proj"] = 128
        return cfg

    def scheme(cfg):
        cfg["quantization"]["scheme"] = "nf3"
        return cfg

    cases = [(dict(tensors=drop), ("missing tensor", name)), (dict(tensors=reshape), (name, "shape")),
             (dict(config=group), ("group_size 128 of out_proj does not divide", "576")),
             (dict(config=scheme), ("'nf3' is not one this build knows",))]
    for i, (how, words) in enumerate(cases):
        d = _broken_copy(int4_dir, tmp_path / f"bad{i}", **how)
        one_line_error(mamba2("run", "-m", str(d), "-n", "1", "--device", "cpu", "x"), *words)


def test_unknown_quant_option_is_a_usage_error():
    p = mamba2("run", "--quant", "int3", "-n", "1", "x")
    assert p.returncode == 2 and "int3" in p.stderr.decode()


def test_state_of_int4_weights_is_refused_by_the_plain_model(int4_dir, tmp_path):
    state = tmp_path / "s.m2s"
    p = mamba2("run", "-m", str(int4_dir), "-n", "2", "-q", "--device", "cpu", "--save-state", str(state), "def f():")
    assert p.returncode == 0, p.stderr.decode()
    err = one_line_error(mamba2("run", "-m", "tiny-code", "--dtype", "float16", "-n", "1", "-q", "--device", "cpu",
                                "--load-state", str(state), "x"), "int4 weights", "--quant int4")
    assert "float16 weights" in err


# ---------------------------------------------------------------------------------------
# Quality on the built-in model (scripts/eval_tiny.py has the full figures)


def _heldout_text(limit=6000) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = (ROOT / "scripts" / "tiny_data" / "heldout.txt").read_text().split()
    texts = [(stdlib / n).read_text(encoding="utf-8", errors="replace")[:limit]
             for n in names if (stdlib / n).is_file()]
    if not texts:
        pytest.skip("no held-out module in this Python's standard library")
    return "".join(texts[:2])


def test_quantized_bits_per_byte_close_to_full_precision(tiny):
    from mamba2_cli.evaluate import score_text

    text = _heldout_text()
    base = score_text(tiny[0], tiny[1], text, piece=512)["bits_per_byte"]
    for scheme, most in (("int8", 0.01), ("int4", 0.04)):
        m, _ = load_model("tiny-code", "cpu", "float32", "torch", quant=scheme)
        bpb = score_text(m, tiny[1], text, piece=512)["bits_per_byte"]
        assert bpb <= base * (1 + most), (scheme, bpb, base)


def test_eval_pieces_carry_the_state(tiny):
    from mamba2_cli.evaluate import score_text

    text = _heldout_text(1500)
    whole, pieces = score_text(*tiny, text, piece=100000), score_text(*tiny, text, piece=97)
    assert abs(whole["nats"] - pieces["nats"]) < 1e-3 * whole["nats"] and whole["tokens"] == pieces["tokens"]


def test_int8_greedy_tokens_agree(tiny):
    """On the full-precision model's greedy continuation of held-out code, the int8 model's
    greedy choice at each position is the same token for at least 90 % of positions."""
    from mamba2_cli.evaluate import greedy_agreement

    m8, _ = load_model("tiny-code", "cpu", "float32", "torch", quant="int8")
    assert greedy_agreement(tiny[0], m8, tiny[1], [_heldout_text(400)], 64) >= 0.9


def test_eval_command(tmp_path):
    f = tmp_path / "t.py"
    f.write_text(_heldout_text(800))
    p = mamba2("eval", "tiny-code", str(f), "--quant", "int8", "--device", "cpu", "--json")
    assert p.returncode == 0, p.stderr.decode()
    d = json.loads(p.stdout)
    assert d["quant"] == "int8" and 0 < d["bits_per_byte"] < 8 and d["tokens"] > 100
    (tmp_path / "empty.txt").write_text("")
    one_line_error(mamba2("eval", "tiny-code", str(tmp_path / "empty.txt"), "--device", "cpu"), "empty")
