"""Plant known bugs one at a time in a copy of the project and check that the tests catch each.

    python scripts/plant_bugs.py            # prints one line per bug: caught / MISSED
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, file, text to find, replacement)
BUGS = [
    ("repeat instead of repeat_interleave for groups", "kernels/pytorch.py",
     "    b, L, H, P = x.shape\n    G, N = B.shape[-2:]\n    hpg = H // G\n",
     "    b, L, H, P = x.shape\n    G, N = B.shape[-2:]\n    B, C = B.repeat(1, 1, H // G, 1), C.repeat(1, 1, H // G, 1)\n    G, N = B.shape[-2:]\n    hpg = H // G\n"),
    ("norm over all of d_inner", "kernels/pytorch.py",
     "    shape = y.shape\n", "    shape = y.shape\n    group_size = shape[-1]\n"),
    ("initial state dropped in prefill", "model.py",
     "initial_state=ssm_state", "initial_state=None"),
    ("conv window off by one", "kernels/pytorch.py",
     "conv_state.copy_(window[:, L:].transpose(1, 2))", "conv_state.copy_(window[:, L - 1 : -1].transpose(1, 2))"),
    ("padded vocab not sliced", "model.py",
     "logits = logits[..., : cfg.vocab_size]", "logits = logits[..., :]"),
    ("norm_before_gate flipped", "config.py",
     'norm_before_gate=bool(ssm.get("norm_before_gate", False))', 'norm_before_gate=not ssm.get("norm_before_gate", False)'),
    ("dt not clamped to time_step_limit", "kernels/pytorch.py",
     "        dt = dt.clamp(min=lo, max=hi)\n", "        pass\n"),
]

TESTS = ["tests/test_pytorch_backend.py", "tests/test_model.py", "tests/test_config.py"]


def main() -> int:
    missed = 0
    for name, rel, old, new in BUGS:
        with tempfile.TemporaryDirectory() as tmp:
            # The whole project (its tracked files): the subprocess tests import the tree's own src/.
            root = Path(tmp) / "project"
            tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
            for rel_path in filter(None, tracked.decode().split("\0")):
                (root / rel_path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel_path, root / rel_path)
            src = root / "src"
            path = src / "mamba2_cli" / rel
            text = path.read_text()
            if old not in text:
                print(f"STALE   {name}: the text to replace is gone from {rel}")
                missed += 1
                continue
            path.write_text(text.replace(old, new, 1))
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
                               cwd=root, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
                               capture_output=True, text=True)
            caught = r.returncode != 0
            missed += not caught
            lines = r.stdout.strip().splitlines()
            last = next((l for l in lines if l.startswith("E ")), "") + " | " + (lines[-1] if lines else "")
            print(f"{'caught ' if caught else 'MISSED '} {name}: {last}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
