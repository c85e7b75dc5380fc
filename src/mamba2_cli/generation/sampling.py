"""Token sampling on the device: no host round trip beyond reading the chosen token.

Sampling draws with the exponential race (argmax(p / E), E ~ Exp(1)), which picks token i
with probability p_i and needs neither a multinomial sync nor a normalized distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import Mamba2Error


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def check(self) -> "SamplingParams":
        if not (self.temperature >= 0.0) or self.temperature > 100:
            raise Mamba2Error(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise Mamba2Error(f"top-k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise Mamba2Error(f"top-p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p < 1.0):
            raise Mamba2Error(f"min-p must be in [0, 1), got {self.min_p}")
        if not (self.repetition_penalty > 0.0):
            raise Mamba2Error(f"repetition penalty must be > 0, got {self.repetition_penalty}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive logits (multiply negative ones) of tokens already seen by `penalty`."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B] (int64, on the logits' device)."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, params)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: softmax(logits / temperature), then top-k, min-p
    and top-p, each on the tempered probabilities. Not renormalized (the race needs no sum);
    removed tokens have probability 0."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return probs
