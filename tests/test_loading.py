"""Loading checkpoints: every tensor checked, clear errors, bounded host memory, tokenizer ids."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import random_weights, tiny_shape, write_hf
from mamba2_cli import Mamba2Error, load_model
from mamba2_cli import checkpoint as ck
from mamba2_cli.config import preset_config

SRC = str(Path(__file__).parents[1] / "src")


def rewrite_weights(d: Path, edit):
    path = d / "model.safetensors"
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path))


def test_missing_tensor_is_named(make_checkpoint):
    d, _, _ = make_checkpoint("hf")
    rewrite_weights(d, lambda sd: sd.pop("backbone.layers.1.mixer.dt_bias"))
    with pytest.raises(Mamba2Error, match=r"missing tensor 'backbone.layers.1.mixer.dt_bias'.*\[8\]"):
        load_model(str(d), device="cpu")


def test_unexpected_tensor_is_named(make_checkpoint):
    d, _, _ = make_checkpoint("hf")
    rewrite_weights(d, lambda sd: sd.update({"backbone.layers.0.mixer.extra": torch.zeros(3)}))
    with pytest.raises(Mamba2Error, match="unexpected tensor 'backbone.layers.0.mixer.extra'"):
        load_model(str(d), device="cpu")


def test_misshaped_tensor_gives_both_shapes(make_checkpoint):
    d, _, _ = make_checkpoint("hf")
    rewrite_weights(d, lambda sd: sd.update({"backbone.layers.0.mixer.A_log": torch.zeros(5)}))
    with pytest.raises(Mamba2Error, match=r"'backbone.layers.0.mixer.A_log' has shape \[5\], the config needs \[8\]"):
        load_model(str(d), device="cpu")


def _header(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "truncated"), ("garbage", "bad header length"), ("empty", "bad header length"),
    # A length beyond the file (or beyond any sane header) is refused before anything is allocated.
    ("claims a huge header", "bad header length"), ("claims more than the file", "bad header length"),
    ("json", "unreadable header"), ("not an object", "header is not an object"),
    ("unknown dtype", "unsupported or malformed entry"), ("malformed entry", "unsupported or malformed entry"),
    ("offsets disagree with the shape", "truncated"),
])
def test_corrupt_safetensors_is_a_clear_error(make_checkpoint, damage, reason):
    d, _, _ = make_checkpoint("hf")
    path = d / "model.safetensors"
    data = path.read_bytes()
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    path.write_bytes({
        "truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 100, "empty": b"",
        "claims a huge header": (2**62).to_bytes(8, "little") + b"{}",
        "claims more than the file": (90_000_000).to_bytes(8, "little") + b"{}" + b" " * 100,
        "json": (5).to_bytes(8, "little") + b"{nope",
        "not an object": (2).to_bytes(8, "little") + b"[]",
        "unknown dtype": _header({"x": {**entry, "dtype": "Q9"}}, bytes(8)),
        "malformed entry": _header({"x": 5}, bytes(8)),
        "offsets disagree with the shape": _header({"x": {**entry, "shape": [3]}}, bytes(8)),
    }[damage])
    with pytest.raises(Mamba2Error, match=f"model.safetensors: not a valid safetensors file .*{reason}") as e:
        load_model(str(d), device="cpu")
    assert "\n" not in str(e.value)


def test_a_dtype_the_loader_does_not_convert_is_named(make_checkpoint):
    d, _, _ = make_checkpoint("hf")
    rewrite_weights(d, lambda sd: sd.update({"backbone.norm_f.weight": sd["backbone.norm_f.weight"].to(torch.float8_e4m3fn)}))
    with pytest.raises(Mamba2Error, match="tensor 'backbone.norm_f.weight' has an unsupported dtype F8_E4M3"):
        load_model(str(d), device="cpu")


def test_stored_dtypes_counts_bytes_from_the_header(tmp_path):
    from mamba2_cli.info import stored_dtypes

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(3, 4, dtype=torch.float16), "b": torch.zeros(5), "c": torch.zeros(7, dtype=torch.bfloat16)},
              str(path))
    assert stored_dtypes([path]) == {"float16": 24, "float32": 20, "bfloat16": 14}
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(Mamba2Error, match=r"model.safetensors: not a valid safetensors file \(.*truncated"):
        stored_dtypes([path])


def test_pickled_code_is_refused(make_checkpoint):
    d, _, _ = make_checkpoint("mamba_ssm")

    class Evil:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    torch.save({"backbone.embedding.weight": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(Mamba2Error, match="weights-only"):
        load_model(str(d), device="cpu")


def test_weights_land_in_the_requested_dtype_with_fp32_ssm_params(make_checkpoint):
    d, _, _ = make_checkpoint("mistral")
    model, _ = load_model(str(d), device="cpu", dtype="bfloat16")
    mixer = model.backbone.layers[0].mixer
    assert model.backbone.embeddings.weight.dtype == torch.bfloat16
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == torch.float32
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_are_the_stored_values_with_cpu_projections_input_major(tmp_path, dtype):
    shape = tiny_shape()
    sd = random_weights(shape)
    write_hf(tmp_path, shape, sd, dtype=torch.float16)
    model = ck.load_checkpoint(tmp_path, torch.device("cpu"), dtype)
    for name, p in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        want = sd[name].to(torch.float16).to(torch.float32 if leaf in ck.FP32_PARAMS else dtype)
        assert p.dtype == want.dtype and torch.equal(p, want), name
        if name.endswith(("proj.weight", "lm_head.weight", "embeddings.weight")):
            assert p.stride() == (1, p.shape[0]), name
        else:
            assert p.is_contiguous(), name


def test_tied_embeddings_share_storage(make_checkpoint):
    d, _, _ = make_checkpoint("hf", shape=tiny_shape(tie_embeddings=True))
    model, _ = load_model(str(d), device="cpu")
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()


def test_not_enough_memory_gives_both_numbers(monkeypatch):
    monkeypatch.setattr(ck, "available_memory", lambda device: 2_000_000_000)
    cfg = preset_config("codestral-7b")
    with pytest.raises(Mamba2Error, match=r"needs 14\.\d\d GB .* 2\.00 GB available"):
        ck.resolve_dtype("bfloat16", cfg, torch.device("cpu"))


def test_auto_dtype_on_cpu_is_fp32_when_it_fits_else_bf16(monkeypatch):
    cfg = preset_config("codestral-7b")
    monkeypatch.setattr(ck, "available_memory", lambda device: 64_000_000_000)
    assert ck.resolve_dtype("auto", cfg, torch.device("cpu")) == torch.float32
    monkeypatch.setattr(ck, "available_memory", lambda device: 20_000_000_000)
    assert ck.resolve_dtype("auto", cfg, torch.device("cpu")) == torch.bfloat16


def test_special_ids_come_from_tokenizer_files_not_config(make_checkpoint):
    d, _, _ = make_checkpoint("hf")  # config.json says bos = eos = pad = 0
    _, tok = load_model(str(d), device="cpu")
    assert (tok.bos_id, tok.eos_ids) == (1, {2})
    assert tok.encode("def")[0] == 1


def test_add_bos_token_false_is_honoured(make_checkpoint):
    d, _, _ = make_checkpoint("hf")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, tok = load_model(str(d), device="cpu")
    assert 1 not in tok.encode("def fibonacci")


def test_sentencepiece_tokenizer_gets_one_bos(make_checkpoint, mistral_tokenizer_dir):
    d, _, _ = make_checkpoint("mistral", shape=tiny_shape(vocab_size=32768), tokenizer_dir=mistral_tokenizer_dir)
    _, tok = load_model(str(d), device="cpu")
    ids = tok.encode("def f():")
    assert ids[0] == 1 and ids[1] != 1 and tok.eos_ids == {2}


def test_missing_directory_and_files(tmp_path, make_checkpoint):
    with pytest.raises(Mamba2Error, match="no such model directory"):
        load_model(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(Mamba2Error, match="no config.json"):
        load_model(str(tmp_path), device="cpu")
    d, _, _ = make_checkpoint("hf")
    (d / "tokenizer.json").unlink()
    with pytest.raises(Mamba2Error, match="no tokenizer.json"):
        load_model(str(d), device="cpu")
    d, _, _ = make_checkpoint("hf")
    (d / "model.safetensors").unlink()
    with pytest.raises(Mamba2Error, match="no weights found"):
        load_model(str(d), device="cpu")


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from mamba2_cli import load_model
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    load_model(sys.argv[1], device="cpu", dtype=sys.argv[3])  # warm-up: code pages, allocator
    base = rss()
    model, _ = load_model(sys.argv[2], device="cpu", dtype=sys.argv[3])
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
""")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    shape = tiny_shape(d_model=1024, n_layer=6, vocab_size=16384, headdim=64, d_state=128, ngroups=1, chunk_size=64)
    write_hf(d, shape, random_weights(shape))
    return d


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_host_memory_while_loading_stays_under_1_5x_the_weight_file(make_checkpoint, big_checkpoint, bpe_tokenizer_dir, dtype):
    import shutil

    for f in bpe_tokenizer_dir.iterdir():
        shutil.copy(f, big_checkpoint / f.name)
    small, _, _ = make_checkpoint("hf")
    size = (big_checkpoint / "model.safetensors").stat().st_size
    assert size > 250e6
    # A process forked from this (large) one inherits its RSS high-water mark into ru_maxrss
    # across exec; a small intermediate Python gives the measuring process a clean count.
    launcher = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", launcher, sys.executable, "-c", RSS_SCRIPT, str(small),
                          str(big_checkpoint), dtype],
                         capture_output=True, text=True, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, check=True)
    growth = int(out.stdout.strip())
    assert growth < 1.5 * size, f"peak grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


def test_a_transposed_tensor_of_the_right_size_gives_both_shapes(make_checkpoint):
    d, _, _ = make_checkpoint("hf")
    name = "backbone.layers.0.mixer.in_proj.weight"
    rewrite_weights(d, lambda sd: sd.update({name: sd[name].t().contiguous()}))
    with pytest.raises(Mamba2Error, match=rf"tensor '{name}' has shape \[32, 200\], the config needs \[200, 32\]"):
        ck.load_checkpoint(d, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("damage, entry, reason", [
    ("negative dimension", {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]},
     "malformed entry: invalid value: integer `-2`, expected a non-negative integer"),
    ("negative offset", {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
     "malformed entry: invalid value: integer `-8`, expected a non-negative integer"),
    ("fractional dimension", {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]},
     "malformed entry: invalid type: floating point `2.5`"),
    ("entry is a list", [1, 2], "malformed entry: invalid type"),
    ("no data_offsets", {"dtype": "F32", "shape": [2]}, "malformed entry: missing field `data_offsets`"),
    ("one offset", {"dtype": "F32", "shape": [2], "data_offsets": [0]}, "malformed entry: invalid length 1"),
    ("unknown dtype", {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}, "malformed entry: unknown dtype Q9"),
])
def test_a_malformed_safetensors_entry_says_what_is_wrong(make_checkpoint, damage, entry, reason):
    d, _, _ = make_checkpoint("hf")
    (d / "model.safetensors").write_bytes(_header({"x": entry}, bytes(8)))
    with pytest.raises(Mamba2Error, match=f"model.safetensors: not a valid safetensors file .*{reason}") as e:
        ck.load_checkpoint(d, torch.device("cpu"), torch.float32)
    assert "\n" not in str(e.value) and " at line " not in str(e.value)


def test_a_deeply_nested_safetensors_header_is_named(make_checkpoint):
    d, _, _ = make_checkpoint("hf")
    text = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (d / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text)
    with pytest.raises(Mamba2Error, match=r"not a valid safetensors file \(header nested too deeply\)"):
        ck.load_checkpoint(d, torch.device("cpu"), torch.float32)


def shard_checkpoint(make_checkpoint, tmp_path) -> tuple[Path, dict]:
    """A two-shard checkpoint beside a one-file copy of the same weights in ../sibling."""
    d, shape, sd = make_checkpoint("hf", shards=2)
    write_hf(tmp_path / "sibling", shape, sd)
    return d, json.loads((d / "model.safetensors.index.json").read_text())


def point_shards_at(d: Path, index: dict, name) -> None:
    index["weight_map"] = {k: name for k in index["weight_map"]}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("shard", [
    "../sibling/model.safetensors", "ABSOLUTE", "../../etc/passwd", "/etc/passwd", "a/../../sibling/model.safetensors",
    "..\\sibling\\model.safetensors", "model-00001-of-00002.safetensors\0", "", ".", 5, None,
])
def test_shards_must_lie_inside_the_model_directory(make_checkpoint, tmp_path, monkeypatch, shard):
    d, index = shard_checkpoint(make_checkpoint, tmp_path)
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "sibling" / "model.safetensors")
    point_shards_at(d, index, shard)
    opened = []
    monkeypatch.setattr(ck, "safe_open", lambda *a, **k: opened.append(a) or pytest.fail(f"opened {a}"))
    with pytest.raises(Mamba2Error, match=r"model\.safetensors\.index\.json: shard .* is not a plain relative path") as e:
        ck.load_checkpoint(d, torch.device("cpu"), torch.float32)
    assert repr(shard) in str(e.value) and "\n" not in str(e.value) and not opened


def test_one_bad_shard_among_good_ones_is_refused_before_any_is_opened(make_checkpoint, tmp_path, monkeypatch):
    d, index = shard_checkpoint(make_checkpoint, tmp_path)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../sibling/model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    monkeypatch.setattr(ck, "safe_open", lambda *a, **k: pytest.fail(f"opened {a}"))
    with pytest.raises(Mamba2Error, match=r"shard '\.\./sibling/model\.safetensors' is not a plain relative path"):
        ck.find_weight_files(d)


def test_shards_in_a_subdirectory_and_symlinked_shards_load(make_checkpoint, tmp_path):
    """The hub cache's snapshots hold links into the repository's blobs: they are followed."""
    d, index = shard_checkpoint(make_checkpoint, tmp_path)
    want = ck.load_checkpoint(d, torch.device("cpu"), torch.float32).state_dict()
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (d / "parts").mkdir()
    for name in set(index["weight_map"].values()):
        (d / name).rename(blobs / name)
        (d / "parts" / name).symlink_to(Path("..") / ".." / "blobs" / name)
    index["weight_map"] = {k: f"parts/{v}" for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    got = ck.load_checkpoint(d, torch.device("cpu"), torch.float32).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("index", [{"weight_map": ["model-00001-of-00002.safetensors"]}, {"weight_map": "x"},
                                   {"weight_map": {"a": ["model.safetensors"]}}])
def test_a_malformed_index_is_a_clear_error(make_checkpoint, tmp_path, index):
    d, _ = shard_checkpoint(make_checkpoint, tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(Mamba2Error, match=r"model\.safetensors\.index\.json: "):
        ck.find_weight_files(d)


def test_a_deeply_nested_index_is_a_clear_error(make_checkpoint, tmp_path):
    d, _ = shard_checkpoint(make_checkpoint, tmp_path)
    (d / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(Mamba2Error, match=r"model\.safetensors\.index\.json: not a valid safetensors index"):
        ck.find_weight_files(d)


def test_a_legacy_pytorch_file_loads_weights_only(make_checkpoint):
    d, _, _ = make_checkpoint("mamba_ssm")
    # Copies: the loaded fp32 tensors map the file that is rewritten next.
    want = {k: v.clone() for k, v in ck.load_checkpoint(d, torch.device("cpu"), torch.float32).state_dict().items()}
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    (d / "pytorch_model.bin").unlink()
    torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    got = ck.load_checkpoint(d, torch.device("cpu"), torch.float32).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_legacy_pytorch_file_with_code_is_refused_in_one_line(make_checkpoint):
    d, _, _ = make_checkpoint("mamba_ssm")

    class Evil:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    for legacy in (False, True):
        torch.save({"backbone.embedding.weight": Evil()}, d / "pytorch_model.bin",
                   _use_new_zipfile_serialization=not legacy)
        with pytest.raises(Mamba2Error, match=r"pytorch_model\.bin: cannot load as a weights-only PyTorch file "
                                              r"\(Unsupported global: GLOBAL print") as e:
            ck.load_checkpoint(d, torch.device("cpu"), torch.float32)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("content, reason", [
    (b"", "ends early"), (b"\x80\x02garbage" * 10, "Unsupported operand"),
    (b"PK\x03\x04garbage" * 10, "failed finding central directory\\)$"),
])
def test_a_damaged_pytorch_file_is_one_line(make_checkpoint, content, reason):
    d, _, _ = make_checkpoint("mamba_ssm")
    (d / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(Mamba2Error, match=rf"pytorch_model\.bin: cannot load as a weights-only PyTorch file .*{reason}") as e:
        ck.load_checkpoint(d, torch.device("cpu"), torch.float32)
    assert "\n" not in str(e.value)


def test_a_pytorch_tensor_of_a_dtype_the_loader_does_not_convert_is_named(make_checkpoint):
    d, _, _ = make_checkpoint("mamba_ssm")
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd["backbone.layers.0.mixer.D"] = sd["backbone.layers.0.mixer.D"].to(torch.complex64)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(Mamba2Error, match="tensor 'backbone.layers.0.mixer.D' has an unsupported dtype complex64"):
        ck.load_checkpoint(d, torch.device("cpu"), torch.float32)


def _nest(text: str) -> str:
    return text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("damage, words", [
    ("n_groups 0", "config.json: n_groups must be a positive integer, got 0"),
    ("expand as a string", "config.json: expand must be a positive integer, got '2'"),
    ("deeply nested config", "config.json is not a config: its JSON is nested too deeply"),
    ("shard outside", "model.safetensors.index.json: shard '/etc/passwd' is not a plain relative path"),
    ("negative dimension", "model.safetensors: not a valid safetensors file (unsupported or malformed entry: "
                           "invalid value: integer `-2`, expected a non-negative integer)"),
])
def test_the_cli_reports_hostile_files_in_one_line(make_checkpoint, damage, words):
    d, _, _ = make_checkpoint("hf", shards=2 if damage == "shard outside" else 1)
    cfg = (d / "config.json").read_text()
    if damage == "n_groups 0":
        (d / "config.json").write_text(cfg.replace('"n_groups": 2', '"n_groups": 0'))
    elif damage == "expand as a string":
        (d / "config.json").write_text(cfg.replace('"expand": 2', '"expand": "2"'))
    elif damage == "deeply nested config":
        (d / "config.json").write_text(_nest(cfg))
    elif damage == "shard outside":
        point_shards_at(d, json.loads((d / "model.safetensors.index.json").read_text()), "/etc/passwd")
    else:
        (d / "model.safetensors").write_bytes(_header({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)))
    p = subprocess.run([sys.executable, "-m", "mamba2_cli", "run", "-m", str(d), "-n", "1", "--device", "cpu", "x"],
                       capture_output=True, text=True, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "COLUMNS": "60"},
                       timeout=120)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert words in p.stderr, p.stderr
