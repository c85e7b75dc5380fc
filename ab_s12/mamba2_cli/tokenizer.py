"""Tokenizer: `tokenizer.json` through `tokenizers`, special ids from the tokenizer's own files.

Special ids come from tokenizer_config.json, then generation_config.json, then
special_tokens_map.json — never from the model's config.json, which for Codestral says
bos = eos = pad = 0 while the tokenizer has <unk>=0, <s>=1, </s>=2.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import Mamba2Error


def _load_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Mamba2Error(f"cannot read {path}: {e}") from None
    return d if isinstance(d, dict) else {}


def _token_text(v) -> str | None:
    # tokenizer_config.json writes special tokens as "<s>" or {"content": "<s>", ...}.
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, bos_id: int | None, eos_ids: set[int], pad_id: int | None,
                 add_bos: bool, chat_template: str | None = None, path: Path | None = None):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of byte-fallback tokens (`<0x41>`), empty for byte-level BPE tokenizers."""
        vocab = self.tok.get_vocab(with_added_tokens=False)
        return frozenset(i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))

    @property
    def eos_id(self) -> int | None:
        return min(self.eos_ids) if self.eos_ids else None

    @classmethod
    def from_dir(cls, d: Path) -> "Tokenizer":
        d = Path(d)
        path = d / "tokenizer.json"
        if not path.is_file():
            hint = " (tokenizers cannot read tokenizer.model files; a tokenizer.json is needed)" if any(
                d.glob("tokenizer.model*")
            ) else ""
            raise Mamba2Error(f"{d}: no tokenizer.json{hint}")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise Mamba2Error(f"{path}: not a valid tokenizer file: {e}") from None
        tcfg = _load_json(d / "tokenizer_config.json")
        gcfg = _load_json(d / "generation_config.json")
        smap = _load_json(d / "special_tokens_map.json")

        def special(key: str) -> int | None:
            for src in (tcfg, smap):
                text = _token_text(src.get(key))
                if text is not None and tok.token_to_id(text) is not None:
                    return tok.token_to_id(text)
            v = gcfg.get(f"{key}_id")
            if isinstance(v, list):
                v = v[0] if v else None
            return v if isinstance(v, int) else None

        bos_id, pad_id = special("bos_token"), special("pad_token")
        eos_ids = set()
        eos = special("eos_token")
        if eos is not None:
            eos_ids.add(eos)
        g = gcfg.get("eos_token_id")
        eos_ids.update([g] if isinstance(g, int) else [i for i in (g or []) if isinstance(i, int)])

        if "add_bos_token" in tcfg:
            add_bos = bool(tcfg["add_bos_token"]) and bos_id is not None
        else:
            # No word from the config: follow the tokenizer.json post-processor.
            add_bos = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        return cls(tok, bos_id, eos_ids, pad_id, add_bos, tcfg.get("chat_template"), path)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def decode_continuation(self, prefix: list[int], ids: list[int]) -> str:
        """The text `ids` add after `prefix`: what streaming prints after the prompt.

        Decoders that strip a leading space (SentencePiece) strip it only at the start of
        the whole text, so a generated "▁x" after a prompt reads " x", as in a full decode.
        """
        stream = self.stream(prefix)
        text = "".join(s for i in ids if (s := stream.step(i)) is not None)
        return text + stream.flush()

    def stream(self, prefix: list[int] | None = None) -> "StreamDecoder":
        return StreamDecoder(self, prefix or [])


class StreamDecoder:
    """Turns token ids into text as they arrive; bytes of a split UTF-8 character wait for the rest.

    Everything it returns, `flush()` included, adds up to the generated part of a full
    decode of prompt + generated ids. Each step decodes a short window of ids twice (up to
    the last emitted token, and with the new ones) and emits the difference once it does not
    end in an unfinished character; decoders that strip a leading space strip it from both.
    (tokenizers' DecodeStream does the same but raises on invalid UTF-8, which sampling can
    produce from byte-fallback tokens.)

    A run of byte-fallback tokens (<0xE4>...) decodes as a whole: one invalid byte turns every
    byte of the run into U+FFFD, even bytes that formed valid characters. So nothing is
    emitted while the run may still grow.
    """

    def __init__(self, tokenizer: Tokenizer, prefix: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prefix[-8:])  # the tail of the prompt is context enough
        self.n_prefix = len(self.ids)
        self.window_start = 0  # start of the decoding window
        self.read = len(self.ids)  # ids before this are emitted
        self.emitted = ""

    def step(self, token_id: int) -> str | None:
        self.ids.append(int(token_id))
        if int(token_id) in self.tokenizer.byte_fallback_ids:
            return None
        dec = self.tokenizer.decode
        before = dec(self.ids[self.window_start : self.read])
        after = dec(self.ids[self.window_start :])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            out = after[len(before):]
            self.window_start, self.read = self.read, len(self.ids)
            self.emitted += out
            return out
        return None

    def flush(self) -> str:
        """What a full decode has that the stream still holds back (an unfinished character)."""
        dec = self.tokenizer.decode
        head = dec(self.ids[: self.n_prefix])
        full = dec(self.ids)
        total = full[len(head):] if full.startswith(head) else dec(self.ids[self.n_prefix:])
        if not total.startswith(self.emitted):
            return ""
        rest = total[len(self.emitted):]
        self.emitted = total
        return rest


def byte_level_tokenizer() -> Tokenizer:
    """A 256-token byte-level tokenizer with no merges: the stand-in for random-weight presets."""
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok, None, set(), None, False)
