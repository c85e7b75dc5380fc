"""Evaluate a model on the held-out standard-library modules: bits per byte and signature completion.

    python scripts/eval_tiny.py                       # the shipped tiny-code model, on CPU
    python scripts/eval_tiny.py --model DIR --device cuda
    python scripts/eval_tiny.py --quant                # int8 and int4 against the weights as stored

- Bits per byte: each held-out module is one sequence (after the <|endoftext|> the tool puts
  first), scored token by token; total bits over total UTF-8 bytes. gzip -9 on the same
  files, one by one, is printed beside it.
- Signatures: the 100 in scripts/tiny_data/signatures.jsonl (stored as written in their
  module; the prompt is the signature dedented to column 0, after the BOS), each completed
  at temperature 0.7 (seed = run seed * 1000 + index, at most 384 new tokens) and cut where
  the function ends: at the first line back at the signature's indentation, or below the
  indentation of the body's first line (a model that indents a method's body by 8 spaces
  ends it at the next 4-space line). A completion that runs out of tokens loses its last,
  partial line. It counts when signature + body parses with `ast.parse` and the body has a
  statement other than `pass`, `...`, a lone docstring or `raise NotImplementedError`.
  The strict figure, cut only at column 0, is reported too.
  Beside it, the same figure for a baseline that gives every signature the most frequent
  function body of the training files.
- --quant: held-out bits per byte of the weights as stored (fp16, computed in fp32) and of the
  int8 and int4 quantizations, each with its change against the stored weights, and the
  greedy agreement: along the stored model's greedy continuation (64 tokens) of each
  signature prompt, the share of positions where the quantized model picks the same token.
  Without the corpus archive, the held-out modules are read from this Python's stdlib.
"""

from __future__ import annotations

import argparse
import ast
import collections
import gzip
import json
import math
import sys
import textwrap
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

MAX_NEW_TOKENS = 384
TEMPERATURE = 0.7


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def load(model_dir: Path, device: torch.device, quant: str | None = None):
    from mamba2_cli.checkpoint import load_checkpoint
    from mamba2_cli.tokenizer import Tokenizer

    m = load_checkpoint(Path(model_dir), device, torch.float32, "torch", quant=quant)
    return m, Tokenizer.from_dir(Path(model_dir))


@torch.inference_mode()
def bits_per_byte(model, tokenizer, texts: list[str], piece: int = 2048) -> dict:
    nats = 0.0
    n_bytes = 0
    n_tokens = 0
    gz = 0
    for text in texts:
        ids = torch.tensor(tokenizer.encode(text, add_bos=True), device=model.device)
        state = model.new_state(1)
        for s in range(0, len(ids) - 1, piece):
            x = ids[s : s + piece][None]
            y = ids[s + 1 : s + piece + 1]
            logits = model(x[:, : len(y)], state)[0]
            nats += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            if len(y) < x.shape[1]:  # the last piece: its final input has no target
                break
        raw = text.encode("utf-8")
        n_bytes += len(raw)
        n_tokens += len(ids) - 1
        gz += len(gzip.compress(raw, compresslevel=9))
    return {
        "files": len(texts), "bytes": n_bytes, "tokens": n_tokens,
        "loss_per_token": round(nats / n_tokens, 4),
        "bits_per_byte": round(nats / math.log(2) / n_bytes, 4),
        "gzip9_bits_per_byte": round(8 * gz / n_bytes, 4),
    }


TRIVIAL_CALLS = {"NotImplementedError"}


def _trivial(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis:
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id in TRIVIAL_CALLS
    return False


def judge(code: str) -> tuple[bool, bool]:
    """(parses, parses with a non-trivial body) for one function's source."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False, False
    if not tree.body or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return True, False
    body = list(tree.body[0].body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # a docstring is not a body
    return True, any(not _trivial(s) for s in body)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def cut(signature: str, completion: str, finished: bool, strict: bool = False) -> str:
    """signature + completion up to the end of the function (see the module's docstring)."""
    lines = (signature + completion).split("\n")
    header = signature.count("\n") + 1
    level = _indent(signature)
    body, body_level = [], None
    for line in lines[header:]:
        if line.strip():
            ind = _indent(line)
            if ind <= level or (not strict and body_level is not None and ind < body_level):
                finished = True
                break
            if body_level is None:
                body_level = ind
        body.append(line)
    if not finished and body:
        body = body[:-1]
    return "\n".join(lines[:header] + body)


@torch.inference_mode()
def signature_eval(model, tokenizer, sigs: list[dict], seed: int = 0, batch: int = 50) -> dict:
    from mamba2_cli.generation import Request, stream_batch

    rows = []
    for b0 in range(0, len(sigs), batch):
        part = sigs[b0 : b0 + batch]
        prompts = [textwrap.dedent(s["signature"]) for s in part]
        reqs = [Request(p, max_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, seed=seed * 1000 + b0 + i)
                for i, p in enumerate(prompts)]
        results = [None] * len(reqs)
        for i, event in stream_batch(model, tokenizer, reqs, cuda_graph=False):
            if event.result is not None:
                results[i] = event.result
        for s, p, r in zip(part, prompts, results):
            finished = r.finish_reason != "length"
            code = cut(p, r.text, finished)
            parses, good = judge(code)
            strict = judge(cut(p, r.text, finished, strict=True))
            rows.append({"module": s["module"], "line": s["line"], "parses": parses, "nontrivial": good,
                         "strict_nontrivial": strict[1], "finish": r.finish_reason, "code": code})
    n = len(rows)
    return {
        "summary": {
            "n": n, "temperature": TEMPERATURE, "max_new_tokens": MAX_NEW_TOKENS,
            "parse_rate": round(sum(r["parses"] for r in rows) / n, 3),
            "nontrivial_rate": round(sum(r["nontrivial"] for r in rows) / n, 3),
            "strict_nontrivial_rate": round(sum(r["strict_nontrivial"] for r in rows) / n, 3),
        },
        "rows": rows,
    }


def most_frequent_body(texts: list[str]) -> str:
    counts = collections.Counter()
    for text in texts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes in old test files
                tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                counts["\n".join(ast.unparse(s) for s in node.body)] += 1
    return counts.most_common(1)[0][0]


def baseline_eval(train_texts: list[str], sigs: list[dict]) -> dict:
    body = most_frequent_body(train_texts)
    results = [judge(textwrap.dedent(s["signature"]) + "\n" + textwrap.indent(body, "    ")) for s in sigs]
    n = len(results)
    return {"body": body, "n": n, "parse_rate": round(sum(p for p, _ in results) / n, 3),
            "nontrivial_rate": round(sum(g for _, g in results) / n, 3)}


def write_card(out: Path, r: dict) -> None:
    h, s, b = r["heldout"], r["signatures"], r["baseline"]
    early = "" if r["steps_done"] == r["steps"] else (
        f"\n**This run stopped early, at step {r['steps_done']} of {r['steps']}** (time limit), "
        "so it is not the full run its command describes.\n")
    (out / "README.md").write_text(f"""# tiny-code

The built-in model of the `mamba2` tool: a {r['parameters'] / 1e6:.2f} M-parameter Mamba-2 trained by this
project on Python source from the standard library, so that `mamba2 run` works on a fresh
machine with no download. It writes Python-looking code; it knows nothing else.
{early}
## Model
- Architecture: Mamba-2 (the HF `mamba2` layout of config.json; grouped gated RMSNorm),
  {r['parameters']:,} parameters, tied embeddings, weights in fp16 safetensors.
- Tokenizer: byte-level BPE, {r['vocab']} tokens, trained with `tokenizers` on the training files;
  `<|endoftext|>` (id 0) is BOS, EOS and padding.

## Data
- Python {r['python_data']} standard-library `.py` files (PSF License), byte-identical duplicates
  removed, files over 256 KiB (generated tables) left out: {r['train_files']} training files,
  {r['train_bytes'] / 1e6:.1f} MB, {r['train_tokens'] / 1e6:.2f} M tokens.
- {r['heldout_files']} whole modules held out for validation (`scripts/tiny_data/heldout.txt`);
  every file with its SHA-256 in `scripts/tiny_data/files.tsv`.

## Training
```
python scripts/tiny_corpus.py          # builds .corpus/stdlib-py.tar.xz from the stdlib (Python {r['python_data']})
{r['command']}
```
Seed {r['seed']}; {r['steps_done']} steps of {r['batch']} x {r['seq']} tokens, AdamW (lr {r['lr']}, warmup
{r['warmup']}, cosine to 10 %, weight decay {r['weight_decay']}), fp32 with TF32 matmuls, on one
{r['device']} in {r['train_seconds']:.0f} s of training ({r['total_seconds']:.0f} s in all, with the tokenizer
and the evaluation), torch {r['torch']}.

## Evaluation (`python scripts/eval_tiny.py`)
| held-out modules | figure |
|---|---|
| bits per byte | {h['bits_per_byte']} |
| gzip -9, file by file | {h['gzip9_bits_per_byte']} |
| validation loss per token (nats) | {h['loss_per_token']} |
| bytes / tokens | {h['bytes']:,} / {h['tokens']:,} |

| {s['n']} signatures from held-out modules, temperature {s['temperature']}, at most {s['max_new_tokens']} new tokens | parses | parses with a non-trivial body | same, cut only at column 0 |
|---|---|---|---|
| this model | {s['parse_rate']:.0%} | {s['nontrivial_rate']:.0%} | {s.get('strict_nontrivial_rate', float('nan')):.0%} |
| baseline: the most frequent body of the training files (`{b['body']}`) | {b['parse_rate']:.0%} | {b['nontrivial_rate']:.0%} | {b['nontrivial_rate']:.0%} |

A completion is cut where its function ends: at the first line back at the signature's
indentation, or below the indentation of the body's first line (the last column counts
only the first rule). Evaluated on {r.get('eval_device', r['device'])}; the rules in full are in
`scripts/eval_tiny.py`.

The completions are in `completions.jsonl`, the training log in `training.json`.

## Licence
The training data is under the PSF License; the weights and tokenizer are released under
this project's licence (Apache-2.0).
""")


def heldout_texts(corpus: Path) -> list[str]:
    """The held-out modules: from the corpus archive, else from this Python's stdlib."""
    import sysconfig

    import tiny_corpus

    if corpus.is_file():
        return [t for _, t in tiny_corpus.load(corpus)["heldout"]]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = (Path(__file__).resolve().parent / "tiny_data" / "heldout.txt").read_text().split()
    return [(stdlib / n).read_text(encoding="utf-8") for n in names if (stdlib / n).is_file()]


def quant_eval(model_dir: Path, device: torch.device, corpus: Path, n_signatures: int) -> dict:
    import tiny_corpus
    from mamba2_cli.evaluate import greedy_agreement

    texts = heldout_texts(corpus)
    prompts = [textwrap.dedent(s["signature"]) for s in tiny_corpus.signatures()[:n_signatures]]
    base, tok = load(model_dir, device)
    out = {"stored": {"bits_per_byte": bits_per_byte(base, tok, texts)["bits_per_byte"]}, "files": len(texts)}
    for scheme in ("int8", "int4"):
        m, _ = load(model_dir, device, scheme)
        bpb = bits_per_byte(m, tok, texts)["bits_per_byte"]
        out[scheme] = {"bits_per_byte": bpb, "change": round(bpb / out["stored"]["bits_per_byte"] - 1, 4),
                       "greedy_agreement": round(greedy_agreement(base, m, tok, prompts, 64), 4)}
    return out


def main() -> None:
    import tiny_corpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "src" / "mamba2_cli" / "assets" / "tiny-code")
    ap.add_argument("--corpus", type=Path, default=ROOT / ".corpus" / "stdlib-py.tar.xz")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--signatures", type=int, default=100)
    ap.add_argument("--no-bpb", action="store_true", help="skip bits per byte (needs the corpus archive)")
    ap.add_argument("--write-card", action="store_true",
                    help="put the figures into the model's training.json, completions.jsonl and README.md")
    ap.add_argument("--quant", action="store_true", help="int8 and int4 against the weights as stored")
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.quant:
        print(json.dumps(quant_eval(a.model, device, a.corpus, a.signatures), indent=1))
        return
    model, tok = load(a.model, device)
    out = {}
    if not a.no_bpb:
        data = tiny_corpus.load(a.corpus)
        out["heldout"] = bits_per_byte(model, tok, [t for _, t in data["heldout"]])
        out["baseline"] = baseline_eval([t for _, t in data["train"]], tiny_corpus.signatures()[: a.signatures])
    sig = signature_eval(model, tok, tiny_corpus.signatures()[: a.signatures], a.seed)
    out["signatures"] = sig["summary"]
    out["eval_device"] = device_name(device)
    print(json.dumps(out, indent=1))
    if a.write_card:
        if a.no_bpb:
            raise SystemExit("--write-card needs every figure: drop --no-bpb")
        report = json.loads((a.model / "training.json").read_text())
        report.update(out)
        (a.model / "training.json").write_text(json.dumps(report, indent=1) + "\n")
        (a.model / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sig["rows"]))
        write_card(a.model, report)


if __name__ == "__main__":
    main()
