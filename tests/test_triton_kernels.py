"""The triton backend against the torch reference and the float64 recurrence, small shapes.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1,
set here before Triton is imported). The interpreter computes tl.dot on bf16 wrongly, so
bf16 runs only on a GPU (tests/test_triton_gpu.py). Every output the kernels allocate lies
between guard regions and is poisoned with NaN (reference.Guards): an element a kernel
forgets to write fails the comparison, and a write outside the output fails the test.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba2_cli.errors import Mamba2Error  # noqa: E402
from mamba2_cli.kernels import pytorch  # noqa: E402
from reference import SSD_ENTRIES, Guards, rel_err, sequential_ssd, ssd_entry, triton_module  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INF = float("inf")


@pytest.fixture(scope="module")
def tb():
    """The triton backend; a missing Triton skips, except under CI=true where it fails."""
    return triton_module()


@pytest.fixture(autouse=True)
def guards(monkeypatch):
    """torch.empty hands out NaN-poisoned tensors between guard regions (the decode step's
    scratch buffers too: its cache starts empty); every guard is checked after the test."""
    g = Guards().install(monkeypatch)
    real_empty_like = torch.empty_like

    def empty_like(t, *, dtype=None, device=None, **kw):
        if kw or not t.is_contiguous():
            return real_empty_like(t, dtype=dtype, device=device, **kw)
        return g.empty(t.shape, dtype=dtype or t.dtype, device=device or t.device)

    monkeypatch.setattr(torch, "empty_like", empty_like)
    if importlib.util.find_spec("triton") is not None:
        from mamba2_cli.kernels.triton import decode_step

        monkeypatch.setattr(decode_step, "_scratch", {})
    yield g
    g.finish()


def ssd_inputs(b, L, H, P, G, N, dtype, *, D_per_channel=False, init=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    return dict(
        x=rn(b, L, H, P).to(dtype),
        dt=rn(b, L, H),
        A=-torch.exp(rn(H, scale=0.5)),
        B=rn(b, L, G, N).to(dtype),
        C=rn(b, L, G, N).to(dtype),
        D=rn(H, P) if D_per_channel else rn(H),
        dt_bias=rn(H, scale=0.5) - 1.0,
        initial_state=rn(b, H, P, N) if init else None,
    )


def run_ssd(fn, inp, dt_limit=(0.0, INF), chunk_size=16, **kw):
    return fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["dt_bias"], dt_limit,
              chunk_size, inp["initial_state"], **kw)


def assert_each_sequence_alone(inp, state0, lens, y, state):
    """Each sequence's first lens[i] outputs and final state are those of its prefix run alone
    from its own initial state (state0), and its outputs past the length are zero."""
    for row, n in enumerate(lens.tolist()):
        one = {k: (v[row : row + 1, :n] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
        one["initial_state"] = state0[row : row + 1]
        y_ref, state_ref = sequential(one)
        assert rel_err(y[row : row + 1, :n].cpu(), y_ref) < 1e-4
        assert rel_err(state[row : row + 1].cpu(), state_ref) < 1e-4
        assert torch.all(y[row, n:] == 0)


def sequential(inp, dt_limit=(0.0, INF)):
    cpu = {k: (v.cpu() if v is not None else None) for k, v in inp.items()}
    return sequential_ssd(cpu["x"], cpu["dt"], cpu["A"], cpu["B"], cpu["C"], cpu["D"], cpu["dt_bias"], dt_limit,
                          cpu["initial_state"])


# (b, L, H, P, G, N): ragged L (not a multiple of the kernel's chunk), G > 1, P != N, batch > 1.
SSD_SHAPES = [
    (2, 70, 4, 32, 2, 16),
    (1, 5, 2, 16, 1, 32),
    (1, 130, 4, 16, 4, 16),
]


@pytest.mark.parametrize("shape", SSD_SHAPES, ids=lambda s: "b{}-L{}-H{}-P{}-G{}-N{}".format(*s))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)], ids=["fp32", "fp16"])
def test_ssd_prefill_matches_float64_recurrence(tb, shape, dtype, tol):
    inp = ssd_inputs(*shape, dtype, D_per_channel=shape[0] == 1)
    y, state = run_ssd(tb.ssd_prefill, inp)
    y_ref, state_ref = sequential(inp)
    assert y.dtype == dtype and y.shape == inp["x"].shape
    assert state.dtype == torch.float32 and state.shape == state_ref.shape
    assert rel_err(y.cpu(), y_ref) < tol
    assert rel_err(state.cpu(), state_ref) < tol


def test_ssd_prefill_matches_torch_reference_without_initial_state(tb):
    inp = ssd_inputs(2, 37, 4, 16, 2, 32, torch.float32, init=False, seed=1)
    y, state = run_ssd(tb.ssd_prefill, inp)
    y_ref, state_ref = run_ssd(pytorch.ssd_prefill, inp)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(state, state_ref) < 1e-5


def test_ssd_prefill_applies_dt_limit(tb):
    inp = ssd_inputs(1, 40, 2, 16, 1, 16, torch.float32, seed=2)
    limit = (0.05, 0.3)
    y, state = run_ssd(tb.ssd_prefill, inp, dt_limit=limit)
    y_ref, state_ref = sequential(inp, dt_limit=limit)
    assert rel_err(y.cpu(), y_ref) < 1e-5
    assert rel_err(state.cpu(), state_ref) < 1e-5


@pytest.mark.parametrize(
    "config",
    [
        {"CB_PRECOMPUTED": False},
        {"CHUNK": 32, "BLOCK_P": 16},
        {"CHUNK": 16, "BLOCK_P": 32, "CB_PRECOMPUTED": False},
        {"CHUNK": 32, "BLOCK_P": 64, "num_stages": 3},
        {"CHUNK": 32, "BLOCK_P": 64, "num_stages": 3, "CB_PRECOMPUTED": False},
    ],
    ids=["cb-inline", "chunk32-p16", "chunk16-inline", "many-programs-prepass", "many-programs-cb-inline"],
)
def test_ssd_prefill_configs_give_the_same_result(tb, config):
    inp = ssd_inputs(2, 45, 4, 32, 2, 16, torch.float32, seed=3)
    y, state = run_ssd(tb.ssd_prefill, inp, config=config)
    y_ref, state_ref = run_ssd(tb.ssd_prefill, inp)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(state, state_ref) < 1e-5


def test_ssd_prefill_many_programs_configuration_matches_float64_recurrence(tb, monkeypatch):
    # Large batches switch to the "many" configuration; fp16, since fp32 inputs have their own.
    from mamba2_cli.kernels.triton import configs

    monkeypatch.setitem(configs.SSD["rules"], "many_programs", 1)
    inp = ssd_inputs(2, 70, 4, 32, 2, 16, torch.float16, seed=10)
    y, state = run_ssd(tb.ssd_prefill, inp)
    y_ref, state_ref = sequential(inp)
    assert rel_err(y.cpu(), y_ref) < 5e-3
    assert rel_err(state.cpu(), state_ref) < 5e-3


def test_ssd_scan_configuration_rules():
    # Which configuration each workload gets (ssd.choose_config, configs.SSD).
    pytest.importorskip("triton")
    from mamba2_cli.kernels.triton import configs, ssd

    bf16 = torch.bfloat16
    pick = ssd.choose_config
    # Codestral's layer (H 128, P 64) at batch 1: cut into 4 segments from 2048 tokens on.
    for L in (2048, 4096, 16384, 65536):
        cfg = pick(1, 128, 64, L, bf16)
        assert cfg["SEGMENTS"] == 4 and cfg["CHUNK"] == 32 and not cfg["CB_PRECOMPUTED"]
        assert cfg["states"] == configs.SSD["many_states"]
    # Shorter prompts (fewer than 4 segments of 16 chunks) keep the batch-1 configuration.
    for L in (1, 64, 1024, 2016):
        assert pick(1, 128, 64, L, bf16) == configs.SSD["few"]
    # Batch 2 and more: the many-programs configuration, whole.
    for b in (2, 3, 8):
        cfg = pick(b, 128, 64, 4096, bf16)
        assert cfg == {**configs.SSD["few"], **configs.SSD["many"]}
    # mamba2-130m's layer (24 heads): as many segments as fill 512 programs, if L allows.
    assert pick(1, 24, 64, 16384, bf16)["SEGMENTS"] == 21
    assert pick(1, 24, 64, 2048, bf16)["SEGMENTS"] == 4
    # fp32 inputs keep their own configuration (C B^T from the pre-pass).
    cfg = pick(1, 128, 64, 16384, torch.float32)
    assert cfg["CHUNK"] == 64 and cfg["CB_PRECOMPUTED"] and cfg.get("SEGMENTS") is None


def test_ssd_prefill_batch1_segments_configuration_matches_float64_recurrence(tb, monkeypatch):
    # The batch-1 rule (many-programs configuration, sequence cut into segments), scaled down:
    # chunk 16 and segments of at least 2 chunks, so a 150-token prompt gets 5 segments.
    from mamba2_cli.kernels.triton import configs, ssd

    monkeypatch.setitem(configs.SSD["many"], "CHUNK", 16)
    monkeypatch.setitem(configs.SSD["few"], "SPLIT_MIN_CHUNKS", 2)
    assert ssd.choose_config(1, 4, 32, 150, torch.float16)["SEGMENTS"] == 5
    inp = ssd_inputs(1, 150, 4, 32, 2, 16, torch.float16, seed=13)
    y, state = run_ssd(tb.ssd_prefill, inp)
    y_ref, state_ref = sequential(inp)
    assert rel_err(y.cpu(), y_ref) < 5e-3
    assert rel_err(state.cpu(), state_ref) < 5e-3


@pytest.mark.parametrize(
    "segments, L, init, cfg",
    [
        (2, 70, True, {}),
        (3, 45, False, {}),
        (4, 16 * 7 + 5, True, {"states": {"STATE_T": False}}),
        (5, 33, True, {"states": {"BLOCK_P": 16, "STATE_T": False}}),
    ],
    ids=["two", "three-no-init", "four-ragged", "five-p16-states"],
)
def test_ssd_prefill_split_sequence_matches_float64_recurrence(tb, segments, L, init, cfg):
    # The sequence cut into segments: a states-only pass over all but the last, then every
    # segment from its composed state. Chunk 16 so that short sequences have several.
    inp = ssd_inputs(2, L, 4, 32, 2, 16, torch.float32, init=init, seed=11)
    y, state = run_ssd(tb.ssd_prefill, inp, config={"CHUNK": 16, "SEGMENTS": segments, **cfg})
    y_ref, state_ref = sequential(inp)
    assert rel_err(y.cpu(), y_ref) < 1e-4
    assert rel_err(state.cpu(), state_ref) < 1e-4


def test_ssd_prefill_split_sequence_with_lengths_and_the_state_in_place(tb):
    # Padded rows (seq_len) and the final state written over the initial one: the split path
    # must not let the last segment overwrite what the first segments still read.
    inp = ssd_inputs(2, 64, 2, 16, 1, 16, torch.float32, seed=12)
    lens = torch.tensor([64, 29], device=DEVICE)
    state0 = inp["initial_state"].clone()
    y, state = run_ssd(tb.ssd_prefill, inp, seq_len=lens, final_state=inp["initial_state"],
                       config={"CHUNK": 16, "SEGMENTS": 4})
    assert state.data_ptr() == inp["initial_state"].data_ptr()
    assert_each_sequence_alone(inp, state0, lens, y, state)


def test_ssd_prefill_splits_small_grids_by_rule():
    from mamba2_cli.kernels.triton import configs, ssd

    cfg = {"SPLIT_PROGRAMS": 512, "SPLIT_MIN_CHUNKS": 16}
    assert ssd._segments(cfg, 256, 256) == 2  # batch 1, L 16384: two segments of 128 chunks
    assert ssd._segments(cfg, 256, 20) == 1  # too short to split
    assert ssd._segments(cfg, 2048, 256) == 1  # batch 8: enough programs already
    assert ssd._segments({**cfg, "SEGMENTS": 3}, 2048, 256) == 3
    assert ssd._segments({"SPLIT_PROGRAMS": 0}, 1, 1000) == 1
    # The defaults: Codestral at batch 1 (128 heads x 2 P blocks) stays whole; a 24-head
    # model at batch 1 splits a long prompt in 5, a 4096-token one in 4.
    assert ssd._segments(configs.SSD["few"], 256, 256) == 1
    assert ssd._segments(configs.SSD["few"], 48, 256) == 5
    assert ssd._segments(configs.SSD["few"], 48, 64) == 4


def test_ssd_prefill_in_pieces_equals_whole(tb):
    inp = ssd_inputs(1, 50, 2, 16, 2, 16, torch.float32, seed=4)
    y, state = run_ssd(tb.ssd_prefill, inp)
    cut = 23
    first = {k: (v[:, :cut] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    rest = {k: (v[:, cut:] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    y1, s1 = run_ssd(tb.ssd_prefill, first)
    rest["initial_state"] = s1
    y2, s2 = run_ssd(tb.ssd_prefill, rest)
    assert rel_err(torch.cat([y1, y2], dim=1), y) < 1e-5
    assert rel_err(s2, state) < 1e-5


def test_ssd_prefill_reads_strided_views(tb):
    # As the model calls it: x, B, C are views into one conv output, dt a view into in_proj's.
    b, L, H, P, G, N = 1, 33, 4, 16, 2, 16
    inp = ssd_inputs(b, L, H, P, G, N, torch.float32, seed=5)
    xBC = torch.cat([inp["x"].reshape(b, L, H * P), inp["B"].reshape(b, L, G * N), inp["C"].reshape(b, L, G * N)], -1)
    wide_dt = torch.cat([torch.randn(b, L, 7, device=DEVICE), inp["dt"]], -1)
    x, B, C = torch.split(xBC, [H * P, G * N, G * N], dim=-1)
    y, state = tb.ssd_prefill(x.reshape(b, L, H, P), wide_dt[..., 7:], inp["A"], B.reshape(b, L, G, N),
                              C.reshape(b, L, G, N), inp["D"], inp["dt_bias"], (0.0, INF), 16, inp["initial_state"])
    y_ref, state_ref = run_ssd(pytorch.ssd_prefill, inp)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(state, state_ref) < 1e-5


def test_ssd_prefill_rejects_mismatched_shapes(tb):
    inp = ssd_inputs(1, 8, 4, 16, 2, 16, torch.float32)
    with pytest.raises(Mamba2Error, match="ngroups"):
        tb.ssd_prefill(inp["x"], inp["dt"], inp["A"], inp["B"][:, :, :1].expand(1, 8, 3, 16).contiguous(),
                       inp["C"][:, :, :1].expand(1, 8, 3, 16).contiguous(), inp["D"], inp["dt_bias"], (0.0, INF), 16)
    with pytest.raises(Mamba2Error, match="initial_state"):
        tb.ssd_prefill(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["dt_bias"], (0.0, INF), 16,
                       inp["initial_state"].double())


def step_inputs(b, H, P, G, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    return dict(x=rn(b, H, P).to(dtype), dt=rn(b, H), A=-torch.exp(rn(H, scale=0.5)), B=rn(b, G, N).to(dtype),
                C=rn(b, G, N).to(dtype), D=rn(H), dt_bias=rn(H, scale=0.5) - 1.0, ssm_state=rn(b, H, P, N))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_ssd_decode_step_matches_reference(tb, dtype, tol):
    inp = step_inputs(2, 4, 32, 2, 16, dtype)
    ref_state = inp["ssm_state"].clone()
    args = [inp[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")] + [(0.0, INF)]
    y = tb.ssd_decode_step(*args, inp["ssm_state"])
    y_ref = pytorch.ssd_decode_step(*args, ref_state)
    assert y.dtype == dtype
    assert rel_err(y, y_ref) < tol
    assert rel_err(inp["ssm_state"], ref_state) < 1e-6


def conv_inputs(b, L, Cdim, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, L, Cdim, generator=g).to(DEVICE, dtype), torch.randn(Cdim, K, generator=g).to(DEVICE, dtype),
            torch.randn(Cdim, generator=g).to(DEVICE, dtype),
            torch.randn(b, Cdim, K - 1, generator=g).to(DEVICE, dtype))


@pytest.mark.parametrize("L", [2, 41], ids=["L-shorter-than-window", "L41"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_causal_conv1d_matches_reference(tb, L, dtype, tol):
    xBC, w, bias, cs = conv_inputs(2, L, 40, 4, dtype)
    wide = torch.cat([xBC, torch.randn(2, L, 5, device=DEVICE).to(dtype)], -1)[..., :40]  # a strided view
    cs_ref = cs.clone()
    out = tb.causal_conv1d(wide, w, bias, cs)
    out_ref = pytorch.causal_conv1d(xBC.clone(), w, bias, cs_ref)
    assert rel_err(out, out_ref) < tol
    assert torch.equal(cs, cs_ref)


def test_conv1d_step_matches_reference(tb):
    xBC, w, bias, cs = conv_inputs(3, 1, 300, 4, torch.float32)
    cs_ref = cs.clone()
    out = tb.conv1d_step(xBC[:, 0], w, None, cs)
    out_ref = pytorch.conv1d_step(xBC[:, 0], w, None, cs_ref)
    assert rel_err(out, out_ref) < 1e-6
    assert torch.equal(cs, cs_ref)


def mixer_inputs(b, H, P, G, N, K, dtype, D_per_channel=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    d_inner = H * P
    conv_dim = d_inner + 2 * G * N
    return dict(
        conv_weight=rn(conv_dim, K, scale=0.5).to(dtype), conv_bias=rn(conv_dim).to(dtype),
        conv_state=rn(b, conv_dim, K - 1).to(dtype), A=-torch.exp(rn(H, scale=0.5)),
        D=rn(H, P) if D_per_channel else rn(H), dt_bias=rn(H, scale=0.5) - 1.0,
        norm_weight=(1.0 + rn(d_inner, scale=0.1)).to(dtype), ssm_state=rn(b, H, P, N),
    ), (lambda: rn(b, 2 * d_inner + 2 * G * N + H).to(dtype))


def run_mixer(fn, st, zxbcdt, G, nbg, dt_limit=(0.0, INF), **kw):
    return fn(zxbcdt, st["conv_weight"], st["conv_bias"], st["conv_state"], st["A"], st["D"], st["dt_bias"],
              dt_limit, st["norm_weight"], st["ssm_state"], G, 1e-5, nbg, **kw)


@pytest.mark.parametrize(
    "b,H,P,G,N,nbg,block_p",
    [
        (2, 4, 32, 2, 16, False, None),
        (1, 4, 16, 1, 32, True, None),
        (3, 6, 32, 3, 16, False, 16),  # a head split over two programs
    ],
    ids=["G2", "G1-norm-before-gate", "split-P"],
)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)], ids=["fp32", "fp16"])
def test_mixer_decode_step_matches_reference_over_steps(tb, b, H, P, G, N, nbg, block_p, dtype, tol):
    st, draw = mixer_inputs(b, H, P, G, N, 4, dtype, D_per_channel=nbg)
    ref = {k: v.clone() for k, v in st.items()}
    limit = (0.01, 2.0) if nbg else (0.0, INF)
    for _ in range(3):  # consecutive calls: the conv window shifts, the arrival counters reset
        zxbcdt = draw()
        out = run_mixer(tb.mixer_decode_step, st, zxbcdt, G, nbg, limit,
                        config={"BLOCK_P": block_p} if block_p else None)
        out_ref = run_mixer(pytorch.mixer_decode_step, ref, zxbcdt, G, nbg, limit)
        assert out.dtype == dtype and out.shape == (b, H * P)
        assert rel_err(out, out_ref) < tol
        assert rel_err(st["ssm_state"], ref["ssm_state"]) < tol  # fp16: the reference convolves in fp16
        assert torch.equal(st["conv_state"], ref["conv_state"])


@pytest.mark.parametrize("b,H,P,G,N,nbg,block_p", [
    (2, 4, 32, 2, 16, False, 8),
    (1, 4, 16, 1, 32, True, 4),
    (3, 6, 32, 3, 16, False, 16),
], ids=["G2-p8", "G1-norm-before-gate-p4", "G3-p16"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)], ids=["fp32", "fp16"])
def test_split_mixer_decode_step_matches_reference_and_the_fused_step(tb, b, H, P, G, N, nbg, block_p, dtype, tol):
    # The gated norm as a second kernel ("split") instead of the group's last program.
    st, draw = mixer_inputs(b, H, P, G, N, 4, dtype, D_per_channel=nbg, seed=11)
    fused = {k: v.clone() for k, v in st.items()}
    ref = {k: v.clone() for k, v in st.items()}
    limit = (0.01, 2.0) if nbg else (0.0, INF)
    for _ in range(3):
        zxbcdt = draw()
        out = run_mixer(tb.mixer_decode_step, st, zxbcdt, G, nbg, limit,
                        config={"split": True, "BLOCK_P": block_p, "num_warps": 1, "norm_warps": 2})
        out_fused = run_mixer(tb.mixer_decode_step, fused, zxbcdt, G, nbg, limit,
                              config={"BLOCK_P": block_p, "split": False})
        out_ref = run_mixer(pytorch.mixer_decode_step, ref, zxbcdt, G, nbg, limit)
        assert out.dtype == dtype and out.shape == (b, H * P)
        assert rel_err(out, out_ref) < tol
        assert rel_err(st["ssm_state"], ref["ssm_state"]) < tol
        assert torch.equal(st["conv_state"], ref["conv_state"])
        # Same sums in the same order: the split changes where the norm runs, not its result.
        assert torch.equal(out, out_fused) and torch.equal(st["ssm_state"], fused["ssm_state"])


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("nbg", [False, True], ids=["gate-then-norm", "norm-then-gate"])
def test_mixer_decode_step_with_dependent_launch_gives_the_same_steps(tb, split, nbg):
    # "pdl": on a GPU the step is launched early and loads its state before waiting (a no-op
    # in the interpreter). Consecutive steps read what the last one wrote.
    st, draw = mixer_inputs(2, 4, 32, 2, 16, 4, torch.float32, seed=12)
    plain = {k: v.clone() for k, v in st.items()}
    for _ in range(3):
        zxbcdt = draw()
        out = run_mixer(tb.mixer_decode_step, st, zxbcdt, 2, nbg, config={"pdl": True, "split": split})
        out_plain = run_mixer(tb.mixer_decode_step, plain, zxbcdt, 2, nbg, config={"pdl": False, "split": split})
        assert torch.equal(out, out_plain)
        assert torch.equal(st["ssm_state"], plain["ssm_state"]) and torch.equal(st["conv_state"], plain["conv_state"])


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_mixer_decode_step_state_settled_gives_the_same_steps(tb, split):
    # state_settled (decode's promise that no kernel just before wrote the state): on a GPU
    # under PDL the state is loaded before the wait, and where the entry asks for PDL (so on
    # the CPU too) the conv's state inputs and taps are loaded first; the steps are the same,
    # bit for bit. The torch reference takes the keyword too.
    st, draw = mixer_inputs(2, 4, 32, 2, 16, 4, torch.float32, seed=15)
    plain = {k: v.clone() for k, v in st.items()}
    ref = {k: v.clone() for k, v in st.items()}
    for _ in range(3):
        zxbcdt = draw()
        out = run_mixer(tb.mixer_decode_step, st, zxbcdt, 2, False, state_settled=True,
                        config={"split": split, "pdl": True})
        out_plain = run_mixer(tb.mixer_decode_step, plain, zxbcdt, 2, False, config={"split": split, "pdl": True})
        out_ref = run_mixer(pytorch.mixer_decode_step, ref, zxbcdt, 2, False, state_settled=True)
        assert torch.equal(out, out_plain) and torch.equal(st["ssm_state"], plain["ssm_state"])
        assert torch.equal(st["conv_state"], plain["conv_state"])
        assert rel_err(out, out_ref) < 1e-5


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_mixer_decode_step_with_b_and_c_convolved_first_gives_the_same_steps(tb, split, dtype):
    # "bc_pre": B and C convolved once per group by a first kernel (which shifts
    # their windows) instead of by every head's programs: the same values, bit for bit.
    st, draw = mixer_inputs(3, 6, 32, 3, 16, 4, dtype, seed=13)
    plain = {k: v.clone() for k, v in st.items()}
    ref = {k: v.clone() for k, v in st.items()}
    for _ in range(3):
        zxbcdt = draw()
        out = run_mixer(tb.mixer_decode_step, st, zxbcdt, 3, False,
                        config={"bc_pre": True, "split": split, "BLOCK_P": 16})
        out_plain = run_mixer(tb.mixer_decode_step, plain, zxbcdt, 3, False, config={"BLOCK_P": 16, "bc_pre": False})
        out_ref = run_mixer(pytorch.mixer_decode_step, ref, zxbcdt, 3, False)
        assert torch.equal(out, out_plain)
        assert torch.equal(st["ssm_state"], plain["ssm_state"]) and torch.equal(st["conv_state"], plain["conv_state"])
        assert rel_err(out, out_ref) < (1e-5 if dtype == torch.float32 else 3e-3)
        assert torch.equal(st["conv_state"], ref["conv_state"])


def test_decode_step_configuration_follows_the_batch_size(tb, monkeypatch):
    # configs.DECODE_STEP's entries by batch size; the result is the same.
    from mamba2_cli.kernels.triton import configs, decode_step

    assert [decode_step.entry_for(b) for b in (1, 2, 3, 4, 7, 8, 64)] == \
        ["batch1", "batch2-3", "batch2-3", "batch4-7", "batch4-7", "batch8+", "batch8+"]
    seen = []
    real = decode_step._mixer_step_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((grid, kw["BLOCK_P"], kw["num_warps"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(decode_step, "_mixer_step_kernel", Spy())
    monkeypatch.setitem(configs.DECODE_STEP, "batch2-3", {**configs.DECODE_STEP["batch2-3"], "BLOCK_P": 16, "num_warps": 2})
    for b in (1, 2):
        st, draw = mixer_inputs(b, 4, 32, 2, 16, 4, torch.float32, seed=14)
        ref = {k: v.clone() for k, v in st.items()}
        zxbcdt = draw()
        out = run_mixer(tb.mixer_decode_step, st, zxbcdt, 2, False)
        assert rel_err(out, run_mixer(pytorch.mixer_decode_step, ref, zxbcdt, 2, False)) < 1e-5
    one = configs.DECODE_STEP["batch1"]
    assert seen[0][1:] == (min(one["BLOCK_P"], 32), one["num_warps"])
    assert seen[1][1:] == (16, 2)


def test_mixer_decode_steps_continue_a_prefill(tb):
    # Decoding token by token from a prefill's state gives what a longer prefill gives.
    inp = ssd_inputs(1, 20, 4, 16, 2, 16, torch.float32, seed=6)
    y, state = run_ssd(tb.ssd_prefill, inp)
    head = {k: (v[:, :17] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    _, s = run_ssd(tb.ssd_prefill, head)
    for t in range(17, 20):
        yt = tb.ssd_decode_step(inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                                inp["D"], inp["dt_bias"], (0.0, INF), s)
        assert rel_err(yt, y[:, t]) < 1e-5
    assert rel_err(s, state) < 1e-5


@pytest.mark.parametrize("nbg", [False, True], ids=["gate-then-norm", "norm-then-gate"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_gated_rmsnorm_matches_reference(tb, nbg, dtype, tol):
    g = torch.Generator().manual_seed(7)
    y = torch.randn(2, 5, 96, generator=g).to(DEVICE, dtype)
    zw = torch.randn(2, 5, 130, generator=g).to(DEVICE, dtype)
    z = zw[..., 10:106]  # a strided view, as the split of in_proj's output is
    w = torch.randn(96, generator=g).to(DEVICE, dtype)
    out = tb.gated_rmsnorm(y, z, w, 24, 1e-5, nbg)
    out_ref = pytorch.gated_rmsnorm(y, z, w, 24, 1e-5, nbg)
    assert out.dtype == dtype
    assert rel_err(out, out_ref) < tol


@pytest.mark.parametrize(
    "res_dtype,residual_in_fp32",
    [(None, True), (torch.float32, True), ("x", False), (None, False)],
    ids=["first-layer-fp32", "fp32-residual", "residual-in-x-dtype", "first-layer-x-dtype"],
)
def test_add_rmsnorm_matches_reference(tb, res_dtype, residual_in_fp32):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 100, generator=g).to(DEVICE, torch.float16)
    w = torch.randn(100, generator=g).to(DEVICE, torch.float16)
    residual = None
    if res_dtype is not None:
        residual = torch.randn(3, 2, 100, generator=g).to(DEVICE, x.dtype if res_dtype == "x" else res_dtype)
    out, res = tb.add_rmsnorm(x, residual, w, 1e-5, residual_in_fp32)
    out_ref, res_ref = pytorch.add_rmsnorm(x, residual, w, 1e-5, residual_in_fp32)
    assert out.dtype == out_ref.dtype and res.dtype == res_ref.dtype
    assert rel_err(out, out_ref) < 2e-3
    assert rel_err(res, res_ref) < 1e-6


def test_backend_exposes_the_reference_operations(tb):
    ops = ["ssd_prefill", "ssd_decode_step", "causal_conv1d", "conv1d_step", "gated_rmsnorm", "add_rmsnorm",
           "mixer_decode_step", "norm_linear"]
    assert tb.name == "triton"
    for op in ops:
        assert callable(getattr(tb, op)), op


# Sizes off the blocks: a state size N and head dims P that are neither powers of two nor
# multiples of the blocks the configurations use (N 48 in a block of 64; P 48 in blocks of 16,
# 32 or 64, P 24 in one of 16 or 32), odd numbers of heads and groups, lengths that end inside
# a chunk. Every element past N or P is masked; a mask against the block instead of the size
# reads a neighbour's values and writes past the tensors (the guards). The configurations are
# the tables' own entries, forced through `config`.

# (b, L, H, P, G, N)
OFF_BLOCK_SSD_SHAPES = [(1, 70, 3, 48, 1, 48), (1, 45, 3, 24, 3, 48)]


@pytest.mark.parametrize("init", [True, False], ids=["init", "zero-state"])
@pytest.mark.parametrize("shape", OFF_BLOCK_SSD_SHAPES, ids=lambda s: "b{}-L{}-H{}-P{}-G{}-N{}".format(*s))
@pytest.mark.parametrize("entry", SSD_ENTRIES)
def test_ssd_prefill_off_the_blocks_matches_float64_recurrence(tb, guards, entry, shape, init):
    inp = ssd_inputs(*shape, torch.float32, D_per_channel=shape[3] == 24, init=init, seed=20)
    if init:
        inp["initial_state"] = guards.wrap(inp["initial_state"])
    y, state = run_ssd(tb.ssd_prefill, inp, config=ssd_entry(entry))
    y_ref, state_ref = sequential(inp)
    assert rel_err(y.cpu(), y_ref) < 1e-4
    assert rel_err(state.cpu(), state_ref) < 1e-4
    guards.check()


@pytest.mark.parametrize("entry", SSD_ENTRIES)
def test_ssd_prefill_off_the_blocks_with_lengths_and_the_state_in_place(tb, guards, entry):
    b, L, H, P, G, N = 2, 70, 3, 48, 1, 48
    inp = ssd_inputs(b, L, H, P, G, N, torch.float32, seed=21)
    inp["initial_state"] = guards.wrap(inp["initial_state"])
    state0 = inp["initial_state"].clone()
    lens = torch.tensor([L, 29], device=DEVICE)
    y, state = run_ssd(tb.ssd_prefill, inp, seq_len=lens, final_state=inp["initial_state"], config=ssd_entry(entry))
    assert state.data_ptr() == inp["initial_state"].data_ptr()
    assert_each_sequence_alone(inp, state0, lens, y, state)
    guards.check()


@pytest.mark.parametrize("P,G,settled", [(48, 1, True), (24, 3, False)], ids=["P48-G1-settled", "P24-G3"])
@pytest.mark.parametrize("b,entry", [(1, "batch1"), (2, "batch2-3"), (4, "batch4-7"), (8, "batch8+")],
                         ids=["b1", "b2", "b4", "b8"])
def test_mixer_decode_step_off_the_blocks_at_every_batch_entry(tb, guards, b, entry, P, G, settled):
    # The defaults by batch size: P 48 takes three blocks of 16 at batch 1, one of 64 (48 rows
    # live) at 2 and 4, and a full and a half block of 32 at 8; P 24 a full and a half block
    # of 16, then one block of 32 or 64. The states updated in place lie between guards.
    from mamba2_cli.kernels.triton import decode_step

    assert decode_step.entry_for(b) == entry
    H, N = 3, 48
    st, draw = mixer_inputs(b, H, P, G, N, 4, torch.float32, seed=22)
    st["ssm_state"], st["conv_state"] = guards.wrap(st["ssm_state"]), guards.wrap(st["conv_state"])
    ref = {k: v.clone() for k, v in st.items()}
    for _ in range(2):
        zxbcdt = draw()
        out = run_mixer(tb.mixer_decode_step, st, zxbcdt, G, False, state_settled=settled)
        out_ref = run_mixer(pytorch.mixer_decode_step, ref, zxbcdt, G, False)
        assert rel_err(out, out_ref) < 1e-5
        assert rel_err(st["ssm_state"], ref["ssm_state"]) < 1e-5
        assert torch.equal(st["conv_state"], ref["conv_state"])
    guards.check()


@pytest.mark.parametrize("P,G", [(48, 1), (24, 3)], ids=["P48-G1", "P24-G3"])
def test_ssd_decode_step_off_the_blocks_matches_reference(tb, guards, P, G):
    inp = step_inputs(2, 3, P, G, 48, torch.float32, seed=23)
    inp["ssm_state"] = guards.wrap(inp["ssm_state"])
    ref_state = inp["ssm_state"].clone()
    args = [inp[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")] + [(0.0, INF)]
    y = tb.ssd_decode_step(*args, inp["ssm_state"])
    y_ref = pytorch.ssd_decode_step(*args, ref_state)
    assert rel_err(y, y_ref) < 1e-6
    assert rel_err(inp["ssm_state"], ref_state) < 1e-6
    guards.check()


@pytest.mark.parametrize("with_len", [False, True], ids=["whole", "seq-len"])
@pytest.mark.parametrize("width", [3, 4], ids=["conv-tiles", "conv-rows"])
def test_causal_conv1d_off_the_blocks_matches_reference(tb, guards, width, with_len):
    # 360 channels (P 24, three groups of N 48): blocks of 256 (rows) or 128 (tiles) end
    # inside the channels; 37 positions end inside blocks of 16 rows or 32 positions.
    b, L, Cdim = 2, 37, 3 * 24 + 2 * 3 * 48
    xBC, w, bias, cs = conv_inputs(b, L, Cdim, width, torch.float32, seed=24)
    cs = guards.wrap(cs)
    cs_ref = cs.clone()
    lens = torch.tensor([L, 2], device=DEVICE) if with_len else None
    out = tb.causal_conv1d(xBC, w, bias, cs, lens)
    out_ref = pytorch.causal_conv1d(xBC, w, bias, cs_ref, lens)
    assert rel_err(out[0], out_ref[0]) < 1e-6
    assert rel_err(out[1, :2], out_ref[1, :2]) < 1e-6  # past a row's length the output is unspecified
    assert torch.equal(cs, cs_ref)
    guards.check()


def test_conv1d_step_off_the_blocks_matches_reference(tb, guards):
    xBC, w, bias, cs = conv_inputs(3, 1, 3 * 24 + 2 * 3 * 48, 4, torch.float32, seed=25)
    cs = guards.wrap(cs)
    cs_ref = cs.clone()
    out = tb.conv1d_step(xBC[:, 0], w, bias, cs)
    out_ref = pytorch.conv1d_step(xBC[:, 0], w, bias, cs_ref)
    assert rel_err(out, out_ref) < 1e-6
    assert torch.equal(cs, cs_ref)
    guards.check()


@pytest.mark.parametrize("nbg", [False, True], ids=["gate-then-norm", "norm-then-gate"])
def test_norms_off_the_blocks_match_reference(tb, guards, nbg):
    # Rows of 144 (3 x 48) in a tile of 256; groups of 48 in tiles of 64.
    g = torch.Generator().manual_seed(26)
    x, res, w = (torch.randn(*s, generator=g).to(DEVICE) for s in ((3, 144), (3, 144), (144,)))
    out, r = tb.add_rmsnorm(x, res, w, 1e-5)
    out_ref, r_ref = pytorch.add_rmsnorm(x, res, w, 1e-5)
    assert rel_err(out, out_ref) < 1e-6 and rel_err(r, r_ref) < 1e-6
    y, z = (torch.randn(3, 144, generator=g).to(DEVICE) for _ in range(2))
    o = tb.gated_rmsnorm(y, z, w, 48, 1e-5, nbg)
    assert rel_err(o, pytorch.gated_rmsnorm(y, z, w, 48, 1e-5, nbg)) < 1e-6
    guards.check()
