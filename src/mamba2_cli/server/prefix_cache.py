"""The exact prefix-state cache: states keyed by the token ids they have read.

A recurrent model's whole context is its state, so a request whose tokens start with a
key's tokens continues from that key's state and prefills only the rest: exact to the
token, however short the prompt. Entries live on the model's device up to a byte budget;
the least recently used spill to host memory (up to the same budget again) and are
dropped from there. An entry may hold the logits after its last token: only such an entry
serves a request of exactly its tokens (the next token is sampled from them).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from ..state import Mamba2State


@dataclass
class Entry:
    conv: torch.Tensor  # [n_layer, 1, conv_dim, d_conv - 1]
    ssm: torch.Tensor  # [n_layer, 1, nheads, headdim, d_state]
    logits: torch.Tensor | None  # [1, V] after the last key token, or None
    spilled: bool = False  # in host memory, behind the device's budget

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm, self.logits) if t is not None)

    def to(self, device: torch.device, spilled: bool) -> "Entry":
        pin = spilled and torch.cuda.is_available()
        moved = (None if t is None else _copy_to(t, device, pin) for t in (self.conv, self.ssm, self.logits))
        return Entry(*moved, spilled=spilled)


def _copy_to(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    if pin:  # to pinned host memory on a side stream: the copy engine runs beside the decode steps
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        side = _side_stream(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(side):
            out.copy_(t, non_blocking=True)
        t.record_stream(side)  # the device copy is not reused before the copy has read it
        return out
    if t.device.type == "cpu" and device.type == "cuda":  # back from host memory: after the copy there
        torch.cuda.current_stream(device).wait_stream(_side_stream(device))
    return t.to(device, non_blocking=True)


_SIDE: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE:
        _SIDE[index] = torch.cuda.Stream(index)
    return _SIDE[index]


class PrefixCache:
    """LRU of states by token ids: `budget_bytes` on the model's device, as much again in
    host memory behind it (none when the model is on the CPU)."""

    def __init__(self, device: torch.device, budget_bytes: int):
        self.device = device
        self.budget = budget_bytes
        self.host_budget = budget_bytes if device.type != "cpu" else 0
        self.entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()
        self.lengths: Counter[int] = Counter()
        self.device_bytes = 0
        self.host_bytes = 0
        self.hits = 0

    def lookup(self, ids: list[int]) -> tuple[int, Entry] | None:
        """The longest key that `ids` starts with (the whole of `ids` only with logits)."""
        for n in sorted((n for n in self.lengths if n <= len(ids)), reverse=True):
            key = tuple(ids[:n])
            entry = self.entries.get(key)
            if entry is None or (n == len(ids) and entry.logits is None):
                continue
            self.entries.move_to_end(key)
            if entry.spilled:  # promoted: it is about to be read, and likely again
                self._remove(key)
                entry = self._insert(key, entry.to(self.device, spilled=False))
            self.hits += 1
            return n, entry
        return None

    def put(self, ids: list[int], state: Mamba2State, logits: torch.Tensor | None = None) -> None:
        """Keep a copy of a one-sequence `state` that has read `ids` (and its last logits)."""
        key = tuple(ids)
        if not key or self.budget <= 0:
            return
        entry = Entry(state.conv.clone(), state.ssm.clone(), None if logits is None else logits.clone())
        if entry.nbytes > self.budget:
            return
        if key in self.entries:
            old = self.entries[key]
            if old.logits is not None and entry.logits is None and not old.spilled:  # same state; keep the logits
                entry.logits = old.logits
            self._remove(key)
        self._insert(key, entry)

    def _insert(self, key, entry: Entry) -> Entry:
        self.entries[key] = entry
        self.lengths[len(key)] += 1
        self.device_bytes += entry.nbytes
        for k in list(self.entries):  # oldest first
            if self.device_bytes <= self.budget:
                break
            e = self.entries[k]
            if e.spilled or k == key:
                continue
            self._remove(k)
            if self.host_budget > 0:
                self.entries[k] = e.to(torch.device("cpu"), spilled=True)
                self.lengths[len(k)] += 1
                self.host_bytes += e.nbytes
                self.entries.move_to_end(k, last=False)  # spilled entries keep their age
        for k in list(self.entries):
            if self.host_bytes <= self.host_budget:
                break
            if self.entries[k].spilled:
                self._remove(k)
        return entry

    def _remove(self, key) -> None:
        e = self.entries.pop(key)
        self.lengths[len(key)] -= 1
        if not self.lengths[len(key)]:
            del self.lengths[len(key)]
        if e.spilled:
            self.host_bytes -= e.nbytes
        else:
            self.device_bytes -= e.nbytes

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.device_bytes + self.host_bytes,
                "device_bytes": self.device_bytes, "host_bytes": self.host_bytes, "hits": self.hits}
