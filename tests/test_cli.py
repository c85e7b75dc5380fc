"""`mamba2` end to end, through a subprocess, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import tiny_shape

import mamba2_cli

# The subprocesses run the package this process imported: the source tree under
# PYTHONPATH=src, the installed wheel in CI.
ENV = {**os.environ, "PYTHONPATH": str(Path(mamba2_cli.__file__).parents[1]), "COLUMNS": "200"}
ENV.pop("CUDA_VISIBLE_DEVICES", None)


def mamba2(*args, input=None, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "mamba2_cli", *args], input=input, capture_output=True,
                          env=env or ENV, timeout=timeout)


def ok(p):
    assert p.returncode == 0, p.stderr.decode()
    return p


def no_traceback(p):
    err = p.stderr.decode()
    assert "Traceback" not in err and "locals" not in err, err
    return err


@pytest.fixture(scope="module")
def sp_model_dir(tmp_path_factory):
    import checkpoints

    d = tmp_path_factory.mktemp("cli-sp-model")
    shape = tiny_shape(vocab_size=32768)
    sd = checkpoints.random_weights(shape, seed=6)
    sd["lm_head.weight"][771:1027] *= 40  # favour byte-fallback tokens: partial UTF-8 is common
    checkpoints.write_mistral(d, shape, sd)
    checkpoints.copy_mistral_tokenizer(d)
    return d


def run_json(model_dir, *args, prompt="def fibonacci(n):"):
    p = ok(mamba2("run", "-m", str(model_dir), "--device", "cpu", "--json", *args, prompt))
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_prompt_from_argument_and_from_stdin_agree(model_dir):
    a = ok(mamba2("run", "-m", str(model_dir), "-n", "20", "-q", "def fibonacci(n):"))
    b = ok(mamba2("run", "-m", str(model_dir), "-n", "20", "-q", input=b"def fibonacci(n):\n"))
    assert a.stdout == b.stdout and len(a.stdout) > 0
    assert b"def fibonacci" not in a.stdout  # the prompt is not echoed
    e = ok(mamba2("run", "-m", str(model_dir), "-n", "20", "-q", "--echo", "def fibonacci(n):"))
    assert e.stdout == b"def fibonacci(n):" + a.stdout


def test_prompt_from_file(model_dir, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("def fibonacci(n):")
    a = ok(mamba2("run", "-m", str(model_dir), "-n", "10", "-q", "-f", str(f)))
    b = ok(mamba2("run", "-m", str(model_dir), "-n", "10", "-q", "def fibonacci(n):"))
    assert a.stdout == b.stdout


def test_json_schema(model_dir):
    r = run_json(model_dir, "-n", "12")
    assert set(r) >= {"prompt", "text", "token_ids", "prompt_tokens", "generated_tokens", "finish_reason", "model",
                      "revision", "seed", "dtype", "backend", "device", "versions", "stats"}
    assert set(r["stats"]) >= {"load_s", "prefill_s", "prefill_tok_s", "ttft_s", "decode_s", "decode_tok_s",
                               "peak_memory_bytes"}
    assert r["generated_tokens"] == len(r["token_ids"]) == 12 and r["finish_reason"] == "length"
    assert r["dtype"] == "float32" and r["backend"] == "torch" and r["device"] == "cpu"
    assert r["prompt"] == "def fibonacci(n):" and r["prompt_tokens"] > 1


def test_statistics_go_to_stderr_and_quiet_silences_them(model_dir):
    p = ok(mamba2("run", "-m", str(model_dir), "-n", "5", "x = 1"))
    assert b"tok/s" in p.stderr and b"tok/s" not in p.stdout
    assert ok(mamba2("run", "-m", str(model_dir), "-n", "5", "-q", "x = 1")).stderr == b""


def test_greedy_is_deterministic_and_seed_reproduces_sampling(model_dir):
    assert run_json(model_dir, "-n", "15")["token_ids"] == run_json(model_dir, "-n", "15")["token_ids"]
    a = run_json(model_dir, "-n", "15", "-t", "1.0", "--seed", "42")
    b = run_json(model_dir, "-n", "15", "-t", "1.0", "--seed", "42")
    c = run_json(model_dir, "-n", "15", "-t", "1.0", "--seed", "43")
    assert a["token_ids"] == b["token_ids"] != c["token_ids"] and a["seed"] == 42
    unseeded = run_json(model_dir, "-n", "15", "-t", "1.0")
    again = run_json(model_dir, "-n", "15", "-t", "1.0", "--seed", str(unseeded["seed"]))
    assert again["token_ids"] == unseeded["token_ids"]  # the reported seed reproduces the run


def test_stop_string(model_dir):
    free = run_json(model_dir, "-n", "40", "-t", "1.0", "--seed", "3")
    stop = free["text"][10:13]
    r = run_json(model_dir, "-n", "40", "-t", "1.0", "--seed", "3", "--stop", stop)
    assert r["finish_reason"] == "stop" and r["text"] == free["text"][: free["text"].find(stop)]
    p = ok(mamba2("run", "-m", str(model_dir), "-n", "40", "-t", "1.0", "--seed", "3", "--stop", stop, "-q",
                  "def fibonacci(n):"))
    assert p.stdout.decode() == r["text"]


def test_eos_from_generation_config_ends_the_text(model_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    free = run_json(d, "-n", "20")
    eos = free["token_ids"][6]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    r = run_json(d, "-n", "20")
    assert r["finish_reason"] == "eos" and r["token_ids"] == free["token_ids"][: free["token_ids"].index(eos) + 1]
    assert run_json(d, "-n", "20", "--ignore-eos")["token_ids"] == free["token_ids"]


def test_streamed_bytes_equal_the_full_decode_with_byte_fallback(sp_model_dir):
    from mamba2_cli.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(sp_model_dir)
    prompt = "Grüße aus 東京:"
    args = ("-n", "60", "-t", "1.0", "--seed", "9", "--ignore-eos")
    r = run_json(sp_model_dir, *args, prompt=prompt)
    assert sum(771 <= i <= 1026 for i in r["token_ids"]) >= 10
    streamed = ok(mamba2("run", "-m", str(sp_model_dir), "--device", "cpu", "-q", *args, prompt)).stdout
    ids = tok.encode(prompt)
    full = tok.decode(ids + r["token_ids"])[len(tok.decode(ids)):]
    assert streamed == full.encode("utf-8")
    assert r["text"] == full


def test_model_by_repo_id_from_the_local_hf_cache(model_dir, tmp_path):
    import shutil

    snap = tmp_path / "hub" / "models--acme--tiny-mamba2" / "snapshots" / "0123abcd"
    shutil.copytree(model_dir, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abcd")
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    p = ok(mamba2("run", "-m", "acme/tiny-mamba2", "-n", "5", "--json", "x", env=env))
    r = json.loads(p.stdout)
    assert r["model"] == "acme/tiny-mamba2" and r["revision"] == "0123abcd"
    p = mamba2("run", "-m", "acme/other", "-n", "5", "x", env=env)
    assert p.returncode == 1 and b"mamba2 download acme/other" in p.stderr
    no_traceback(p)


def test_default_model_runs_without_a_checkpoint():
    p = ok(mamba2("run", "-n", "8", "--device", "cpu", input=b"def quicksort(xs):\n"))
    assert b"built-in tiny-code" in p.stderr and p.stdout.strip()
    q = ok(mamba2("run", "-n", "8", "--device", "cpu", "-q", "--preset", "tiny", input=b"def quicksort(xs):\n"))
    assert not q.stderr.strip()  # a preset asked for by name: no note


@pytest.mark.parametrize("args, stdin, words", [
    (["run", "-m", "/nonexistent/model", "x"], None, b"no such model directory"),
    (["run", "-m", "{tmp}", "x"], None, b"no config.json"),
    (["run", "--device", "tpu", "x"], None, b"unknown device"),
    (["run", "--device", "0", "x"], None, b"no CUDA GPU"),
    (["run", "--device", "mps", "x"], None, b"mps"),
    (["run", "--top-p", "0", "x"], None, b"top-p"),
    (["run", "-t", "-1", "x"], None, b"temperature"),
    (["run", "--min-p", "2", "x"], None, b"min-p"),
    (["run"], b"", b"empty"),
    (["run"], b"   \n", b"empty"),
    (["run"], b"\xff\xfe bad bytes", b"UTF-8"),
    (["run", "-f", "/nonexistent/prompt.txt"], None, b"cannot read prompt file"),
    (["run", "--preset", "gpt-5", "x"], None, b"unknown preset"),
])
def test_user_errors_are_one_line_messages(args, stdin, words, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
    p = mamba2(*args, input=stdin, env=env)
    err = no_traceback(p)
    assert p.returncode == 1, err
    assert words in p.stderr, err
    assert p.stdout == b""


@pytest.mark.parametrize("damage", ["corrupt", "misshaped", "unsupported"])
def test_broken_checkpoints_are_one_line_messages(model_dir, tmp_path, damage):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    if damage == "corrupt":
        (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    elif damage == "misshaped":
        from safetensors.torch import load_file, save_file
        import torch

        sd = load_file(str(d / "model.safetensors"))
        sd["backbone.norm_f.weight"] = torch.ones(7)
        save_file(sd, str(d / "model.safetensors"))
    else:
        cfg = json.loads((d / "config.json").read_text().replace("Infinity", "1e9"))
        cfg["model_type"] = "mamba"
        (d / "config.json").write_text(json.dumps(cfg))
    p = mamba2("run", "-m", str(d), "x")
    no_traceback(p)
    assert p.returncode == 1 and p.stderr.count(b"\n") <= 2
    assert {"corrupt": b"model.safetensors", "misshaped": b"norm_f.weight", "unsupported": b"Mamba-1"}[damage] in p.stderr


@pytest.mark.parametrize("args, words", [
    (["run", "--no-such-flag", "x"], b"--no-such-flag"),
    (["run", "--dtype", "int3", "x"], b"'int3' is not one of"),
    (["run", "--backend", "cuda-magic", "x"], b"'cuda-magic' is not one of"),
    (["run", "--save-state-after", "later", "x"], b"'later' is not one of"),
    (["chat", "--dtype", "float8"], b"'float8' is not one of"),
    (["bench", "--format", "html"], b"'html' is not one of"),
    (["bench", "--backend", "cuda"], b"'cuda' is not one of"),
    (["info", "tiny-code", "--dtype", "auto"], b"'auto' is not one of"),
    (["download", "acme/tiny", "--format", "gguf"], b"'gguf' is not one of"),
])
def test_bad_flags_exit_2(args, words):
    p = mamba2(*args)
    err = no_traceback(p)
    assert p.returncode == 2, err
    assert words in p.stderr and p.stdout == b""


def test_dtype_names_are_case_blind_and_short_ones_work(model_dir):
    assert run_json(model_dir, "-n", "2", "--dtype", "FP32")["dtype"] == "float32"


def test_the_choices_are_the_library_names():
    from mamba2_cli.checkpoint import DTYPES
    from mamba2_cli.cli.bench import KernelShapeName
    from mamba2_cli.cli.options import Backend, DType, SaveAfter, WeightDType
    from mamba2_cli.kernel_bench import SHAPES
    from mamba2_cli.kernels import BACKENDS
    from mamba2_cli.statefile import SAVE_POINTS

    def names(choice):
        return [c.value for c in choice]

    assert set(names(WeightDType)) == set(DTYPES) and names(DType) == ["auto", *names(WeightDType)]
    assert names(Backend) == ["auto", *BACKENDS] and names(KernelShapeName) == ["auto", *SHAPES]
    assert tuple(names(SaveAfter)) == SAVE_POINTS


def test_help_lists_the_commands_and_shell_completion():
    out = ok(mamba2("--help")).stdout.decode()
    for command in ("run", "chat", "bench", "download", "models", "info", "version"):
        assert f" {command} " in out
    assert "--install-completion" in out and "--show-completion" in out
    run_help = ok(mamba2("run", "--help")).stdout.decode()
    assert "auto|bfloat16|float16|float32" in run_help and "prompt|generation" in run_help
    assert "id[@revision]" in run_help


def test_terminal_stdin_without_prompt_gives_a_hint_not_a_hang(model_dir):
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-m", "mamba2_cli", "run", "-m", str(model_dir)], ENV)
    out = b""
    try:
        while True:
            chunk = os.read(fd, 1024)
            if not chunk:
                break
            out += chunk
    except OSError:
        pass
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    assert b"no prompt" in out


def test_closed_stdout_ends_quietly(model_dir):
    p = subprocess.run(f'"{sys.executable}" -m mamba2_cli run -m "{model_dir}" -n 200 --ignore-eos "x = 1" | head -c 5',
                       shell=True, capture_output=True, env=ENV, timeout=120)
    assert len(p.stdout) <= 5
    assert b"Traceback" not in p.stderr and b"Broken pipe" not in p.stderr


def default_sigint() -> None:
    """preexec_fn of a child the test interrupts: SIGINT back to its default, in case this run
    started where SIGINT is ignored (a background job); children inherit that, and Python then
    never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupt_exits_130_after_flushing(model_dir):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "mamba2_cli", "run", "-m", str(model_dir), "-n", "100000",
                             "--ignore-eos", "-q", "x = 1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                            preexec_fn=default_sigint)
    first = proc.stdout.read(8)  # generation has started
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and len(first) == 8
    assert b"Traceback" not in err


def test_bench_preset_json():
    p = ok(mamba2("bench", "--preset", "tiny", "--device", "cpu", "--prompt-len", "16", "--gen-len", "4",
                  "--repeats", "1", "--json", "--no-kernels"))  # the kernel section: test_bench_kernels.py
    r = json.loads(p.stdout)
    assert r["results"][0]["decode_tok_s"] > 0 and r["results"][0]["prefill_tok_s"] > 0
    assert r["results"][0]["kernels_per_token"] is None  # counted on CUDA only
    assert r["environment"]["torch"]


def test_bench_refuses_a_preset_that_does_not_fit():
    # codestral-7b needs 29 GB in fp32: more than this machine (24 GB) or CI has.
    p = mamba2("bench", "--preset", "codestral-7b", "--device", "cpu", "--dtype", "float32")
    no_traceback(p)
    assert p.returncode == 1 and b"needs 29." in p.stderr
