"""benchmarks/gpu_round5.py runs end to end in Triton's interpreter (--smoke: tiny shapes,
a few variants of each kind), so the one GPU run does not fail on a typo or a bad argument."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_round5_script_checks_and_times_every_phase_in_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src"), "OUT": str(tmp_path)}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_round5.py"), "--smoke"], env=env,
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = p.stdout
    assert p.returncode == 0, p.stderr[-3000:]
    bad = [line for line in out.splitlines() if any(w in line for w in ("ERROR", "FAIL", "SUSPECT"))]
    assert not bad, "\n".join(bad)
    for what in ("m1 acc n2 k2048 w4 evict pdl", "m1 dot", "norm fused", "norm separate", "step split", "step unfused",
                 "first kernel alone", "b1 baseline", "b1 all + pdl", "m8 dot", "b8 b8 kernel", "## SUMMARY",
                 "GEMV_CONFIG[1] = GemvConfig("):
        assert what in out, what
    assert (tmp_path / "round5.txt").read_text().strip() == out.strip()
    res = json.loads((tmp_path / "round5.json").read_text())
    assert set(res) >= {"matvec_1row_ms", "norm_us_per_layer", "step_us_per_layer", "model_b1", "model_b8"}
    assert all(r["ok"] for r in res["model_b1"].values())


@pytest.mark.slow
def test_round5_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter never runs Triton's compiler; this does (frontend, ptxas) for every
    # configuration gpu_round5.py times, as Triton specializes them at Codestral shapes.
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_round5.py"), "--no-sass"], env=env,
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    ok = [line for line in p.stdout.splitlines() if line.startswith("OK")]
    assert len(ok) >= 50 and not [line for line in p.stdout.splitlines() if line.startswith("FAIL")]
