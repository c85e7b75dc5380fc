"""Plant known bugs one at a time in a copy of the project and check that the tests catch each.

    python scripts/plant_bugs.py            # prints one line per bug: caught / MISSED
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, file under src/mamba2_cli/, [(text to find, replacement), ...], the tests that must catch it)
CORE = ["tests/test_pytorch_backend.py", "tests/test_model.py", "tests/test_config.py"]
LOADING = ["tests/test_loading.py", "-k", "not peak_host"]
KERNELS = ["tests/test_triton_kernels.py", "-k", "off_the_blocks"]
BUGS = [
    ("repeat instead of repeat_interleave for groups", "kernels/pytorch.py",
     [("    b, L, H, P = x.shape\n    G, N = B.shape[-2:]\n    hpg = H // G\n",
       "    b, L, H, P = x.shape\n    G, N = B.shape[-2:]\n    B, C = B.repeat(1, 1, H // G, 1), C.repeat(1, 1, H // G, 1)\n"
       "    G, N = B.shape[-2:]\n    hpg = H // G\n")], CORE),
    ("norm over all of d_inner", "kernels/pytorch.py",
     [("    shape = y.shape\n", "    shape = y.shape\n    group_size = shape[-1]\n")], CORE),
    ("initial state dropped in prefill", "model.py", [("initial_state=ssm_state", "initial_state=None")], CORE),
    ("conv window off by one", "kernels/pytorch.py",
     [("conv_state.copy_(window[:, L:].transpose(1, 2))", "conv_state.copy_(window[:, L - 1 : -1].transpose(1, 2))")], CORE),
    ("padded vocab not sliced", "model.py", [("logits = logits[..., : cfg.vocab_size]", "logits = logits[..., :]")], CORE),
    ("norm_before_gate ignored", "config.py",
     [('"norm_before_gate": ("ssm_cfg.norm_before_gate", False)', '"norm_before_gate": ("ssm_cfg.norm_before_gate_", False)')],
     CORE),
    ("dt not clamped to time_step_limit", "kernels/pytorch.py", [("        dt = dt.clamp(min=lo, max=hi)\n", "        pass\n")], CORE),
    # Configs and checkpoints from a hostile or broken source.
    ("shard names joined unchecked", "checkpoint.py",
     [("files = sorted({_shard_path(d, index, name) for name in weight_map.values()})",
       "files = sorted({d / name for name in weight_map.values()})")], LOADING),
    ("shard check misses ..", "checkpoint.py",
     [(' or rel.is_absolute() or ".." in rel.parts:', " or rel.is_absolute():")], LOADING),
    ("tensor shape checked by size only", "checkpoint.py",
     [("            if tuple(t.shape) != expected[name]:", "            if t.numel() != math.prod(expected[name]):")],
     LOADING),
    ("pytorch dtypes not checked", "checkpoint.py",
     [("            if t.dtype not in SAFETENSORS_DTYPES.values():", "            if False:")], LOADING),
    ("config ints not type-checked", "config.py", [("            if not _is_int(v) or v <= 0:", "            if v <= 0:")],
     ["tests/test_config.py"]),
    ("config bools not checked", "config.py",
     [("            if not isinstance(getattr(self, name), bool):", "            if False:")], ["tests/test_config.py"]),
    ("epsilon not checked", "config.py",
     [("        if not _is_number(eps) or not 0 < eps < INF:", "        if not _is_number(eps):")], ["tests/test_config.py"]),
    # Downloads from a hostile or broken endpoint.
    ("a fetched file placed before it is verified", "download.py",
     [("                    self.verify(job, f, path)\n                    self._place(job, f, path, staging)\n",
       "                    self._place(job, f, path, staging)\n"
       "                    self.verify(job, f, blob or job.local_dir / f.path)\n")],
     ["tests/test_hub.py", "-k", "corrupt"]),
    ("a file's ETag not held to the listing's hash", "download.py",
     [("    if etag is not None and etag.removeprefix(\"W/\").strip('\"') != _guard.etag:",
       "    if etag is not None and not re.fullmatch(r\"[0-9a-f]{40}|[0-9a-f]{64}\", etag.strip('\"')):")],
     ["tests/test_hub.py", "-k", "never_lead_outside"]),
    # Sampling, stop strings and streaming.
    ("min-p relative to the total mass", "generation/sampling.py",
     [("params.min_p * probs.amax(dim=-1, keepdim=True)", "params.min_p * probs.sum(dim=-1, keepdim=True)")],
     ["tests/test_sampling.py"]),
    ("repetition penalty divides negative logits", "generation/sampling.py",
     [("torch.where(logits > 0, logits / penalty, logits * penalty)", "logits / penalty")], ["tests/test_sampling.py"]),
    ("temperature applied after top-p and min-p", "generation/sampling.py",
     [("    logits = logits / params.temperature\n    if params.top_k", "    if params.top_k"),
      ("sorted_p.masked_fill(drop, 0.0))\n    return probs\n",
       "sorted_p.masked_fill(drop, 0.0))\n    return probs ** (1 / params.temperature)\n")], ["tests/test_sampling.py"]),
    ("the later of two stop matches wins", "generation/sequence.py",
     [("self.text = self.text[: min(hits)]", "self.text = self.text[: max(hits)]")], ["tests/test_streaming.py"]),
    ("half a character streamed", "tokenizer.py",
     [(' and not after.endswith("\\ufffd") and ', " and ")], ["tests/test_streaming.py"]),
    ("a filter's output not bounded, only its inputs", "chat.py",
     [('                    _check_size(grown, f"the output of the filter {f.__name__}")',
       "                    pass")], ["tests/test_chat.py", "-k", "multiplying"]),
    # Kernels at sizes off their blocks, and stores outside their outputs (caught by the guards).
    ("scan nmask against BLOCK_N", "kernels/triton/ssd.py",
     [("    nmask = offs_n < N\n    causal = ", "    nmask = offs_n < BLOCK_N\n    causal = ")], KERNELS),
    ("scan y store without its P mask", "kernels/triton/ssd.py",
     [("                     mask=ymask[:, None] & pmask[None, :])", "                     mask=ymask[:, None])")], KERNELS),
    ("step pmask past P", "kernels/triton/decode_step.py",
     [("    pmask = offs_p < P\n    nmask = offs_n < N\n    s_mask = pmask[:, None] & nmask[None, :]\n\n",
       "    pmask = offs_p < npb * BLOCK_P\n    nmask = offs_n < N\n    s_mask = pmask[:, None] & nmask[None, :]\n\n")],
     KERNELS),
    ("matvec store without its mask", "kernels/triton/matvec.py",
     [("    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)",
       "    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty))")], ["tests/test_matvec.py", "-k", "off_the_blocks"]),
    ("add_rmsnorm store past its row", "kernels/triton/norm.py",
     [("(r * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)", "(r * rstd * w).to(out_ptr.dtype.element_ty), mask=row < M)")],
     KERNELS),
    ("conv1d_step store without its mask", "kernels/triton/conv.py",
     [("    tl.store(out_ptr + bi * stride_out_b + ch, out.to(out_ptr.dtype.element_ty), mask=cmask)",
       "    tl.store(out_ptr + bi * stride_out_b + ch, out.to(out_ptr.dtype.element_ty))")], KERNELS),
]


def main() -> int:
    missed = 0
    for name, rel, edits, tests in BUGS:
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
            stale = [old for old, _ in edits if text.count(old) != 1]
            if stale:
                print(f"STALE   {name}: the text to replace is not in {rel} exactly once")
                missed += 1
                continue
            for old, new in edits:
                text = text.replace(old, new, 1)
            path.write_text(text)
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
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
