"""Sampling and the generation loop: greedy, seeds, stop strings, EOS, streaming text."""

import random

import pytest
import torch

from mamba2_cli import Mamba2Error, generate, load_model, stream_generate
from mamba2_cli.generation.sampling import SamplingParams, sample


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 100)
    g = torch.Generator().manual_seed(0)
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)):
        assert torch.equal(sample(logits, params, generator=g), logits.argmax(-1))


def test_exponential_race_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(20000, 3).contiguous()
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(sample(logits, SamplingParams(temperature=1.0), generator=g), minlength=3)
    assert torch.allclose(counts / 20000, probs, atol=0.015)


def test_min_p_and_top_k_remove_unlikely_tokens():
    logits = torch.tensor([[4.0, 3.9, 0.0, -1.0]]).expand(2000, 4).contiguous()
    g = torch.Generator().manual_seed(2)
    picks = sample(logits, SamplingParams(temperature=1.0, min_p=0.2), generator=g)
    assert set(picks.tolist()) == {0, 1}
    picks = sample(logits, SamplingParams(temperature=5.0, top_k=2), generator=g)
    assert set(picks.tolist()) == {0, 1}


def test_repetition_penalty_demotes_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample(logits, SamplingParams(repetition_penalty=1.2), seen).item() == 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=1.0),
                                 dict(top_k=-3), dict(repetition_penalty=0.0)])
def test_out_of_range_sampling_settings_are_refused(bad):
    with pytest.raises(Mamba2Error):
        SamplingParams(**bad).check()


@pytest.fixture
def tiny(make_checkpoint):
    d, _, _ = make_checkpoint("hf")
    return load_model(str(d), device="cpu", dtype="float32")


def test_same_seed_same_text_and_greedy_is_deterministic(tiny):
    model, tok = tiny
    a = generate(model, tok, "def f(x):", max_tokens=30, temperature=1.0, seed=7)
    b = generate(model, tok, "def f(x):", max_tokens=30, temperature=1.0, seed=7)
    c = generate(model, tok, "def f(x):", max_tokens=30, temperature=1.0, seed=8)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    g1 = generate(model, tok, "def f(x):", max_tokens=30)
    g2 = generate(model, tok, "def f(x):", max_tokens=30)
    assert g1.token_ids == g2.token_ids and len(g1.token_ids) == 30 and g1.finish_reason == "length"


def test_generation_equals_manual_greedy_decode(tiny):
    model, tok = tiny
    ids = tok.encode("class Stack:")
    state = model.new_state(1)
    logits = model(torch.tensor([ids]), state)[:, -1]
    want = []
    for _ in range(12):
        t = logits.argmax(-1)
        want.append(t.item())
        logits = model(t.view(1, 1), state)[:, -1]
    assert generate(model, tok, "class Stack:", max_tokens=12).token_ids == want


def test_streamed_text_adds_up_to_the_result(tiny):
    model, tok = tiny
    events = list(stream_generate(model, tok, "import os", max_tokens=40, temperature=1.0, seed=3))
    result = events[-1].result
    assert "".join(e.text for e in events) == result.text
    assert result.text == tok.decode_continuation(tok.encode("import os"), result.token_ids)


def test_eos_ends_generation(tiny):
    model, tok = tiny
    free = generate(model, tok, "def f(x):", max_tokens=20)
    eos = free.token_ids[5]
    tok.eos_ids = {eos}
    r = generate(model, tok, "def f(x):", max_tokens=20)
    assert r.finish_reason == "eos" and r.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
    assert generate(model, tok, "def f(x):", max_tokens=20, ignore_eos=True).token_ids == free.token_ids


def test_stop_string_cuts_text_even_across_tokens(tiny):
    model, tok = tiny
    free = generate(model, tok, "def f(x):", max_tokens=40, temperature=1.0, seed=11)
    text = free.text
    assert len(text) > 12
    stop = text[6:9]
    first = text.find(stop)
    events = list(stream_generate(model, tok, "def f(x):", max_tokens=40, temperature=1.0, seed=11, stop=[stop]))
    r = events[-1].result
    assert r.finish_reason == "stop" and r.text == text[:first]
    assert "".join(e.text for e in events) == text[:first]


def test_empty_prompt_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(Mamba2Error, match="empty"):
        generate(model, tok, [], max_tokens=3)


def test_stream_decoder_matches_full_decode_with_byte_fallback(mistral_tokenizer_dir):
    from mamba2_cli.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(mistral_tokenizer_dir)
    rng = random.Random(0)
    text = "def f(x):\n    return x  # héllo 😀 中文, naïve  spaces\t end"
    ids = tok.encode(text)
    assert any(771 <= i <= 1026 for i in ids)  # byte-fallback tokens are in play
    for cut in range(1, len(ids)):
        prefix, gen = ids[:cut], ids[cut:]
        want = tok.decode(ids)[len(tok.decode(prefix)):]
        assert tok.decode_continuation(prefix, gen) == want
    # Random byte tokens, including UTF-8 sequences cut short, decode as a full decode does.
    for _ in range(20):
        gen = [rng.choice([rng.randrange(771, 1027), rng.randrange(1027, 32768)]) for _ in range(30)]
        prefix = tok.encode("x =")
        want = tok.decode(prefix + gen)[len(tok.decode(prefix)):]
        assert tok.decode_continuation(prefix, gen) == want


@pytest.mark.parametrize("eos_at", [None, 5], ids=["length", "eos"])
@pytest.mark.parametrize("keep_state", [True, False], ids=["kept", "left"])
def test_greedy_graph_loop_gives_the_plain_loops_tokens_and_state(tiny, monkeypatch, take_graphs, eos_at, keep_state):
    # On GPUs one greedy sequence runs GreedyGraphSteps over DecodeGraph's greedy form: the
    # graph takes the argmax, writes it over its input buffer and hands it to the host
    # (launch, then collect). A stand-in with that interface runs eagerly here: the loop must
    # give the tokens and leave the state (prompt + generated[:-1]) that the plain loop does,
    # and feed each step's own token back without a copy after the first. A state left to the
    # loop (keep_state False) lets it launch the step after next before collecting: then an
    # EOS has been fed as well.
    from mamba2_cli.generation import decode_one_token

    model, tok = tiny
    if eos_at is not None:
        tok.eos_ids = {generate(model, tok, "def f(x):", max_tokens=20).token_ids[eos_at]}

    class GreedyStandIn:
        def __init__(self, state):
            self.state, self.tokens, self.copied, self.in_flight, self.slots = state, torch.full((1,), -1), [], [], 1

        def forget(self):
            self.in_flight.clear()

        def capture_second_slot(self, model):
            self.slots = 2

        def launch(self, tokens=None):
            assert len(self.in_flight) < self.slots
            self.copied.append(tokens is not None)
            if tokens is not None:
                self.tokens.copy_(tokens.view(-1))
            self.tokens.copy_(decode_one_token(model, self.tokens, self.state).argmax(dim=-1))
            self.in_flight.append(self.tokens.tolist())

        def collect(self):
            return self.in_flight.pop(0)

    made = []

    def make_graph(model, state, greedy=False):
        assert greedy and state.batch_size == 1
        made.append(GreedyStandIn(state))
        return made[-1]

    take_graphs(model, make_graph)
    fast_state = model.new_state(1)
    fast = generate(model, tok, "def f(x):", max_tokens=20, state=fast_state, keep_state=keep_state)
    monkeypatch.undo()
    plain_state = model.new_state(1)
    plain = generate(model, tok, "def f(x):", max_tokens=20, state=plain_state)
    overshoot = not keep_state and eos_at is not None  # the step ahead of the EOS ran
    launches = len(plain.token_ids) - 1 + overshoot
    assert len(made) == 1 and made[0].copied == [True] + [False] * (launches - 1)
    assert made[0].slots == (1 if keep_state else 2)
    assert fast.token_ids == plain.token_ids and fast.finish_reason == plain.finish_reason
    assert plain.finish_reason == ("eos" if eos_at is not None else "length")
    same = torch.equal(fast_state.ssm, plain_state.ssm) and torch.equal(fast_state.conv, plain_state.conv)
    assert same != overshoot
