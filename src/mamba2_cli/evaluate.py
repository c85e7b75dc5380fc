"""Perplexity and bits per byte of a text: how well a model (or a quantization of it) predicts it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import Mamba2Error


@torch.inference_mode()
def score_text(model, tokenizer, text: str, piece: int = 1024, on_piece=None) -> dict:
    """Negative log-likelihood of `text` (after the BOS), read in pieces of `piece` tokens with
    the state carried from one piece to the next, so the figure is that of the whole text at
    the memory cost of one piece. Returns tokens, bytes, nats, perplexity, bits per token and
    bits per byte (UTF-8 bytes of the text)."""
    if piece < 1:
        raise Mamba2Error(f"piece length must be at least 1, got {piece}")
    ids = torch.tensor(tokenizer.encode(text, add_bos=True), device=model.device)
    n = len(ids) - 1
    if n < 1:
        raise Mamba2Error("the text is empty: nothing to score")
    state = model.new_state(1)
    nats = 0.0
    for s in range(0, n, piece):
        x = ids[s : min(s + piece, n)][None]
        y = ids[s + 1 : s + 1 + x.shape[1]]
        logits = model(x, state)[0]
        nats += F.cross_entropy(logits.float(), y, reduction="sum").item()
        if on_piece is not None:
            on_piece(x.shape[1])
    n_bytes = len(text.encode("utf-8"))
    return {"tokens": n, "bytes": n_bytes, "nats": nats, "perplexity": math.exp(nats / n),
            "bits_per_token": nats / math.log(2) / n, "bits_per_byte": nats / math.log(2) / n_bytes}


@torch.inference_mode()
def greedy_agreement(reference, model, tokenizer, prompts: list[str], max_tokens: int = 64) -> float:
    """The share of positions where `model`'s greedy token equals `reference`'s, along the
    reference's greedy continuation of each prompt (teacher-forced: one divergence does not
    shift every later position)."""
    same = total = 0
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)], device=reference.device)
        n = ids.shape[1]
        state = reference.new_state(1)
        nxt = reference(ids, state, logits_to_keep=1)[0, -1].argmax()
        out = [nxt]
        for _ in range(max_tokens - 1):
            nxt = reference(nxt.view(1, 1), state)[0, -1].argmax()
            out.append(nxt)
        seq = torch.cat([ids[0], torch.stack(out)])[None]
        ref_choice = seq[0, n:]
        choice = model(seq[:, :-1], model.new_state(1))[0, n - 1:].argmax(-1)
        same += (choice == ref_choice).sum().item()
        total += len(ref_choice)
    return same / total
