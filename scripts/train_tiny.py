"""Train the built-in model `tiny-code`: a small Mamba-2 on standard-library Python source.

One command does it all: reads the corpus archive (checked against scripts/tiny_data/files.tsv;
build it with scripts/tiny_corpus.py), trains a byte-level BPE tokenizer with `tokenizers`,
trains the model with this project's own torch model (autograd through the reference SSD
scan), evaluates it (scripts/eval_tiny.py), and exports config.json, fp16 safetensors,
tokenizer files and a model card into --out.

    python scripts/tiny_corpus.py                        # once, where the corpus is made
    python scripts/train_tiny.py --out src/mamba2_cli/assets/tiny-code --seed 0

Not part of the installed package: it imports mamba2_cli from src/ and needs only what the
tool already depends on. The run is deterministic given the seed and the step count
(deterministic CUDA algorithms are requested; where one has none, torch warns).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

import tiny_corpus  # noqa: E402
from mamba2_cli.checkpoint import random_model  # noqa: E402
from mamba2_cli.config import Mamba2Config  # noqa: E402

EOT = "<|endoftext|>"

# The architecture: the same Mamba-2 the tool runs, about 7.7 M parameters.
MODEL = dict(d_model=288, n_layer=12, vocab_size=4096, d_state=64, headdim=64, expand=2, d_conv=4,
             chunk_size=256, ngroups=1, pad_vocab_size_multiple=16, tie_embeddings=True)


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_stream(tok, texts: list[str]) -> torch.Tensor:
    """One token stream: each file preceded by <|endoftext|> (the BOS the tool adds to prompts)."""
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(eot)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int64)


def hf_config(cfg: Mamba2Config) -> dict:
    return {
        "model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"],
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "vocab_size": cfg.padded_vocab_size,
        "state_size": cfg.d_state, "head_dim": cfg.headdim, "num_heads": cfg.nheads, "expand": cfg.expand,
        "conv_kernel": cfg.d_conv, "chunk_size": cfg.chunk_size, "n_groups": cfg.ngroups,
        "use_bias": cfg.bias, "use_conv_bias": cfg.conv_bias, "norm_before_gate": cfg.norm_before_gate,
        "rms_norm": True, "residual_in_fp32": cfg.residual_in_fp32, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "time_step_limit": [0.0, float("inf")], "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "torch_dtype": "float16",
    }


def build_model(cfg: Mamba2Config, device: torch.device, seed: int):
    model = random_model(cfg, device, torch.float32, seed)  # the benchmarks' init: realistic decays
    for p in model.parameters():
        p.requires_grad_(True)
    model.set_backend("torch")
    for layer in model.backbone.layers:
        layer.mixer.scan_chunk = 64  # exact for any block; 64 is the cheapest here
    return model


def param_groups(model, weight_decay: float):
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "conv1d" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def sample_windows(stream: torch.Tensor, batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """[batch, seq + 1] windows of the token stream (on its device) at random starts drawn from g."""
    starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=g)
    return stream[starts[:, None].to(stream.device) + torch.arange(seq + 1, device=stream.device)]


def batch_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    state = model.new_state(x.shape[0])
    logits = model(x, state)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


EVAL_RESERVE_S = 120  # export, bits per byte, 100 completions and the baseline's parse of the corpus


def fit_steps(a, cfg: Mamba2Config, device: torch.device, stream: torch.Tensor, t_start: float) -> int:
    """The step count that fits the budget, measured on a throwaway model (the real one is untouched)."""
    probe = build_model(cfg, device, a.seed + 1)
    opt = torch.optim.AdamW(param_groups(probe, a.weight_decay), lr=1e-4)
    g = torch.Generator().manual_seed(a.seed + 1)

    def step():
        chunk = sample_windows(stream, a.batch, a.seq, g)
        loss = batch_loss(probe, chunk[:, :-1], chunk[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    per_step = (time.perf_counter() - t0) / 10
    left = 60 * a.budget_minutes - (time.perf_counter() - t_start) - EVAL_RESERVE_S
    steps = min(a.steps, max(100, int(left / per_step) // 100 * 100))
    print(f"budget: {per_step * 1e3:.1f} ms per step, {left:.0f} s left for training: {steps} steps", flush=True)
    del probe, opt
    return steps


def export(model, cfg: Mamba2Config, tok, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if name.endswith(".A"):
            continue  # derived buffer
        sd[name] = t.detach().to("cpu", torch.float16).contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
        "pad_token": EOT, "add_bos_token": True, "model_max_length": 1000000,
    }, indent=2) + "\n")
    # Sampling defaults for `mamba2 run` and `chat`: greedy decoding of this model repeats one
    # function over and over; these give varied code.
    (out / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.7, "top_p": 0.95, "repetition_penalty": 1.1,
    }, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / ".corpus" / "stdlib-py.tar.xz")
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "mamba2_cli" / "assets" / "tiny-code")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2600)  # the shipped run
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=MODEL["vocab_size"])
    ap.add_argument("--d-model", type=int, default=MODEL["d_model"])
    ap.add_argument("--n-layer", type=int, default=MODEL["n_layer"])
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--signatures", type=int, default=100, help="how many of the committed signatures to complete")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="time a few steps first and lower --steps so the whole command fits in this many minutes "
                         "(the card records the step count used, which with the seed reproduces the run)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop early (and say so in the card) if training runs past this; the run is then not the full one")
    a = ap.parse_args()

    t_start = time.perf_counter()
    torch.manual_seed(a.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device(a.device)

    data = tiny_corpus.load(a.corpus)
    train_texts = [t for _, t in data["train"]]
    held_texts = [t for _, t in data["heldout"]]
    tok = train_tokenizer(train_texts, a.vocab)
    vocab = tok.get_vocab_size()
    stream = encode_stream(tok, train_texts)
    held = encode_stream(tok, held_texts)
    train_bytes = sum(len(t.encode()) for t in train_texts)
    print(f"corpus: {len(train_texts)} train files, {train_bytes / 1e6:.1f} MB, {len(stream) / 1e6:.2f} M tokens "
          f"({train_bytes / len(stream):.2f} bytes/token); {len(held_texts)} held out; "
          f"tokenizer {vocab} tokens ({time.perf_counter() - t_start:.0f} s)", flush=True)

    cfg = Mamba2Config(**{**MODEL, "vocab_size": vocab, "d_model": a.d_model, "n_layer": a.n_layer})
    model = build_model(cfg, device, a.seed)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"model: {n_params / 1e6:.2f} M parameters, d_model {cfg.d_model}, {cfg.n_layer} layers, "
          f"{cfg.nheads} heads x {cfg.headdim}, d_state {cfg.d_state}", flush=True)
    stream_dev = stream.to(device)
    if a.budget_minutes:
        a.steps = fit_steps(a, cfg, device, stream_dev, t_start)
    opt = torch.optim.AdamW(param_groups(model, a.weight_decay), lr=a.lr, betas=(0.9, 0.95), eps=1e-8)

    g = torch.Generator().manual_seed(a.seed)
    held_dev = held.to(device)
    n_val = min(32, (len(held) - 1) // (a.seq + 1))
    val_starts = torch.arange(n_val) * ((len(held) - a.seq - 1) // max(1, n_val))
    val_x = torch.stack([held_dev[s : s + a.seq] for s in val_starts.tolist()])
    val_y = torch.stack([held_dev[s + 1 : s + a.seq + 1] for s in val_starts.tolist()])

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    log = []
    t_train = time.perf_counter()
    stopped_at = None
    tty = sys.stderr.isatty()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), disable=not tty) as progress:
        task = progress.add_task("training", total=a.steps)
        for step in range(a.steps):
            chunk = sample_windows(stream_dev, a.batch, a.seq, g)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
            loss = batch_loss(model, chunk[:, :-1], chunk[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == a.steps - 1:
                lv = loss.item()
                progress.update(task, description=f"training  loss {lv:.3f}")
                entry = {"step": step, "loss": round(lv, 4), "s": round(time.perf_counter() - t_train, 1)}
                if (step % a.eval_every == 0 or step == a.steps - 1) and n_val:
                    with torch.no_grad():
                        entry["val_loss"] = round(batch_loss(model, val_x, val_y).item(), 4)
                log.append(entry)
                if not tty or "val_loss" in entry:
                    print(json.dumps(entry), flush=True)
            progress.advance(task)
            if a.max_minutes and time.perf_counter() - t_start > 60 * a.max_minutes:
                stopped_at = step + 1
                print(f"stopping early at step {stopped_at} of {a.steps}: past {a.max_minutes} minutes", flush=True)
                break
    train_s = time.perf_counter() - t_train
    steps_done = stopped_at or a.steps
    print(f"trained {steps_done} steps in {train_s:.0f} s ({steps_done * a.batch * a.seq / train_s / 1e3:.0f} k tokens/s)",
          flush=True)

    model.eval()
    export(model, cfg, tok, a.out)
    import eval_tiny

    m, tokenizer = eval_tiny.load(a.out, device)
    bpb = eval_tiny.bits_per_byte(m, tokenizer, held_texts)
    sig = eval_tiny.signature_eval(m, tokenizer, tiny_corpus.signatures()[: a.signatures], seed=a.seed)
    base = eval_tiny.baseline_eval(train_texts, tiny_corpus.signatures()[: a.signatures])
    report = {
        "seed": a.seed, "steps": a.steps, "steps_done": steps_done, "batch": a.batch, "seq": a.seq, "lr": a.lr,
        "warmup": a.warmup, "weight_decay": a.weight_decay, "parameters": n_params, "vocab": vocab,
        "train_files": len(train_texts), "train_bytes": train_bytes, "train_tokens": len(stream),
        "heldout_files": len(held_texts), "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1), "device": eval_tiny.device_name(device),
        "torch": torch.__version__, "python": sys.version.split()[0], "python_data": tiny_corpus.source_python(),
        "heldout": bpb, "signatures": sig["summary"], "baseline": base, "log": log,
        "command": "python scripts/train_tiny.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in (("seed", a.seed), ("steps", a.steps), ("batch", a.batch),
                                                        ("seq", a.seq), ("lr", a.lr))),
    }
    (a.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    (a.out / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sig["rows"]))
    eval_tiny.write_card(a.out, report)
    print(json.dumps({k: report[k] for k in ("heldout", "signatures", "baseline", "train_seconds", "total_seconds")},
                     indent=1), flush=True)


if __name__ == "__main__":
    main()
