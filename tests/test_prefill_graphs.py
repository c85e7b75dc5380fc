"""Padded prefill (a real length per row, read on the device) and the prefill-graph runner.

A CUDA graph of the prefill is captured for a bucket length T and replayed for every prompt
of up to T tokens: the prompt is padded, and the kernels read each row's real length from a
device tensor. These tests check on CPU, for the torch backend and the triton backend (in
Triton's interpreter), that padding changes nothing (logits, conv state and SSM state equal
those of the unpadded prompt, padding never read even when it holds NaN), and the runner's
policy with an eager stand-in for the graph: eager first, captured at the second use,
replayed after, keyed by state and bucket.
"""

import math

import os

import pytest
import torch

from mamba2_cli import stream_generate
from mamba2_cli.bench import _NullTokenizer
from mamba2_cli.checkpoint import random_model
from mamba2_cli.config import Mamba2Config
from mamba2_cli.generation import PrefillGraphs, prefill, runner_for
from mamba2_cli.kernels.triton import configs as triton_configs
from mamba2_cli.kernels import pytorch
from reference import rel_err

BACKENDS = ["torch", "triton"]


def backend(name):
    if name == "torch":
        return pytorch
    need_interpreter(name)
    from mamba2_cli.kernels import triton as triton_backend

    return triton_backend


def need_interpreter(backend_name):
    # On a GPU machine triton is compiled for the GPU; these CPU checks are for the interpreter
    # (CI), and tests/test_model_gpu.py covers the GPU.
    if backend_name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend on CPU tensors needs TRITON_INTERPRET=1")


def tiny_model(backend_name, n_layer=2, seed=0):
    need_interpreter(backend_name)
    # fp64 for the torch backend (the comparisons are then at rounding level); the
    # interpreter's triton kernels take fp32.
    cfg = Mamba2Config(d_model=32, n_layer=n_layer, vocab_size=50, d_state=16, headdim=16, chunk_size=16,
                       ngroups=2)
    dtype = torch.float64 if backend_name == "torch" else torch.float32
    model = random_model(cfg, torch.device("cpu"), dtype, seed)
    model.set_backend(backend_name)
    return model


def tol(backend_name):
    return 1e-12 if backend_name == "torch" else 1e-5


def random_state(model, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    st = model.new_state(batch)
    st.conv.copy_(torch.randn(st.conv.shape, generator=g))
    st.ssm.copy_(torch.randn(st.ssm.shape, generator=g))
    return st


def attach_stand_in(model, buckets=(8, 24)):
    graphs = PrefillGraphs(model, buckets=buckets, stand_in=True)
    runner_for(model).prefill_graphs = graphs
    return graphs


# --- the backend operations with seq_len


@pytest.fixture
def nan_poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled tensors, so an output a kernel leaves unwritten shows."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("name", BACKENDS)
def test_ssd_prefill_never_reads_padding_and_updates_the_state_in_place(name, nan_poisoned_empty):
    be = backend(name)
    b, T, H, P, G, N = 3, 24, 4, 16, 2, 16
    lens = [5, 0, 17]
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(b, T, H, P, generator=g), torch.randn(b, T, H, generator=g)
    Bm, Cm = torch.randn(b, T, G, N, generator=g), torch.randn(b, T, G, N, generator=g)
    A, D, dt_bias = -torch.exp(torch.randn(H, generator=g) * 0.5), torch.randn(H, generator=g), torch.randn(H, generator=g)
    init = torch.randn(b, H, P, N, generator=g)
    for i, n in enumerate(lens):  # padding full of NaN: a single read of it would show
        for t in (x, dt, Bm, Cm):
            t[i, n:] = math.nan
    state = init.clone()
    y, final = be.ssd_prefill(x, dt, A, Bm, Cm, D, dt_bias, (0.0, math.inf), 16, initial_state=state,
                              seq_len=torch.tensor(lens), final_state=state)
    assert final.data_ptr() == state.data_ptr()
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(state[i], init[i])  # nothing real: the state is left as it was
        else:
            y1, s1 = be.ssd_prefill(x[i : i + 1, :n], dt[i : i + 1, :n], A, Bm[i : i + 1, :n], Cm[i : i + 1, :n], D,
                                    dt_bias, (0.0, math.inf), 16, initial_state=init[i : i + 1].clone())
            assert rel_err(y[i : i + 1, :n], y1) < 1e-5
            assert rel_err(state[i : i + 1], s1) < 1e-5
        assert torch.equal(y[i, n:], torch.zeros_like(y[i, n:]))  # padding's y is zero, not stale memory


@pytest.mark.parametrize("name", BACKENDS + ["triton-rows"])
def test_causal_conv1d_state_is_taken_at_each_rows_length(name, nan_poisoned_empty, monkeypatch):
    if name == "triton-rows":  # the row-walking conv kernel: 8 positions x 16 channels per program
        need_interpreter("triton")
        monkeypatch.setitem(triton_configs.CONV, "rows", {"ROWS": 8, "BLOCK_C": 16, "num_warps": 1})
        name = "triton"
    be = backend(name)
    b, T, Cdim, K = 6, 45, 40, 4
    lens = [0, 1, 2, 3, 33, 45]  # shorter than the window (old state kept in part), several blocks, full
    g = torch.Generator().manual_seed(0)
    xBC, w, bias = torch.randn(b, T, Cdim, generator=g), torch.randn(Cdim, K, generator=g), torch.randn(Cdim, generator=g)
    cs0 = torch.randn(b, Cdim, K - 1, generator=g)
    for i, n in enumerate(lens):
        xBC[i, n:] = math.nan
    cs = cs0.clone()
    out = be.causal_conv1d(xBC, w, bias, cs, seq_len=torch.tensor(lens))
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(cs[i], cs0[i])
            continue
        cs1 = cs0[i : i + 1].clone()
        out1 = pytorch.causal_conv1d(xBC[i : i + 1, :n], w, bias, cs1)
        assert torch.equal(cs[i : i + 1], cs1)
        assert rel_err(out[i : i + 1, :n], out1) < 1e-6


@pytest.mark.parametrize("width,rows", [(3, None), (4, {"ROWS": 16, "BLOCK_C": 32, "num_warps": 1}),
                                        (4, {"ROWS": 16, "BLOCK_C": 16, "num_warps": 1}),
                                        (4, {"ROWS": 4, "BLOCK_C": 32, "num_warps": 1})],
                         ids=["tile-width-3", "rows-16x32", "rows-16x16", "rows-4x32"])
def test_triton_conv_forms_agree(width, rows, monkeypatch):
    """The tile kernel (widths other than 4) and the row-walking kernel at several layouts
    give the torch backend's output and conv state."""
    need_interpreter("triton")
    from mamba2_cli.kernels import triton as triton_backend

    if rows is not None:
        monkeypatch.setitem(triton_configs.CONV, "rows", rows)
    g = torch.Generator().manual_seed(3)
    xBC, w, bias = torch.randn(2, 70, 40, generator=g), torch.randn(40, width, generator=g), torch.randn(40, generator=g)
    cs = torch.randn(2, 40, width - 1, generator=g)
    cs_ref = cs.clone()
    out = triton_backend.causal_conv1d(xBC, w, bias, cs)
    out_ref = pytorch.causal_conv1d(xBC, w, bias, cs_ref)
    assert rel_err(out, out_ref) < 1e-6
    assert torch.equal(cs, cs_ref)


# --- the model with seq_len


@pytest.mark.parametrize("name", BACKENDS)
def test_padded_sequences_of_different_lengths_equal_each_prompt_alone(name):
    model = tiny_model(name)
    lens, T = [3, 9], 16
    ids = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(4))
    state = random_state(model, 2)
    want = []
    for i, n in enumerate(lens):
        one = random_state(model, 2).sequence(i)  # the same start as sequence i of `state`
        want.append((model(ids[i : i + 1, :n], one, logits_to_keep=1)[:, -1], one.conv.clone(), one.ssm.clone()))
    with torch.inference_mode():
        logits = model(ids, state, logits_to_keep=1, seq_len=torch.tensor(lens))[:, -1]
    assert logits.shape == (2, 50)
    for i, (lg, conv, ssm) in enumerate(want):
        assert rel_err(logits[i : i + 1], lg) < tol(name)
        assert rel_err(state.conv[:, i : i + 1], conv) < tol(name)
        assert rel_err(state.ssm[:, i : i + 1], ssm) < tol(name)


@pytest.mark.parametrize("name", BACKENDS)
def test_length_zero_leaves_the_state_exactly_as_it_was(name):
    model = tiny_model(name)
    state = random_state(model, 1)
    before = state.clone()
    with torch.inference_mode():
        model(torch.randint(0, 50, (1, 8)), state, logits_to_keep=1, seq_len=torch.tensor([0]))
    assert torch.equal(state.conv, before.conv) and torch.equal(state.ssm, before.ssm)


# --- the runner, with an eager stand-in for the CUDA graph


@pytest.mark.parametrize("name", BACKENDS)
def test_graph_runner_equals_plain_prefill_eager_then_captured_then_replayed(name):
    model = tiny_model(name)
    graphs = attach_stand_in(model)
    ids = torch.randint(0, 50, (1, 13), generator=torch.Generator().manual_seed(5))
    ref_state = random_state(model, 1)
    ref = prefill(model, ids, ref_state)  # no graphs
    state = model.new_state(1)
    for call, captures in enumerate([0, 1, 1]):
        state.copy_(random_state(model, 1))
        logits = prefill(model, ids, state, cuda_graph=True)
        assert graphs.captures == captures, f"call {call}"
        assert rel_err(logits, ref) < tol(name)
        assert rel_err(state.conv, ref_state.conv) < tol(name) and rel_err(state.ssm, ref_state.ssm) < tol(name)
    assert list(graphs.entries) == [graphs.key(state, 24)]


def test_graph_runner_keys_by_state_and_bucket_and_skips_what_it_does_not_serve():
    model = tiny_model("torch")
    graphs = attach_stand_in(model)
    a, b = model.new_state(1), model.new_state(1)
    ids = torch.randint(0, 50, (1, 30))
    for st, L in ((a, 5), (a, 8), (a, 9), (b, 5), (a, 1), (a, 30)):
        prefill(model, ids[:, :L], st, cuda_graph=True)
    # 5 and 8 share a's 8-token bucket; 9 is a's 24 bucket; b has its own; 1 token (the decode
    # path) and 30 (past the largest bucket) run eagerly without an entry.
    assert set(graphs.entries) == {graphs.key(a, 8), graphs.key(a, 24), graphs.key(b, 8)}
    assert graphs.captures == 1  # a's 8 bucket, at its second use
    prefill(model, ids[:, :5], a, cuda_graph=False)
    assert graphs.captures == 1


def test_a_shorter_prompt_after_a_longer_one_ignores_the_old_ids():
    model = tiny_model("torch")
    attach_stand_in(model)
    state = model.new_state(1)
    g = torch.Generator().manual_seed(6)
    for L in (20, 11, 20, 3, 17):  # one 24-token bucket: captured at the second call, stale ids behind
        ids = torch.randint(0, 50, (1, L), generator=g)
        state.reset()
        got = prefill(model, ids, state, cuda_graph=True)
        ref_state = model.new_state(1)
        ref = prefill(model, ids, ref_state)
        assert rel_err(got, ref) < 1e-12 and rel_err(state.ssm, ref_state.ssm) < 1e-12


def test_prepare_drops_graphs_that_hold_old_tensors(take_graphs):
    model = tiny_model("torch")
    graphs = attach_stand_in(model)
    runner = take_graphs(model, lambda model, state, greedy=False: object())
    state = model.new_state(1)
    runner.decode_graph(state)
    ids = torch.randint(0, 50, (1, 5))
    for _ in range(2):
        prefill(model, ids, state, cuda_graph=True)
    assert graphs.captures == 1 and runner.decode_graphs
    model.prepare()  # weights replaced: every graph of the old ones goes with the old runner
    fresh = runner_for(model)
    assert fresh is not runner and fresh.prefill_graphs is None and not fresh.decode_graphs
    assert not any(k.startswith("_") and k.endswith("_graphs") for k in model.__dict__)


def test_the_runner_does_not_keep_its_model_alive():
    import gc
    import weakref

    model = tiny_model("torch")
    attach_stand_in(model)
    state = model.new_state(1)
    for _ in range(2):  # eager, then captured
        prefill(model, torch.randint(0, 50, (1, 5)), state, cuda_graph=True)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


# --- the generation loop


def test_loop_with_prefill_graphs_gives_the_tokens_of_the_eager_loop():
    model = tiny_model("torch")
    graphs = attach_stand_in(model, buckets=(16, 64))
    prompt = torch.randint(0, 50, (20,), generator=torch.Generator().manual_seed(7)).tolist()

    def tokens(cuda_graph):
        evs = stream_generate(model, _NullTokenizer(), prompt, max_tokens=6, ignore_eos=True, cuda_graph=cuda_graph)
        return [e.token_id for e in evs if e.token_id is not None]

    want = tokens(False)
    assert [tokens(True) for _ in range(3)] == [want] * 3
    assert graphs.captures == 1 and list(graphs.entries) == [graphs.key(runner_for(model).owned_state(1), 64)]


def test_first_token_is_handed_out_before_the_next_step_is_issued():
    model = tiny_model("torch")
    steps = []
    forward = model.forward

    def counting(input_ids, state, *a, **kw):
        if input_ids.shape[1] == 1:
            steps.append(1)
        return forward(input_ids, state, *a, **kw)

    model.forward = counting
    seen = []
    for ev in stream_generate(model, _NullTokenizer(), [1, 2, 3, 4], max_tokens=4, ignore_eos=True):
        if ev.token_id is not None:
            seen.append(len(steps))
    # The first token arrives before any decode step; later ones while the next step runs.
    assert seen == [0, 2, 3, 3]
