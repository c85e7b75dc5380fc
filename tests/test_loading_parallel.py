"""The threaded loader: the same tensors as reading one at a time, bounded bytes in flight,
errors from reader threads, where the time went."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import random_weights, tiny_shape, write_hf
from mamba2_cli import Mamba2Error
from mamba2_cli import checkpoint as ck
from mamba2_cli import timings

SRC = str(Path(__file__).parents[1] / "src")


def sequential_state_dict(d: Path, device, dtype) -> dict:
    """Each file read whole, each tensor placed in turn: what the threaded loader must equal."""
    cfg = ck.read_config(d)
    out = {}
    for path in ck.find_weight_files(d):
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
        else:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        for raw, t in tensors.items():
            name = ck.internal_name(raw)
            if cfg.tie_embeddings and name == "lm_head.weight":
                continue
            out[name] = ck.place(name, t, device, dtype)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["backbone.embeddings.weight"]
    return out


@pytest.mark.parametrize("fmt, shards, stored, dtype, tied", [
    ("hf", 1, torch.float32, torch.float32, False),
    ("hf", 3, torch.float16, torch.float32, False),
    ("hf", 4, torch.bfloat16, torch.bfloat16, True),
    ("hf", 2, torch.float32, torch.float16, True),
    ("mistral", 1, None, torch.bfloat16, False),
    ("mamba_ssm", 1, None, torch.float32, True),
])
def test_threaded_load_equals_reading_one_tensor_at_a_time(make_checkpoint, fmt, shards, stored, dtype, tied):
    kw = dict(shards=shards, dtype=stored) if fmt == "hf" else {}
    d, _, _ = make_checkpoint(fmt, shape=tiny_shape(tie_embeddings=tied, n_layer=3), **kw)
    model = ck.load_checkpoint(d, torch.device("cpu"), dtype)
    want = sequential_state_dict(d, torch.device("cpu"), dtype)
    got = model.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].stride() == t.stride(), name
        assert torch.equal(got[name], t), name
    if tied:
        assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stored, dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_threaded_load_to_the_gpu_equals_reading_one_tensor_at_a_time(make_checkpoint, stored, dtype):
    d, _, _ = make_checkpoint("hf", shape=tiny_shape(n_layer=3), shards=3, dtype=stored)
    model = ck.load_checkpoint(d, torch.device("cuda"), dtype)
    want = sequential_state_dict(d, torch.device("cuda"), dtype)
    got = model.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].device == t.device and got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name


def test_bytes_in_flight_stay_under_the_cap(tmp_path, monkeypatch):
    shape = tiny_shape(n_layer=4, d_model=64)
    write_hf(tmp_path, shape, random_weights(shape), shards=3)
    budgets = []

    class Recording(ck.InflightBudget):
        def __init__(self, cap):
            super().__init__(cap)
            budgets.append(self)

    monkeypatch.setattr(ck, "InflightBudget", Recording)
    monkeypatch.setattr(ck, "CPU_READERS", 4)  # readers race ahead of the placer as far as the cap lets them
    ck.load_checkpoint(tmp_path, torch.device("cpu"), torch.float32)
    (budget,) = budgets
    largest = max(t.nbytes for f in ck.find_weight_files(tmp_path) for t in load_file(str(f)).values())
    # On CPU the cap is the largest tensor: never more in flight than reading one at a time.
    assert budget.cap == largest
    assert 0 < budget.peak <= budget.cap
    assert budget.used == 0


def test_the_budget_lets_a_tensor_larger_than_the_cap_go_alone():
    import threading

    b = ck.InflightBudget(100)
    assert b.acquire(60) and b.peak == 60
    got = []
    t = threading.Thread(target=lambda: got.append(b.acquire(300)))
    t.start()
    t.join(0.2)
    assert t.is_alive()  # waits until nothing else is in flight
    b.release(60)
    t.join(5)
    assert got == [True] and b.used == 300 and b.peak == 300
    b.release(300)
    b.stop()
    assert b.acquire(1) is False


def test_pinned_blocks_are_counted_as_the_host_allocator_rounds_them():
    assert [ck._pinned_block(n) for n in (1, 2, 3, 4096, 4097, 268_435_456, 268_435_457)] == [
        1, 2, 4, 4096, 8192, 268_435_456, 536_870_912]


def test_a_read_error_in_a_reader_thread_is_raised_and_the_readers_end(make_checkpoint, monkeypatch):
    import threading

    d, _, _ = make_checkpoint("hf", shards=2)
    real = ck._read_safetensors

    def failing(f, path, raw):
        if raw == "backbone.layers.1.mixer.in_proj.weight":
            raise Mamba2Error(f"{path}: cannot read tensor {raw!r} (gone)")
        return real(f, path, raw)

    monkeypatch.setattr(ck, "_read_safetensors", failing)
    monkeypatch.setattr(ck, "CPU_READERS", 3)
    before = threading.active_count()
    with pytest.raises(Mamba2Error, match="cannot read tensor 'backbone.layers.1.mixer.in_proj.weight'"):
        ck.load_checkpoint(d, torch.device("cpu"), torch.float32)
    assert threading.active_count() == before


def test_a_tensor_in_two_shards_is_refused(make_checkpoint):
    from safetensors.torch import save_file

    d, _, _ = make_checkpoint("hf", shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))
    a, b = load_file(str(d / first)), load_file(str(d / second))
    name = next(iter(a))
    b[name] = a[name]
    save_file(b, str(d / second))
    with pytest.raises(Mamba2Error, match=f"tensor '{name}' is also in {first}"):
        ck.load_checkpoint(d, torch.device("cpu"), torch.float32)


def test_a_misshaped_tensor_is_refused_before_any_tensor_is_read(make_checkpoint, monkeypatch):
    from safetensors.torch import save_file

    d, _, _ = make_checkpoint("hf", shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    tensors = load_file(str(d / last))
    name = sorted(tensors)[-1]
    tensors[name] = torch.zeros(7, 3)
    save_file(tensors, str(d / last))
    reads = []
    monkeypatch.setattr(ck, "_read_safetensors", lambda f, path, raw: reads.append(raw))
    with pytest.raises(Mamba2Error, match=f"tensor '{name}' has shape \\[7, 3\\]"):
        ck.load_checkpoint(d, torch.device("cpu"), torch.float32)
    assert reads == []


def test_load_times_add_up(make_checkpoint):
    d, _, _ = make_checkpoint("hf", shards=2)
    model = ck.load_checkpoint(d, torch.device("cpu"), torch.float32)
    t = model.load_times
    assert t.read_s >= 0 and t.place_s > 0 and t.setup_s >= 0


def test_building_the_model_imports_no_compiler():
    # nn.Embedding's own init on the meta device imported torch._dynamo: seconds at the
    # first load of a process, for values the checkpoint overwrites.
    code = ("import sys, torch; from mamba2_cli.checkpoint import build_meta_model; "
            "from mamba2_cli.config import preset_config; build_meta_model(preset_config('mamba2-130m')); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False"


def test_run_json_and_verbose_split_the_load(make_checkpoint):
    d, _, _ = make_checkpoint("hf", shards=2)
    cmd = [sys.executable, "-m", "mamba2_cli", "run", "-m", str(d), "-n", "2", "--device", "cpu", "hello"]
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=env, check=True)
    stats = json.loads(out.stdout)["stats"]
    for key in ("load_read_s", "load_place_s", "load_setup_s", "graph_capture_s", "compile_s"):
        assert isinstance(stats[key], float) and stats[key] >= 0, key
    assert stats["load_read_s"] + stats["load_place_s"] + stats["load_setup_s"] <= stats["load_s"]
    assert stats["graph_capture_s"] == stats["compile_s"] == 0.0  # CPU: nothing captured or compiled
    err = subprocess.run(cmd + ["-v"], capture_output=True, text=True, env=env, check=True).stderr
    assert " read " in err and " place " in err and " graph capture " in err and " compile " in err


def test_the_compile_notice_looks_for_our_kernels_in_tritons_cache(tmp_path):
    names = timings.kernel_names()
    assert "_mixer_step_kernel" in names and len(names) > 5
    assert not timings.cache_has_our_kernels(str(tmp_path / "missing"))
    (tmp_path / "abc").mkdir()
    (tmp_path / "abc" / "someone_elses_kernel.json").write_text("{}")
    assert not timings.cache_has_our_kernels(str(tmp_path))
    (tmp_path / "def").mkdir()
    (tmp_path / "def" / "_mixer_step_kernel.json").write_text("{}")
    assert timings.cache_has_our_kernels(str(tmp_path))


def test_phase_counts_capture_without_the_compiles_inside_it(monkeypatch):
    import time

    monkeypatch.setattr(timings, "_totals", {"graph_capture": 0.0, "compile": 0.0})
    with timings.phase("graph_capture"):
        time.sleep(0.05)
        timings._before_compile()  # a compile inside the capture, as Triton's hooks time it
        time.sleep(0.5)
        timings._after_compile()
    work = timings.first_token_work()
    assert work["compile_s"] >= 0.5
    assert 0.05 <= work["graph_capture_s"] < 0.5


def test_a_cpu_load_places_on_the_cores_the_reader_leaves_and_restores_threads(make_checkpoint, monkeypatch):
    d, _, _ = make_checkpoint("hf", shards=2)
    before = torch.get_num_threads()
    seen = []
    real_place = ck.place

    def recording(*a):
        seen.append(torch.get_num_threads())
        return real_place(*a)

    monkeypatch.setattr(ck, "place", recording)
    monkeypatch.setattr(ck, "free_cores_now", lambda cores: 3)
    try:
        torch.set_num_threads(4)
        ck.load_checkpoint(d, torch.device("cpu"), torch.float32)
        assert set(seen) == {3 - ck.CPU_READERS}
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
