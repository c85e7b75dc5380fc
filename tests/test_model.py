"""The whole model against a float64 reference, across formats, pieces and decode steps."""

import pytest
import torch

from checkpoints import random_weights, tiny_shape
from mamba2_cli import load_model
from reference import reference_logits, rel_err

PROMPT = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):"


def logits_of(model, ids):
    return model(torch.tensor([ids]), model.new_state(1))[0]


CASES = {
    "hf-groups-untied": dict(fmt="hf", shape=tiny_shape()),
    "hf-tied-one-group": dict(fmt="hf", shape=tiny_shape(ngroups=1, tie_embeddings=True)),
    "mamba_ssm-padded-vocab": dict(fmt="mamba_ssm", shape=tiny_shape(vocab_size=300)),
    "mamba_ssm-norm-before-gate": dict(fmt="mamba_ssm", shape=tiny_shape(), norm_before_gate=True),
    "mamba_ssm-dt-limit": dict(fmt="mamba_ssm", shape=tiny_shape(), dt_limit=(0.06, 0.08)),
    "mamba_ssm-D-per-channel": dict(fmt="mamba_ssm", shape=tiny_shape(), D_has_hdim=True),
    "mistral": dict(fmt="mistral", shape=tiny_shape(ngroups=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_model_matches_float64_reference(case, make_checkpoint):
    kw = dict(CASES[case])
    d, shape, sd = make_checkpoint(**kw)
    model, tok = load_model(str(d), device="cpu", dtype="float32")
    ids = tok.encode(PROMPT)
    assert len(ids) > 2 * shape["chunk_size"]  # crosses chunk boundaries
    got = logits_of(model, ids)
    want = reference_logits(sd, shape, ids, norm_before_gate=kw.get("norm_before_gate", False),
                            dt_limit=kw.get("dt_limit", (0.0, float("inf"))))
    assert got.shape == (len(ids), shape["vocab_size"])
    assert rel_err(got, want) < 1e-4


def test_hf_config_norm_before_gate_key_is_ignored(make_checkpoint):
    # Codestral's config.json says norm_before_gate: true; its weights need false.
    d, shape, sd = make_checkpoint("hf", norm_before_gate_key=True)
    model, tok = load_model(str(d), device="cpu", dtype="float32")
    assert model.cfg.norm_before_gate is False


def test_same_weights_in_three_formats_give_identical_logits(make_checkpoint):
    shape = tiny_shape()
    sd = random_weights(shape, seed=3)
    outs = []
    for fmt, kw in [("hf", {}), ("hf", {"shards": 3}), ("mamba_ssm", {}), ("mistral", {})]:
        d, _, _ = make_checkpoint(fmt, shape=shape, sd=sd, **kw)
        model, tok = load_model(str(d), device="cpu", dtype="float32")
        outs.append(logits_of(model, tok.encode(PROMPT)))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_prefill_then_decode_steps_equal_one_prefill(make_checkpoint):
    d, shape, _ = make_checkpoint("hf")
    model, tok = load_model(str(d), device="cpu", dtype="float32")
    ids = tok.encode(PROMPT)
    whole = logits_of(model, ids)
    state = model.new_state(1)
    first = model(torch.tensor([ids[:10]]), state)[0]
    steps = [model(torch.tensor([[t]]), state)[0, 0] for t in ids[10:]]
    got = torch.cat([first, torch.stack(steps)])
    assert rel_err(got, whole) < 1e-5


def test_only_the_models_decode_promises_a_settled_state(make_checkpoint, monkeypatch):
    # Mamba2LM's decode starts each token with the embedding's plain launch, so no kernel just
    # before a step wrote its state: it passes state_settled (the GPU step then loads the state
    # before waiting for in_proj). A mixer called on its own with one token makes no promise.
    d, shape, _ = make_checkpoint("hf")
    model, tok = load_model(str(d), device="cpu", dtype="float32")
    seen = []
    real = model.backend.mixer_decode_step
    monkeypatch.setattr(model.backend, "mixer_decode_step",
                        lambda *a, **k: seen.append(k.get("state_settled", False)) or real(*a, **k))
    state = model.new_state(1)
    model(torch.tensor([tok.encode(PROMPT)[:5]]), state)
    model(torch.tensor([[7]]), state)
    assert seen == [True] * shape["n_layer"]
    seen.clear()
    mixer = model.backbone.layers[0].mixer
    mixer.forward(torch.randn(1, 1, mixer.cfg.d_model), state.conv[0], state.ssm[0], model.backend)
    assert seen == [False]


def test_last_layer_projects_z_for_the_kept_positions_only(make_checkpoint):
    # With logits_to_keep (or per-row lengths) the last layer's in_proj computes z, which only
    # the gated norm reads, for the kept positions alone: the logits and states are those of
    # the full output at those positions.
    d, shape, _ = make_checkpoint("hf", shape=tiny_shape(n_layer=3))
    model, tok = load_model(str(d), device="cpu", dtype="float32")
    ids = torch.tensor([tok.encode(PROMPT)[:20]] * 2)
    s_all, s_kept = model.new_state(2), model.new_state(2)
    full = model(ids, s_all)
    kept = model(ids, s_kept, logits_to_keep=2)
    assert kept.shape == (2, 2, shape["vocab_size"])
    assert rel_err(kept, full[:, -2:]) < 1e-6
    assert rel_err(s_kept.ssm, s_all.ssm) < 1e-6 and rel_err(s_kept.conv, s_all.conv) < 1e-6
    lens = torch.tensor([20, 13])
    s_len = model.new_state(2)
    last = model(ids, s_len, seq_len=lens)
    assert last.shape == (2, 1, shape["vocab_size"])
    for i, n in enumerate(lens.tolist()):
        s1 = model.new_state(1)
        assert rel_err(last[i], model(ids[i : i + 1, :n], s1)[0, -1:]) < 1e-6
        assert rel_err(s_len.ssm[:, i], s1.ssm[:, 0]) < 1e-6


def test_the_projections_keep_the_checkpoint_names(make_checkpoint):
    # The weight seam (linear.Linear) changes no parameter name; in_proj's views are no
    # parameters of their own.
    d, _, _ = make_checkpoint("hf", shape=tiny_shape(n_layer=2))
    model, _ = load_model(str(d), device="cpu", dtype="float32")
    names = set(model.state_dict())
    assert {"backbone.layers.1.mixer.in_proj.weight", "backbone.layers.1.mixer.out_proj.weight",
            "lm_head.weight"} <= names
    assert not any("parts" in n for n in names)
    z, rest = model.backbone.layers[0].mixer.in_proj_parts
    w = model.backbone.layers[0].mixer.in_proj.weight
    assert z.weight.data_ptr() == w.data_ptr() and z.weight.shape[0] + rest.weight.shape[0] == w.shape[0]


def test_text_in_pieces_gives_same_logits_and_state_as_whole(make_checkpoint):
    d, shape, _ = make_checkpoint("hf")
    model, tok = load_model(str(d), device="cpu", dtype="float32")
    ids = tok.encode(PROMPT * 2)
    s_whole = model.new_state(1)
    whole = model(torch.tensor([ids]), s_whole)[0]
    s = model.new_state(1)
    cuts = [0, 3, 11, 12, 29, len(ids)]
    parts = [model(torch.tensor([ids[a:b]]), s)[0] for a, b in zip(cuts, cuts[1:])]
    assert rel_err(torch.cat(parts), whole) < 1e-5
    assert rel_err(s.ssm, s_whole.ssm) < 1e-5
    assert rel_err(s.conv, s_whole.conv) < 1e-6


def test_logits_to_keep_returns_only_the_last_positions(make_checkpoint):
    d, shape, _ = make_checkpoint("hf")
    model, tok = load_model(str(d), device="cpu", dtype="float32")
    ids = tok.encode(PROMPT)
    full_state, last_state = model.new_state(1), model.new_state(1)
    full = model(torch.tensor([ids]), full_state)[0]
    last = model(torch.tensor([ids]), last_state, logits_to_keep=1)[0]
    assert last.shape == (1, shape["vocab_size"])
    assert torch.allclose(last[0], full[-1], atol=1e-5)
    # The last layer's norm and out_proj run on the kept position only; every layer's state
    # still advances over all of them.
    assert torch.equal(full_state.ssm, last_state.ssm) and torch.equal(full_state.conv, last_state.conv)


def test_batch_rows_are_independent(make_checkpoint):
    d, shape, _ = make_checkpoint("hf")
    model, tok = load_model(str(d), device="cpu", dtype="float32")
    a, b = tok.encode("def foo(x):\n    return x"), tok.encode("class Stack:\n    def pop(sel")
    n = min(len(a), len(b))
    batch = model(torch.tensor([a[:n], b[:n]]), model.new_state(2))
    assert rel_err(batch[0], logits_of(model, a[:n])) < 1e-5
    assert rel_err(batch[1], logits_of(model, b[:n])) < 1e-5


def test_bfloat16_model_stays_close_to_fp32(make_checkpoint):
    d, shape, _ = make_checkpoint("hf")
    m32, tok = load_model(str(d), device="cpu", dtype="float32")
    m16, _ = load_model(str(d), device="cpu", dtype="bfloat16")
    assert m16.dtype == torch.bfloat16
    assert m16.backbone.layers[0].mixer.A_log.dtype == torch.float32  # A and dt stay fp32
    ids = tok.encode(PROMPT)
    assert rel_err(logits_of(m16, ids), logits_of(m32, ids)) < 5e-2
