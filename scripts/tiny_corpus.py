"""The corpus of the built-in model: standard-library Python source, listed and hashed.

`prepare` walks a Python standard library (default: this interpreter's), keeps the .py files
that decode as UTF-8 and are not huge generated tables, drops byte-identical duplicates,
holds whole modules out for validation, and writes

  scripts/tiny_data/files.tsv       sha256, split (train | heldout), path: every file used
  scripts/tiny_data/heldout.txt     the held-out modules, one path per line
  scripts/tiny_data/signatures.jsonl  100 function signatures from the held-out modules
  <archive>                         the files themselves (tar.xz), for a machine whose
                                    standard library is another Python's

`load` reads the archive back and checks every file against files.tsv, so training on any
machine sees exactly the listed bytes.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import platform
import sysconfig
import tarfile
import textwrap
from pathlib import Path

DATA = Path(__file__).resolve().parent / "tiny_data"
MAX_FILE_BYTES = 256 * 1024  # bigger .py files in the stdlib are data tables (unicode, topics)
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib2to3/tests/data", "test/badsyntax"}
HELDOUT_EVERY = 30  # one module in 30 of those eligible, chosen by the hash of its path
N_SIGNATURES = 100


def _skipped(rel: str) -> bool:
    return any(rel == d or rel.startswith(d + "/") or f"/{d}/" in f"/{rel}" for d in SKIP_DIRS)


def _is_test(rel: str) -> bool:
    parts = rel.split("/")
    return any(p in ("test", "tests", "idle_test") for p in parts[:-1]) or parts[-1].startswith("test_")


def _heldout(rel: str, size: int) -> bool:
    # Library code only: no tests, no generated codec tables (encodings/cp*.py are near-copies
    # of each other and would flatter the figure), nothing tiny.
    if _is_test(rel) or rel.startswith("encodings/") or size < 2048:
        return False
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def collect(stdlib: Path) -> list[tuple[str, str, bytes]]:
    """(path relative to the stdlib, split, bytes) for every file kept, sorted by path."""
    seen: set[str] = set()
    out = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if _skipped(rel) or not path.is_file():
            continue
        data = path.read_bytes()
        if len(data) > MAX_FILE_BYTES or not data.strip():
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        out.append((rel, "heldout" if _heldout(rel, len(data)) else "train", data))
    return out


def function_headers(source: str) -> list[tuple[int, str]]:
    """(line number, header text as written, indentation included) of every def in `source`
    whose body starts on a later line."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start, body_line = node.lineno - 1, node.body[0].lineno - 1
        # The header ends at the first line after which a body parses (comments may follow it).
        for end in range(start, min(body_line, start + 6)):
            text = "\n".join(lines[start : end + 1]).rstrip()
            try:
                ast.parse(textwrap.dedent(text) + "\n    pass\n")
            except SyntaxError:
                continue
            if text.endswith(":"):
                out.append((node.lineno, text))
            break
    return sorted(out)


def choose_signatures(files: list[tuple[str, str, bytes]], n: int = N_SIGNATURES) -> list[dict]:
    """n signatures spread evenly over all held-out defs (in path, line order)."""
    cands = []
    for rel, split, data in files:
        if split != "heldout":
            continue
        for lineno, sig in function_headers(data.decode("utf-8")):
            cands.append({"module": rel, "line": lineno, "signature": sig})
    if len(cands) < n:
        raise SystemExit(f"only {len(cands)} functions in the held-out modules; need {n}")
    step = len(cands) / n
    return [cands[int(i * step)] for i in range(n)]


def prepare(stdlib: Path, archive: Path) -> None:
    files = collect(stdlib)
    DATA.mkdir(parents=True, exist_ok=True)
    with open(DATA / "files.tsv", "w") as f:
        f.write(f"# python {platform.python_version()}\n")
        f.write("# sha256\tsplit\tpath (relative to the standard library)\n")
        for rel, split, data in files:
            f.write(f"{hashlib.sha256(data).hexdigest()}\t{split}\t{rel}\n")
    (DATA / "heldout.txt").write_text("".join(rel + "\n" for rel, split, _ in files if split == "heldout"))
    with open(DATA / "signatures.jsonl", "w") as f:
        for s in choose_signatures(files):
            f.write(json.dumps(s) + "\n")
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:xz") as tar:
        for rel, _, data in files:
            info = tarfile.TarInfo(rel)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    n_held = sum(s == "heldout" for _, s, _ in files)
    total = sum(len(d) for *_, d in files)
    print(f"{len(files)} files ({n_held} held out), {total / 1e6:.1f} MB -> {archive} "
          f"({archive.stat().st_size / 1e6:.1f} MB)")


def listed() -> list[tuple[str, str, str]]:
    """(sha256, split, path) from files.tsv."""
    rows = []
    for line in (DATA / "files.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        digest, split, rel = line.split("\t")
        rows.append((digest, split, rel))
    return rows


def load(archive: Path) -> dict[str, list[tuple[str, str]]]:
    """{'train': [(path, text)], 'heldout': [...]} from the archive, every file checked against files.tsv."""
    rows = listed()
    with tarfile.open(archive, "r:xz") as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    out: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for digest, split, rel in rows:
        data = blobs.get(rel)
        if data is None:
            raise SystemExit(f"{archive}: {rel} is listed in files.tsv but missing")
        if hashlib.sha256(data).hexdigest() != digest:
            raise SystemExit(f"{archive}: {rel} does not match its hash in files.tsv")
        out[split].append((rel, data.decode("utf-8")))
    return out


def source_python() -> str:
    """The Python version whose standard library the corpus came from."""
    first = (DATA / "files.tsv").read_text().splitlines()[0]
    return first.split()[-1] if first.startswith("# python") else "unknown"


def signatures() -> list[dict]:
    return [json.loads(line) for line in (DATA / "signatures.jsonl").read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--archive", type=Path, default=Path(".corpus/stdlib-py.tar.xz"))
    a = ap.parse_args()
    prepare(a.stdlib, a.archive)
