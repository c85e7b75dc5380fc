"""What a script reads from `mamba2`: strict JSON, Ctrl-C under --json, unwrapped statistics, batch text."""

import json
import os
import signal
import subprocess
import sys
import time

from test_cli import ENV, default_sigint, mamba2, ok


def strict(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers and JavaScript do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_output_is_strict_json(model_dir):
    info = strict(ok(mamba2("info", "tiny-code", "--json")).stdout.decode())
    assert info["config"]["dt_limit"] == [0.0, None]  # no upper bound
    strict(ok(mamba2("models", "--json")).stdout.decode())
    strict(ok(mamba2("bench", "--preset", "tiny", "--device", "cpu", "--prompt-len", "8", "--gen-len", "2",
                     "--repeats", "1", "--json", "--no-kernels")).stdout.decode())
    strict(ok(mamba2("run", "-m", str(model_dir), "-n", "4", "--json", "x = 1")).stdout.decode())
    for line in ok(mamba2("run", "-m", str(model_dir), "-n", "4", "--json", "--batch", input=b"x\ny\n")).stdout.splitlines():
        strict(line.decode())


def test_a_json_record_stays_one_line_whatever_the_text_holds():
    from mamba2_cli.cli.common import dumps

    text = "a\nb\rc\x0bd\x1ee\x85f\u2028g\u2029h é"  # every character str.splitlines breaks at
    line = dumps({"text": text, "nan": float("nan")})
    assert line.splitlines() == [line] and strict(line) == {"text": text, "nan": None}


def interrupt_json_run(model_dir, wait_s: float):
    proc = subprocess.Popen([sys.executable, "-m", "mamba2_cli", "run", "-m", str(model_dir), "-n", "1000000",
                             "--ignore-eos", "-q", "--json", "x = 1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV, preexec_fn=default_sigint)
    time.sleep(wait_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 1, out
    return strict(lines[0])


def test_run_json_interrupted_prints_what_was_generated_then_exits_130(model_dir):
    for wait_s in (6, 15, 40):  # until the signal lands mid-generation on a slow machine
        r = interrupt_json_run(model_dir, wait_s)
        assert r["finish_reason"] == "interrupted" and r["generated_tokens"] == len(r["token_ids"])
        if r["token_ids"]:
            break
    assert r["token_ids"] and r["text"] and r["stats"]["decode_tok_s"] > 0 and r["model"] == str(model_dir)


def test_statistics_off_a_terminal_are_one_unwrapped_line(model_dir):
    p = ok(mamba2("run", "-m", str(model_dir), "-n", "4", "x = 1", env={**ENV, "COLUMNS": "40"}))
    lines = [line for line in p.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "load" in lines[0] and "tok/s" in lines[0] and "peak memory" in lines[0], lines
    p = ok(mamba2("run", "-m", str(model_dir), "-n", "4", "--batch", input=b"x\ny\n", env={**ENV, "COLUMNS": "40"}))
    lines = [line for line in p.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "batch of 2 prompts" in lines[0], lines


def test_batch_text_splits_back_into_the_completions(model_dir):
    # Whatever the completions hold (blank lines, a prompt with a NUL), the text form splits back exactly.
    prompts = b"def f():\n\n\nclass A:\nx = '\0'\n"
    rows = [json.loads(line) for line in ok(mamba2("run", "-m", str(model_dir), "-n", "24", "--json", "--batch",
                                                   input=prompts)).stdout.splitlines()]
    text = ok(mamba2("run", "-m", str(model_dir), "-n", "24", "-q", "--batch", "--echo", input=prompts)).stdout.decode()
    parts = text.split("\0\n")
    assert parts[-1] == "" and parts[:-1] == [(r["prompt"] + r["text"]).replace("\0", "\ufffd") for r in rows]


def test_bench_to_a_file_is_a_plain_complete_table_and_names_the_model_measured():
    args = ("bench", "--device", "cpu", "--prompt-len", "8", "--gen-len", "2", "--repeats", "1", "--kernel-shape", "tiny")
    p = ok(mamba2(*args, "--preset", "tiny", env={**ENV, "COLUMNS": "60"}))
    out = p.stdout.decode()
    assert not any(ch in out for ch in "│┃━─…"), out  # no box drawing, nothing cut
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("backend"))
    assert header.split("  ")[0] == "backend" and "kernels per token" in header and "peak memory" in header
    row = lines[lines.index(header) + 1].split()
    assert row[:3] == ["torch", "float32", "8"] and row[-1] in ("MB", "GB", "kB")  # backend, weights, prompt
    notes = [line for line in lines if line.startswith("mixer_decode_step")]
    assert notes and all("fp32 state alone" in line for line in notes)  # the note column, whole
    assert b"no model given" not in p.stderr
    default = ok(mamba2("bench", "--device", "cpu", "--prompt-len", "4", "--gen-len", "1", "--repeats", "1",
                        "--no-kernels"))
    assert b"no model given: measuring random weights of the mamba2-130m shape" in default.stderr
    assert b"preset:mamba2-130m" in default.stdout


def test_a_long_prefill_on_a_terminal_shows_progress(model_dir, tmp_path):
    import pty

    prompt = tmp_path / "long.txt"
    prompt.write_text("x = 1\n" * 6000)  # over two prefill chunks of 8192 tokens
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-m", "mamba2_cli", "run", "-m", str(model_dir), "-n", "1",
                                   "-f", str(prompt)], {**ENV, "MAMBA2_PROGRESS_AFTER_S": "0"})
    out = b""
    try:
        while chunk := os.read(fd, 4096):
            out += chunk
    except OSError:
        pass
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"reading the prompt: 8,192 tokens" in out and b"tok/s" in out
