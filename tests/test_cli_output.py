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
