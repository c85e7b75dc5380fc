"""Writers of tiny checkpoints in the three formats Mamba-2 models ship in, and a tokenizer.

Written independently of the package's loader from the formats' published layouts, so a
loader bug cannot hide behind a matching writer bug.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

DATA = Path(__file__).parent / "data"

TEXT = """
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

The quick brown fox jumps over the lazy dog. Über naïve café, 東京 and emoji 🙂 too.
import os, sys
for i in range(10):
    print(i * i, file=sys.stderr)
""" * 4


def train_tokenizer(out_dir: Path, vocab_size: int = 300, byte_fallback_text: bool = True) -> int:
    """A byte-level BPE tokenizer trained on a few KB of text: <unk>=0, <s>=1, </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    return tok.get_vocab_size()


def copy_mistral_tokenizer(out_dir: Path) -> None:
    """Codestral's SentencePiece-style tokenizer (byte fallback, ▁ spaces), 32768 tokens."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in (DATA / "mistral-v3-tokenizer").iterdir():
        if f.suffix == ".json":
            shutil.copy(f, out_dir / f.name)


def tiny_shape(**over) -> dict:
    """A small Mamba-2 shape, in the package's own config vocabulary (for comparison)."""
    d = dict(d_model=32, n_layer=2, vocab_size=304, d_state=16, headdim=8, expand=2, d_conv=4,
             chunk_size=8, ngroups=2, tie_embeddings=False, pad_vocab_size_multiple=16)
    d.update(over)
    return d


def padded(shape: dict) -> int:
    m = shape.get("pad_vocab_size_multiple", 1)
    return math.ceil(shape["vocab_size"] / m) * m


def random_weights(shape: dict, seed: int = 0, D_has_hdim: bool = False) -> dict[str, torch.Tensor]:
    """fp32 weights under HF names. Decays are mild: exp(sum dt*A) over two chunks stays well
    above 1e-2, so the state carried across chunks matters to every output."""
    g = torch.Generator().manual_seed(seed)
    d, n_layer = shape["d_model"], shape["n_layer"]
    d_inner = shape["expand"] * d
    H = d_inner // shape["headdim"]
    G, N, K = shape["ngroups"], shape["d_state"], shape["d_conv"]
    conv_dim = d_inner + 2 * G * N
    V = padded(shape) if shape.get("pad_vocab_size_multiple", 1) > 1 else shape["vocab_size"]

    def rnd(*s, std=1.0):
        return torch.randn(*s, generator=g) * std

    sd = {"backbone.embeddings.weight": rnd(V, d, std=0.5)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = 1.0 + rnd(d, std=0.1)
        sd[p + "mixer.in_proj.weight"] = rnd(2 * d_inner + 2 * G * N + H, d, std=d ** -0.5)
        sd[p + "mixer.conv1d.weight"] = rnd(conv_dim, 1, K, std=0.5)
        sd[p + "mixer.conv1d.bias"] = rnd(conv_dim, std=0.1)
        sd[p + "mixer.dt_bias"] = torch.log(torch.expm1(torch.full((H,), 0.05))) + rnd(H, std=0.2)
        sd[p + "mixer.A_log"] = torch.log(torch.linspace(0.05, 0.5, H))
        sd[p + "mixer.D"] = rnd(H, shape["headdim"]) if D_has_hdim else rnd(H)
        sd[p + "mixer.norm.weight"] = 1.0 + rnd(d_inner, std=0.1)
        sd[p + "mixer.out_proj.weight"] = rnd(d, d_inner, std=d_inner ** -0.5)
    sd["backbone.norm_f.weight"] = 1.0 + rnd(d, std=0.1)
    sd["lm_head.weight"] = sd["backbone.embeddings.weight"] if shape["tie_embeddings"] else rnd(V, d, std=d ** -0.5)
    return sd


def _contig(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        out[k] = v.clone().contiguous()
    return out


def write_hf(out: Path, shape: dict, sd: dict, shards: int = 1, infinity_style: str = "bare",
             norm_before_gate_key: bool = True, dtype=torch.float32) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    d_inner = shape["expand"] * shape["d_model"]
    cfg = {
        "model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"],
        "hidden_size": shape["d_model"], "num_hidden_layers": shape["n_layer"],
        "vocab_size": sd["backbone.embeddings.weight"].shape[0],
        "num_heads": d_inner // shape["headdim"], "head_dim": shape["headdim"], "expand": shape["expand"],
        "n_groups": shape["ngroups"], "state_size": shape["d_state"], "conv_kernel": shape["d_conv"],
        "chunk_size": shape["chunk_size"], "use_bias": False, "use_conv_bias": True,
        "residual_in_fp32": True, "rms_norm": True, "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": shape["tie_embeddings"],
        # Codestral's config says bos = eos = pad = 0; the tokenizer files must win.
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
    }
    if norm_before_gate_key:
        cfg["norm_before_gate"] = True  # as in Codestral's config.json; HF ignores it
    text = json.dumps(cfg, indent=1)[:-2]
    limit = {"bare": "[0.0, Infinity]", "object": '[0.0, {"__float__": "Infinity"}]'}[infinity_style]
    text += f',\n "time_step_limit": {limit}\n}}'
    (out / "config.json").write_text(text)
    tensors = {k: v.to(dtype) for k, v in _contig(sd).items()}
    if shape["tie_embeddings"]:
        tensors.pop("lm_head.weight")
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(out / fname))
            weight_map.update({n: fname for n in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def write_mamba_ssm(out: Path, shape: dict, sd: dict, norm_before_gate: bool = False,
                    dt_limit=None, D_has_hdim: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    ssm_cfg = {"layer": "Mamba2", "d_state": shape["d_state"], "headdim": shape["headdim"],
               "ngroups": shape["ngroups"], "chunk_size": shape["chunk_size"], "expand": shape["expand"],
               "d_conv": shape["d_conv"]}
    if norm_before_gate:
        ssm_cfg["norm_before_gate"] = True
    if dt_limit is not None:
        ssm_cfg["dt_limit"] = list(dt_limit)
    if D_has_hdim:
        ssm_cfg["D_has_hdim"] = True
    cfg = {"d_model": shape["d_model"], "d_intermediate": 0, "n_layer": shape["n_layer"],
           "vocab_size": shape["vocab_size"], "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": shape.get("pad_vocab_size_multiple", 16),
           "tie_embeddings": shape["tie_embeddings"]}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    renamed = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in sd.items()}
    torch.save(_contig(renamed), out / "pytorch_model.bin")
    return out


def write_mistral(out: Path, shape: dict, sd: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    params = {"dim": shape["d_model"], "n_layers": shape["n_layer"], "vocab_size": shape["vocab_size"],
              "n_groups": shape["ngroups"], "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
              "pad_vocab_size_multiple": shape.get("pad_vocab_size_multiple", 1),
              "tie_embeddings": shape["tie_embeddings"],
              # Tiny shapes differ from Mamba-2's defaults; Codestral's params.json leaves these out.
              "d_state": shape["d_state"], "headdim": shape["headdim"], "chunk_size": shape["chunk_size"]}
    (out / "params.json").write_text(json.dumps(params, indent=1))
    tensors = {"model." + ("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v
               for k, v in _contig(sd).items()}
    if shape["tie_embeddings"]:
        tensors.pop("model.lm_head.weight")
    save_file(tensors, str(out / "consolidated.safetensors"))
    return out
