"""Checkpoint loading beside safetensors' load_file and a plain parallel read of the same files.

    PYTHONPATH=src python3 benchmarks/bench_load.py DIR [--device cuda] [--write codestral-7b]

With --write PRESET, DIR is first filled with a random-weight checkpoint of that preset's
shape (HF layout, --shards files, --dtype as stored; --layers N for a smaller one; the
built-in model's tokenizer beside it, so `mamba2 run -m DIR` works too); without
it, DIR is any checkpoint directory with safetensors files. Each measurement runs in a fresh
process, warm (the files in the page cache, read once before) and cold (each file's cached
pages dropped with posix_fadvise(DONTNEED) just before), and reports the seconds, the rate
over the files' bytes and the host memory the process added at its peak (VmHWM, reset
before the run, minus VmRSS then). Our load is split into read, place and setup as the
loader reports them. On CPU, load_file's tensors are copied once (they map the file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = ("ours", "load_file", "plain read")


def shards(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix == ".safetensors")


def write_checkpoint(d: Path, preset: str, layers: int | None, n_shards: int, dtype: str) -> None:
    """A random-weight HF checkpoint of a preset's shape, written one shard at a time."""
    import torch
    from safetensors.torch import save_file

    from mamba2_cli.checkpoint import build_meta_model
    from mamba2_cli.config import PRESETS, Mamba2Config

    shape = dict(PRESETS[preset])
    if layers:
        shape["n_layer"] = layers
    cfg = Mamba2Config(**shape)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "mamba2", "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
        "vocab_size": cfg.padded_vocab_size, "state_size": cfg.d_state, "head_dim": cfg.headdim,
        "expand": cfg.expand, "conv_kernel": cfg.d_conv, "chunk_size": cfg.chunk_size, "n_groups": cfg.ngroups,
        "num_heads": cfg.nheads, "tie_word_embeddings": cfg.tie_embeddings, "use_bias": cfg.bias,
        "use_conv_bias": cfg.conv_bias}))
    dt = getattr(torch, dtype)
    names = [(n, tuple(t.shape)) for n, t in build_meta_model(cfg).state_dict().items()
             if not (cfg.tie_embeddings and n == "lm_head.weight")]
    per_shard = sum(math.prod(s) for _, s in names) * dt.itemsize / n_shards
    g = torch.Generator().manual_seed(0)
    weight_map, part, size, k = {}, {}, 0, 0
    for i, (n, s) in enumerate(names):
        part[n] = (torch.randn(s, generator=g) * 0.02).to(dt)
        size += part[n].nbytes
        if (size >= per_shard and k < n_shards - 1) or i == len(names) - 1:
            k += 1
            fname = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
            save_file(part, str(d / fname))
            weight_map.update({name: fname for name in part})
            part, size = {}, 0
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # The built-in model's tokenizer, so that `mamba2 run -m DIR` works on it too.
    assets = Path(__file__).parents[1] / "src" / "mamba2_cli" / "assets" / "tiny-code"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets / name, d / name)
    os.sync()


def drop_cache(files: list[Path]) -> None:
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def plain_read(files: list[Path], threads: int = 8, chunk: int = 64 << 20) -> int:
    """Every byte of the files, 64 MB pieces over `threads` threads into reused buffers."""
    jobs = [(p, off) for p in files for off in range(0, p.stat().st_size, chunk)]
    buffers = {}

    def one(job):
        p, off = job
        import threading

        buf = buffers.setdefault(threading.get_ident(), bytearray(chunk))
        fd = os.open(p, os.O_RDONLY)
        try:
            return os.preadv(fd, [buf], off)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as ex:
        return sum(ex.map(one, jobs))


def child(method: str, d: Path, device: str, cold: bool) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    files = shards(d)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.zeros(1, device=dev)  # the CUDA context is not part of any load
    from mamba2_cli import checkpoint as ck
    from safetensors.torch import load_file

    if cold:
        drop_cache(files)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from the current RSS
    base = _status("VmRSS")
    t0 = time.perf_counter()
    out = {}
    if method == "ours":
        m = ck.load_checkpoint(d, dev, "auto")
        t = getattr(m, "load_times", None)  # None: a tree from before the split (an A/B)
        if t is not None:
            out.update(read_s=t.read_s, place_s=t.place_s, setup_s=t.setup_s)
    elif method == "load_file":
        tensors = [load_file(str(p), device=str(dev)) for p in files]
        if dev.type == "cpu":  # on CPU its tensors map the file: read them once, as a load must
            tensors = [{k: v.clone() for k, v in part.items()} for part in tensors]
    else:
        plain_read(files)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    out.update(seconds=time.perf_counter() - t0, host_peak_bytes=_status("VmHWM") - base)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--write", metavar="PRESET",
                    help="write a random-weight checkpoint of this preset's shape to DIR first")
    ap.add_argument("--layers", type=int, help="with --write: this many layers instead of the preset's")
    ap.add_argument("--shards", type=int, default=4, help="with --write: number of files")
    ap.add_argument("--dtype", default="bfloat16", help="with --write: the stored dtype")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each (method, cache) pair; the best is shown")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "CACHE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.dir, a.device, a.child[1] == "cold")))
        return
    if a.write:
        t0 = time.perf_counter()
        write_checkpoint(a.dir, a.write, a.layers, a.shards, a.dtype)
        print(f"wrote {a.dir} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    files = shards(a.dir)
    total = sum(p.stat().st_size for p in files)
    plain_read(files)  # warm: every file in the page cache
    rows = []
    for cache in ("warm", "cold"):
        for method in METHODS:
            runs = []
            for _ in range(a.repeat):
                cmd = [sys.executable, __file__, str(a.dir), "--device", a.device, "--child", method, cache]
                r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
                if r.returncode:
                    sys.exit(f"{method} ({cache}) failed:\n{r.stderr}")
                runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            best = min(runs, key=lambda x: x["seconds"])
            rows.append(dict(method=method, cache=cache, **best))
    if a.json:
        print(json.dumps({"dir": str(a.dir), "device": a.device, "bytes": total, "files": len(files), "rows": rows}))
        return
    print(f"{a.dir}: {len(files)} files, {total / 1e9:.2f} GB, device {a.device}")
    print(f"{'method':<11} {'cache':<5} {'seconds':>8} {'GB/s':>6} {'host peak':>10}  split")
    for r in rows:
        split = (f"read {r['read_s']:.2f} s, place {r['place_s']:.2f} s, setup {r['setup_s']:.2f} s"
                 if "read_s" in r else "")
        print(f"{r['method']:<11} {r['cache']:<5} {r['seconds']:8.2f} {total / r['seconds'] / 1e9:6.2f} "
              f"{r['host_peak_bytes'] / 1e9:8.2f} GB  {split}")


if __name__ == "__main__":
    main()
