"""Conventions people type without reading: -h, --version, -p, --temp, flags without metavars,
and the sampling defaults of a model's generation_config.json."""

import json
import re
import shutil

import pytest

from test_cli import ENV, mamba2, ok


def test_short_help_version_and_flags_without_value_types():
    assert ok(mamba2("-h")).stdout == ok(mamba2("--help")).stdout
    for command in ("run", "chat", "bench", "info", "download", "models"):
        out = ok(mamba2(command, "-h")).stdout.decode()
        assert "<bool>" not in out, command
    run_help = ok(mamba2("run", "-h")).stdout.decode()
    assert "--temp " in run_help and "-p" in run_help and "generation_config.json" in run_help
    v = ok(mamba2("--version")).stdout.decode()
    assert re.search(r"mamba2 \d", v) and "torch " in v and "Triton " in v and "CUDA " in v and "GPU " in v
    assert ok(mamba2("version")).stdout.decode() == v


def test_every_bench_flag_has_help():
    out = ok(mamba2("bench", "-h", env={**ENV, "COLUMNS": "250"})).stdout.decode()
    for line in out.splitlines():
        m = re.match(r"│ (--[\w-]+)(?:\s+-\w)?\s+(<[^>]*>(?: \[[^\]]*\])?)?\s*(.*?)\s*│$", line)
        if m and m.group(1) != "--help":
            assert m.group(3) and not m.group(3).startswith("[default"), line


def test_temp_is_temperature_and_a_noisy_one_is_warned_about(model_dir):
    a = json.loads(ok(mamba2("run", "-m", str(model_dir), "-n", "8", "--json", "--temp", "0.9", "--seed", "4",
                             "x = 1")).stdout)
    b = json.loads(ok(mamba2("run", "-m", str(model_dir), "-n", "8", "--json", "-t", "0.9", "--seed", "4",
                             "x = 1")).stdout)
    assert a["token_ids"] == b["token_ids"]
    hot = ok(mamba2("run", "-m", str(model_dir), "-n", "2", "-q", "-t", "8", "x = 1"))
    assert b"temperature 8" in hot.stderr and b"--threads" in hot.stderr
    assert b"warning" not in ok(mamba2("run", "-m", str(model_dir), "-n", "2", "-q", "-t", "2", "x = 1")).stderr


def test_prompt_option(model_dir):
    a = ok(mamba2("run", "-m", str(model_dir), "-n", "6", "-q", "-p", "def f(x):")).stdout
    assert a and a == ok(mamba2("run", "-m", str(model_dir), "-n", "6", "-q", "def f(x):")).stdout
    both = mamba2("run", "-m", str(model_dir), "-p", "a", "b")
    assert both.returncode == 1 and b"not both" in both.stderr


def test_terminal_without_prompt_points_to_chat(model_dir):
    import os
    import pty
    import sys

    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-m", "mamba2_cli", "run", "-m", str(model_dir)], ENV)
    out = b""
    try:
        while chunk := os.read(fd, 1024):
            out += chunk
    except OSError:
        pass
    os.waitpid(pid, 0)
    assert b"mamba2 chat" in out


@pytest.fixture(scope="module")
def with_generation_config(model_dir, tmp_path_factory):
    def make(cfg: dict):
        d = tmp_path_factory.mktemp("gencfg")
        shutil.copytree(model_dir, d, dirs_exist_ok=True)
        (d / "generation_config.json").write_text(json.dumps(cfg))
        return d

    return make


def tokens(model_dir, *args):
    return json.loads(ok(mamba2("run", "-m", str(model_dir), "-n", "16", "--json", *args, "x = 1")).stdout)["token_ids"]


def test_generation_config_defaults_as_transformers_reads_them(model_dir, with_generation_config):
    sampled = with_generation_config({"do_sample": True, "temperature": 1.3, "top_p": 0.9, "top_k": 40,
                                      "repetition_penalty": 1.2})
    flags = ["-t", "1.3", "--top-p", "0.9", "--top-k", "40", "--repetition-penalty", "1.2"]
    assert tokens(sampled, "--seed", "5") == tokens(model_dir, *flags, "--seed", "5")
    assert tokens(sampled, "--seed", "5", "--top-k", "0") == tokens(model_dir, *flags[:4], *flags[6:], "--seed", "5")
    # A flag wins; -t 0 is greedy, the penalty still the model's.
    assert tokens(sampled, "-t", "0") == tokens(model_dir, "--repetition-penalty", "1.2")
    # do_sample false: greedy, and only the repetition penalty applies (transformers ignores the rest).
    greedy = with_generation_config({"do_sample": False, "temperature": 1.3, "repetition_penalty": 1.2})
    assert tokens(greedy) == tokens(model_dir, "--repetition-penalty", "1.2") != tokens(model_dir)
    p = mamba2("run", "-m", str(with_generation_config({"do_sample": True, "temperature": "hot"})), "x")
    assert p.returncode == 1 and b"temperature holds 'hot'" in p.stderr and b"Traceback" not in p.stderr


def test_the_builtin_model_samples_varied_code_by_default():
    def distinct_lines(*args):
        text = json.loads(ok(mamba2("run", "-n", "200", "--json", "--threads", "1", *args,
                                    "def fibonacci(n):")).stdout)["text"]
        lines = [line for line in text.splitlines() if line.strip()]
        return len(set(lines)) / len(lines)

    assert distinct_lines("-t", "0", "--repetition-penalty", "1") < 0.5  # plain greedy repeats one function
    assert min(distinct_lines("--seed", str(s)) for s in range(3)) > 0.8
