"""The CPU install goes without triton: everything but the triton backend works, and asking for it is one line."""

import json
import os
from pathlib import Path

from test_cli import ENV, mamba2, ok


def no_triton_env(tmp_path: Path) -> dict:
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['triton'] = None  # not installed\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]])}
    env.pop("TRITON_INTERPRET", None)
    return env


def test_cpu_without_triton(tmp_path):
    env = no_triton_env(tmp_path)
    r = json.loads(ok(mamba2("run", "-n", "4", "--json", "--threads", "1", "x = 1", env=env)).stdout)
    assert r["backend"] == "torch" and r["generated_tokens"] == 4
    ok(mamba2("bench", "--preset", "tiny", "--device", "cpu", "--prompt-len", "8", "--gen-len", "2", "--repeats", "1",
              "--json", "--kernel-shape", "tiny", env=env))
    p = mamba2("run", "--backend", "triton", "-n", "2", "-q", "x = 1", env=env)
    err = p.stderr.decode()
    assert p.returncode == 1 and "triton" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_triton_comes_with_the_gpu_and_test_extras_only():
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    for extra in ("gpu", "test"):
        assert any(d.startswith("triton") for d in project["optional-dependencies"][extra])
