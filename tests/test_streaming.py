"""Streamed text: stop strings cut at the earliest match, and a byte-level BPE stream never
shows half a character."""

import pytest

from mamba2_cli import load_model, stream_generate
from mamba2_cli.generation.sequence import StopMatcher
from mamba2_cli.tokenizer import Tokenizer


def stream(stops, chunks) -> tuple[list[str], StopMatcher]:
    m = StopMatcher(stops)
    out = []
    for c in chunks:
        out.append(m.feed(c))
        if m.stopped:
            break
    out.append(m.flush())
    return out, m


@pytest.mark.parametrize("stops", [["lo world", "world"], ["world", "lo world"]])
def test_two_stops_ending_at_the_same_place_cut_at_the_earlier_start(stops):
    out, m = stream(stops, ["say hel", "lo wo", "rld and more"])
    assert m.stopped and "".join(out) == m.text == "say hel"


@pytest.mark.parametrize("stops", [["o w", "hello world"], ["hello world", "o w"]])
def test_two_stops_ending_at_different_places_in_one_chunk_cut_at_the_earlier_start(stops):
    # "o w" ends first but starts later: both have matched once the chunk is in.
    out, m = stream(stops, ["say hell", "o world!"])
    assert m.stopped and "".join(out) == m.text == "say "


def test_text_that_may_start_a_stop_is_held_back_until_it_cannot():
    out, m = stream(["hello world", "lo!"], ["say hel", "lo", " wo", "rld"])
    assert m.stopped and out == ["say ", "", "", "", ""]
    out, m = stream(["hello world"], ["say hel", "lo there", " friend"])
    assert not m.stopped and out == ["say ", "hello there", " friend", ""]


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load_model(str(model_dir), device="cpu", dtype="float32")


def generated(tiny, **kw):
    model, tok = tiny
    events = list(stream_generate(model, tok, "def f(x):", max_tokens=60, temperature=1.0, seed=11, **kw))
    return events, events[-1].result


def test_generation_stops_at_the_earlier_of_two_matching_stops(tiny):
    """Stops picked from the free text: one inside the other (same end), one starting before
    a token and ending inside it while the other lies within that token (different ends)."""
    model, tok = tiny
    _, free = generated(tiny)
    text = free.text
    detok = tok.stream(tok.encode("def f(x):"))
    chunks = [detok.step(t) or "" for t in free.token_ids]
    assert "".join(chunks) == text[: len("".join(chunks))]
    ends = [sum(map(len, chunks[: i + 1])) for i in range(len(chunks))]

    def first_at(s, at):
        return text.find(s) == at

    same_end = next((a, c, b) for b in ends for a in range(b - 6, b - 2) for c in range(a + 1, b)
                    if a > 0 and first_at(text[a:b], a) and first_at(text[c:b], c))
    token = next((p, q) for p, q in zip([0] + ends, ends) if p > 0 and q - p >= 3
                 and first_at(text[p - 1 : q], p - 1) and first_at(text[p + 1 : q - 1], p + 1))
    a, c, b = same_end
    p, q = token
    for stops, cut in [([text[c:b], text[a:b]], a), ([text[p + 1 : q - 1], text[p - 1 : q]], p - 1)]:
        for order in (stops, stops[::-1]):
            events, r = generated(tiny, stop=order)
            assert r.finish_reason == "stop" and r.text == text[:cut], order
            assert "".join(e.text for e in events) == text[:cut]


# ---------------------------------------------------------------------------------------
# Byte-level BPE (GPT-NeoX's kind, what state-spaces checkpoints use): a character of
# several bytes may be split across tokens.

SPLIT_TEXT = "x = '€ 5', y = \"naïve café\" # 😀 東京 → ok 🙂 ¿Qué? ñ"


@pytest.fixture(scope="module")
def bpe(bpe_tokenizer_dir):
    return Tokenizer.from_dir(bpe_tokenizer_dir)


def test_the_test_text_splits_characters_across_tokens(bpe):
    ids = bpe.encode(SPLIT_TEXT, add_bos=False)
    halves = [i for i in ids if "\ufffd" in bpe.decode([i])]
    assert len(halves) >= 6  # €, ï, é, 😀, 東, 京, → and others arrive a byte or two at a time
    assert bpe.decode(ids) == SPLIT_TEXT


def test_a_byte_level_stream_never_emits_half_a_character(bpe):
    ids = bpe.encode(SPLIT_TEXT, add_bos=False)
    cuts = [k for k in range(1, len(ids)) if "\ufffd" not in bpe.decode(ids[:k])]  # prompts are whole text
    assert len(cuts) > 10
    for cut in cuts:
        prompt, gen = ids[:cut], ids[cut:]
        s = bpe.stream(prompt)
        pieces = [p for i in gen if (p := s.step(i)) is not None]
        pieces.append(s.flush())
        assert not any("\ufffd" in p for p in pieces), (cut, pieces)
        assert "".join(pieces) == SPLIT_TEXT[len(bpe.decode(prompt)):]


def test_a_character_split_across_tokens_is_held_until_complete(bpe):
    euro = [i for i in bpe.encode("€", add_bos=False)]
    assert len(euro) >= 2  # the trained vocabulary has no merge for it
    s = bpe.stream(bpe.encode("x = ", add_bos=False))
    assert [s.step(i) for i in euro] == [None] * (len(euro) - 1) + ["€"]
    assert s.flush() == ""
