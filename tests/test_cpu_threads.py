"""The default CPU thread count: one thread for a small model's decode step, the cores other
processes leave free for everything else."""

import pytest
import torch

from mamba2_cli import cpu_threads
from mamba2_cli.checkpoint import random_model
from mamba2_cli.config import preset_config


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def fake_clock(monkeypatch, others_busy_cores: float):
    """/proc/stat and this process's CPU time as if other processes kept `others_busy_cores` busy."""
    now = {"t": 100.0}
    monkeypatch.setattr(cpu_threads.time, "monotonic", lambda: now["t"])
    monkeypatch.setattr(cpu_threads, "_cpu_busy_s", lambda: now["t"] * (others_busy_cores + 0.5))
    monkeypatch.setattr(cpu_threads, "_own_cpu_s", lambda: now["t"] * 0.5)  # our own work is not "others"
    return now


@pytest.mark.parametrize("others, free", [(0.0, 4), (1.0, 3), (2.6, 1), (9.0, 1)])
def test_forwards_take_the_cores_other_processes_leave_free(monkeypatch, others, free):
    monkeypatch.setattr(cpu_threads, "free_cores_now", lambda cores: cores)
    now = fake_clock(monkeypatch, others)
    policy = cpu_threads.ThreadPolicy(weight_bytes=10 << 30, cores=4)
    now["t"] += 1.0
    assert policy.threads(1024) == free
    assert policy.threads(1) == free  # a large model's decode streams its weights on every free core


def test_a_small_models_decode_step_runs_on_one_thread(monkeypatch):
    monkeypatch.setattr(cpu_threads, "free_cores_now", lambda cores: cores)
    fake_clock(monkeypatch, 0.0)
    policy = cpu_threads.ThreadPolicy(weight_bytes=15 << 20, cores=2)
    assert policy.threads(1) == 1
    assert policy.threads(1024) == 2


def test_before_a_measurement_interval_the_running_count_decides(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open

    def fake_open(path, *a, **k):
        if path == "/proc/loadavg":
            path = tmp_path / "loadavg"
            path.write_text("9.0 8.0 7.0 3/500 1234\n")  # ourselves and two others running
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert cpu_threads.free_cores_now(2) == 1
    assert cpu_threads.free_cores_now(8) == 6


def test_the_model_applies_its_policy_per_forward(monkeypatch, restore_threads):
    monkeypatch.setattr(cpu_threads, "free_cores_now", lambda cores: cores)
    fake_clock(monkeypatch, 0.0)
    m = random_model(preset_config("tiny"), torch.device("cpu"), torch.float32)
    m.set_backend("torch")
    m.cpu_threads = cpu_threads.ThreadPolicy(weight_bytes=1 << 20, cores=2)
    state = m.new_state(1)
    with torch.inference_mode():
        m(torch.zeros(1, 8, dtype=torch.long), state)
        assert torch.get_num_threads() == 2
        m(torch.zeros(1, 1, dtype=torch.long), state)
        assert torch.get_num_threads() == 1


def test_the_cli_chooses_threads_unless_told(restore_threads):
    from mamba2_cli.cli.options import load

    auto = load(None, "tiny", False, "cpu", "float32", "torch", None, quiet=True).model
    assert isinstance(auto.cpu_threads, cpu_threads.ThreadPolicy) and auto.cpu_threads.small
    told = load(None, "tiny", False, "cpu", "float32", "torch", 3, quiet=True).model
    assert told.cpu_threads is None and torch.get_num_threads() == 3
