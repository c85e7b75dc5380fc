"""The triton backend at full Codestral layer shapes on a GPU (marker `gpu`).

H 128, P 64, G 8, N 128, conv width 4, against the float64 recurrence (vectorized over
heads here, on the GPU, so moderate lengths stay fast): rel err <= 1e-2 for bf16 inputs,
<= 1e-4 for fp32. Then sizes off the blocks (N 48, P 48 and 24, odd heads and groups) at
every configuration entry. Every output the kernels allocate lies between guard regions and
is poisoned with NaN (reference.Guards), the in-place states of the tests at both kinds of
sizes lie between guards too, and every guard is checked after each test.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mamba2_cli.kernels import pytorch
from reference import SSD_ENTRIES, Guards, rel_err, sequential_ssd, ssd_entry

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

INF = float("inf")
H, P, G, N, K = 128, 64, 8, 128, 4


def sequential_ssd_heads(x, dt, A, B, C, D, dt_bias, dt_limit, initial_state=None):
    """tests/reference.sequential_ssd with the head loop vectorized, on x's device, float64."""
    x, dt, A, B, C, D, dt_bias = (t.double() for t in (x, dt, A, B, C, D, dt_bias))
    b, L, nh, hp = x.shape
    g, n = B.shape[-2:]
    dt = F.softplus(dt + dt_bias).clamp(min=dt_limit[0], max=dt_limit[1])
    Bh = B.repeat_interleave(nh // g, dim=2)
    Ch = C.repeat_interleave(nh // g, dim=2)
    S = (torch.zeros(b, nh, hp, n, dtype=torch.float64, device=x.device) if initial_state is None
         else initial_state.double().clone())
    Dm = D[:, None] if D.dim() == 1 else D
    y = torch.empty_like(x)
    for t in range(L):
        S = (torch.exp(dt[:, t] * A)[..., None, None] * S
             + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :])
        y[:, t] = torch.einsum("bhpn,bhn->bhp", S, Ch[:, t]) + x[:, t] * Dm
    return y, S


def test_vectorized_reference_matches_sequential_reference():
    g = torch.Generator().manual_seed(0)
    b, L, nh, hp, ng, n = 2, 9, 4, 3, 2, 5
    args = (torch.randn(b, L, nh, hp, generator=g), torch.randn(b, L, nh, generator=g),
            -torch.rand(nh, generator=g), torch.randn(b, L, ng, n, generator=g), torch.randn(b, L, ng, n, generator=g),
            torch.randn(nh, generator=g), torch.randn(nh, generator=g), (0.0, INF),
            torch.randn(b, nh, hp, n, generator=g))
    y, s = sequential_ssd_heads(*args)
    y_ref, s_ref = sequential_ssd(*args)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


@pytest.fixture
def guards(monkeypatch):
    """torch.empty hands out NaN-poisoned tensors between guard regions (the decode step's
    scratch buffers too: its cache starts empty); every guard is checked after the test."""
    from mamba2_cli.kernels.triton import decode_step

    g = Guards().install(monkeypatch)
    monkeypatch.setattr(decode_step, "_scratch", {})
    yield g
    g.finish()


@pytest.fixture
def tb(guards):
    from mamba2_cli.kernels import triton as triton_backend

    return triton_backend


def codestral_ssd_inputs(b, L, dtype, seed, init=True, h=H, p=P, g_=G, n=N):
    """Codestral-like ranges: dt = softplus(raw + bias) mostly in [1e-3, 1e-1], A in [-16, -1].
    Codestral's layer unless h, p, g_, n say otherwise."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    dt_init = torch.exp(torch.rand(h, generator=g, device="cuda") * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(
        x=rn(b, L, h, p).to(dtype), dt=(rn(b, L, h) * 0.5).to(dtype),
        A=-torch.exp(torch.rand(h, generator=g, device="cuda") * math.log(16.0)),
        B=rn(b, L, g_, n).to(dtype), C=rn(b, L, g_, n).to(dtype), D=rn(h),
        dt_bias=dt_init + torch.log(-torch.expm1(-dt_init)),  # inverse softplus
        initial_state=rn(b, h, p, n) * 0.1 if init else None,
    )


def run_ssd(fn, inp, dt_limit=(0.0, INF), **kw):
    return fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["dt_bias"], dt_limit, 256,
              inp["initial_state"], **kw)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float32, 1e-4)],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("b,L,init", [(1, 1000, True), (2, 300, False)], ids=["b1-L1000-init", "b2-L300"])
def test_ssd_prefill_codestral_layer_matches_float64_recurrence(tb, dtype, tol, b, L, init):
    inp = codestral_ssd_inputs(b, L, dtype, seed=L + b, init=init)
    y, state = run_ssd(tb.ssd_prefill, inp)
    y_ref, state_ref = sequential_ssd_heads(**{k: v for k, v in inp.items() if k != "initial_state"},
                                            dt_limit=(0.0, INF), initial_state=inp["initial_state"])
    torch.cuda.synchronize()
    assert rel_err(y, y_ref) <= tol
    assert rel_err(state, state_ref) <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_ssd_prefill_batch1_segments_match_float64_recurrence(tb, dtype):
    # Batch 1 from 2048 tokens on: the many-programs configuration with the sequence cut into
    # segments (a states-only pass, then every segment from its composed state). Ragged L.
    from mamba2_cli.kernels.triton import ssd

    L = 4100
    assert ssd.choose_config(1, H, P, L, dtype).get("SEGMENTS") == 4
    inp = codestral_ssd_inputs(1, L, dtype, seed=41, init=True)
    y, state = run_ssd(tb.ssd_prefill, inp)
    y_ref, state_ref = sequential_ssd_heads(**{k: v for k, v in inp.items() if k != "initial_state"},
                                            dt_limit=(0.0, INF), initial_state=inp["initial_state"])
    torch.cuda.synchronize()
    assert rel_err(y, y_ref) <= 1e-2
    assert rel_err(state, state_ref) <= 1e-2


def test_ssd_prefill_long_bf16_matches_torch_reference(tb):
    # Many chunks in one program: L = 8191 (ragged), batch 2, with an initial state.
    inp = codestral_ssd_inputs(2, 8191, torch.bfloat16, seed=7)
    y, state = run_ssd(tb.ssd_prefill, inp)
    as_fp32 = {k: (v.float() if v is not None else None) for k, v in inp.items()}
    y_ref, state_ref = run_ssd(pytorch.ssd_prefill, as_fp32)
    assert rel_err(y, y_ref) <= 1e-2
    assert rel_err(state, state_ref) <= 1e-2


# Every short length (the prompts a chat sends), and both sides of several chunk boundaries:
# one chunk, a ragged last chunk, exactly full chunks (64 and 32 are the configurations'
# chunks), and more than one chunk.
SWEEP_L = list(range(1, 71)) + [127, 128, 129, 191, 192, 193, 255, 256, 257, 511, 512, 513]


def sweep_lengths(tb, guards, lengths, b, dtype, init):
    """ssd_prefill against pytorch (fp32 math) at each length; returns the failures. The
    guards are checked (and let go) at each length."""
    bad = []
    for L in lengths:
        inp = codestral_ssd_inputs(b, L, dtype, seed=1000 + L, init=init)
        y, state = run_ssd(tb.ssd_prefill, inp)
        try:
            torch.cuda.synchronize()
        except Exception as e:  # a fault poisons the context: name the length, stop here
            raise AssertionError(f"L={L} (earlier failures {bad}): {str(e)[:80]}") from e
        try:
            guards.check()
        except AssertionError as e:
            raise AssertionError(f"L={L}: {e}") from None
        as_fp32 = {k: (v.float() if v is not None else None) for k, v in inp.items()}
        y_ref, state_ref = run_ssd(pytorch.ssd_prefill, as_fp32)
        ey, es = rel_err(y, y_ref), rel_err(state, state_ref)
        if not (ey <= 1e-2 and es <= 1e-2):  # NaN (an unwritten output) fails too
            bad.append((L, f"{ey:.1e}", f"{es:.1e}"))
    return bad


@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "init-state"])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("config", ["default", "many"])
def test_ssd_prefill_length_sweep_matches_torch_reference(tb, guards, monkeypatch, config, b, init):
    """bf16 at Codestral shapes for every L in SWEEP_L against pytorch, rel err <= 1e-2.

    "default" forces configs.SSD["few"] (batch 1 and short prompts; batch 3 would take
    "many"); "many" forces configs.SSD["many"], the configuration of batches from 2
    and, cut into segments, of batch 1's longer prompts, at the same batches. A prompt of one
    chunk compiled as a kernel of its own returns a wrong final state and at times
    faults (an illegal memory access at L=64); the long-length tests above never
    reach that case.
    """
    from mamba2_cli.kernels.triton import configs, ssd

    monkeypatch.setitem(configs.SSD["rules"], "many_programs", 1 if config == "many" else 1 << 30)
    assert all(ssd.choose_config(b, H, P, L, torch.bfloat16).get("SEGMENTS") is None for L in SWEEP_L)
    bad = sweep_lengths(tb, guards, SWEEP_L, b, torch.bfloat16, init)
    assert not bad, f"(L, y err, state err) over 1e-2: {bad}"


@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "init-state"])
def test_ssd_prefill_short_lengths_fp16(tb, guards, init):
    bad = sweep_lengths(tb, guards, [1, 2, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129], 1, torch.float16, init)
    assert not bad, f"(L, y err, state err) over 1e-2: {bad}"


def codestral_mixer(b, dtype, seed, h=H, p=P, g_=G, n=N):
    """A mixer's weights and states (Codestral's layer unless h, p, g_, n say otherwise)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device="cuda") * scale

    d_inner = h * p
    conv_dim = d_inner + 2 * g_ * n
    dt_init = torch.exp(torch.rand(h, generator=g, device="cuda") * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    st = dict(
        conv_weight=rn(conv_dim, K, scale=0.5).to(dtype), conv_bias=rn(conv_dim, scale=0.1).to(dtype),
        conv_state=rn(b, conv_dim, K - 1).to(dtype), A=-torch.exp(torch.rand(h, generator=g, device="cuda") * 2.77),
        D=rn(h), dt_bias=dt_init + torch.log(-torch.expm1(-dt_init)),
        norm_weight=(1.0 + rn(d_inner, scale=0.1)).to(dtype), ssm_state=rn(b, h, p, n, scale=0.1),
    )
    return st, (lambda: rn(b, 2 * d_inner + 2 * g_ * n + h).to(dtype))


def run_mixer(fn, st, zxbcdt, nbg=False, groups=G, **kw):
    return fn(zxbcdt, st["conv_weight"], st["conv_bias"], st["conv_state"], st["A"], st["D"], st["dt_bias"],
              (0.0, INF), st["norm_weight"], st["ssm_state"], groups, 1e-5, nbg, **kw)


@pytest.mark.parametrize("b", [1, 5, 8, 64])  # every configs.DECODE_STEP entry but batch2-3
@pytest.mark.parametrize("block_p", [None, 16])
def test_mixer_decode_step_codestral_matches_float_reference(tb, guards, b, block_p):
    st, draw = codestral_mixer(b, torch.bfloat16, seed=b)
    st["ssm_state"], st["conv_state"] = guards.wrap(st["ssm_state"]), guards.wrap(st["conv_state"])
    ref = {k: (v.float() if v.dtype == torch.bfloat16 else v).clone() for k, v in st.items()}
    for _ in range(4):
        zxbcdt = draw()
        out = run_mixer(tb.mixer_decode_step, st, zxbcdt, config={"BLOCK_P": block_p} if block_p else None)
        out_ref = run_mixer(pytorch.mixer_decode_step, ref, zxbcdt.float())
        assert rel_err(out, out_ref) <= 1e-2
        assert rel_err(st["ssm_state"], ref["ssm_state"]) <= 1e-2
        assert rel_err(st["conv_state"], ref["conv_state"]) <= 1e-2


def test_mixer_decode_step_fp32_matches_torch_reference_exactly_enough(tb):
    st, draw = codestral_mixer(3, torch.float32, seed=11)
    ref = {k: v.clone() for k, v in st.items()}
    for nbg in (False, True):
        zxbcdt = draw()
        out = run_mixer(tb.mixer_decode_step, st, zxbcdt, nbg)
        out_ref = run_mixer(pytorch.mixer_decode_step, ref, zxbcdt, nbg)
        assert rel_err(out, out_ref) <= 1e-5
        assert rel_err(st["ssm_state"], ref["ssm_state"]) <= 1e-5
        assert torch.equal(st["conv_state"], ref["conv_state"])


@pytest.mark.parametrize("b", [1, 8])
@pytest.mark.parametrize("settled", [False, True], ids=["plain", "settled"])
def test_mixer_decode_step_replays_in_a_cuda_graph(tb, b, settled):
    # settled: the graph's step loads its state before waiting for the kernel before (PDL), as
    # decode's does; a replay's state was written by the replay before, which has completed.
    st, draw = codestral_mixer(b, torch.bfloat16, seed=3)
    ref = {k: v.clone() for k, v in st.items()}
    zxbcdt = draw()
    run_mixer(tb.mixer_decode_step, st, zxbcdt)  # warm-up: compiles, allocates scratch
    run_mixer(tb.mixer_decode_step, ref, zxbcdt)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_mixer(tb.mixer_decode_step, st, zxbcdt, state_settled=settled)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        out_ref = run_mixer(tb.mixer_decode_step, ref, zxbcdt)
        torch.cuda.synchronize()
        assert rel_err(out, out_ref) <= 1e-6
        assert torch.equal(st["ssm_state"], ref["ssm_state"])


@pytest.mark.parametrize("b", [1, 2, 8])
def test_mixer_decode_step_with_a_settled_state_gives_the_same_steps(tb, b):
    # Under PDL a settled state is loaded before the wait, otherwise after it: the same bits.
    # The inputs are made and the device synchronized before each call (a PDL kernel may read,
    # before its wait, what the kernel launched just before it wrote).
    st, draw = codestral_mixer(b, torch.bfloat16, seed=4)
    plain = {k: v.clone() for k, v in st.items()}
    for _ in range(3):
        zxbcdt = draw()
        torch.cuda.synchronize()
        out = run_mixer(tb.mixer_decode_step, st, zxbcdt, state_settled=True)
        torch.cuda.synchronize()
        out_plain = run_mixer(tb.mixer_decode_step, plain, zxbcdt)
        torch.cuda.synchronize()
        assert torch.equal(out, out_plain)
        assert torch.equal(st["ssm_state"], plain["ssm_state"]) and torch.equal(st["conv_state"], plain["conv_state"])


@pytest.mark.parametrize("L,init", [(5000, True), (16384, False)], ids=["L5000-init", "L16384"])
def test_ssd_prefill_splits_a_small_models_sequence_and_matches_torch_reference(tb, L, init):
    # A mamba2-130m layer (24 heads, one group): at batch 1 its grid is small, so the default
    # rule cuts the sequence into segments (a states-only pass, then every segment at once).
    from mamba2_cli.kernels.triton import ssd

    h, p, g, n = 24, 64, 1, 128
    gen = torch.Generator(device="cuda").manual_seed(L)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    inp = dict(x=rn(1, L, h, p).bfloat16(), dt=(rn(1, L, h) * 0.5 - 2.0).bfloat16(),
               A=-torch.exp(torch.rand(h, generator=gen, device="cuda") * math.log(16.0)),
               B=rn(1, L, g, n).bfloat16(), C=rn(1, L, g, n).bfloat16(), D=rn(h), dt_bias=rn(h) * 0.1,
               initial_state=rn(1, h, p, n) * 0.1 if init else None)
    assert ssd.choose_config(1, h, p, L, torch.bfloat16).get("SEGMENTS", 1) > 1
    y, state = run_ssd(tb.ssd_prefill, inp)
    as_fp32 = {k: (v.float() if v is not None else None) for k, v in inp.items()}
    y_ref, state_ref = run_ssd(pytorch.ssd_prefill, as_fp32)
    assert rel_err(y, y_ref) <= 1e-2
    assert rel_err(state, state_ref) <= 1e-2


def test_decode_continues_prefill_at_codestral_shapes(tb):
    inp = codestral_ssd_inputs(1, 300, torch.bfloat16, seed=5)
    y, state = run_ssd(tb.ssd_prefill, inp)
    head = {k: (v[:, :296] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    _, s = run_ssd(tb.ssd_prefill, head)
    for t in range(296, 300):
        yt = tb.ssd_decode_step(inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                                inp["D"], inp["dt_bias"], (0.0, INF), s)
        assert rel_err(yt, y[:, t]) <= 1e-2
    assert rel_err(s, state) <= 1e-2


@pytest.mark.parametrize("width", [3, 4], ids=["conv-tiles", "conv-rows"])  # the rows kernel takes width 4
def test_norms_and_conv_at_codestral_shapes(tb, width):
    g = torch.Generator(device="cuda").manual_seed(9)
    L, d_inner, conv_dim = 777, H * P, H * P + 2 * G * N
    zxbcdt = torch.randn(2, L, 2 * d_inner + 2 * G * N + H, generator=g, device="cuda").to(torch.bfloat16)
    z, xBC, _ = torch.split(zxbcdt, [d_inner, conv_dim, H], dim=-1)
    w = torch.randn(conv_dim, width, generator=g, device="cuda").to(torch.bfloat16)
    bias = torch.randn(conv_dim, generator=g, device="cuda").to(torch.bfloat16)
    cs = torch.randn(2, conv_dim, width - 1, generator=g, device="cuda").to(torch.bfloat16)
    cs_ref = cs.clone()
    out = tb.causal_conv1d(xBC, w, bias, cs)
    out_ref = pytorch.causal_conv1d(xBC.float(), w.float(), bias.float(), cs_ref)
    assert rel_err(out, out_ref) <= 1e-2 and torch.equal(cs, cs_ref.to(cs.dtype))

    y = torch.randn(2, L, d_inner, generator=g, device="cuda").to(torch.bfloat16)
    nw = torch.randn(d_inner, generator=g, device="cuda").to(torch.bfloat16)
    for nbg in (False, True):
        o = tb.gated_rmsnorm(y, z, nw, d_inner // G, 1e-5, nbg)
        o_ref = pytorch.gated_rmsnorm(y.float(), z.float(), nw.float(), d_inner // G, 1e-5, nbg)
        assert rel_err(o, o_ref) <= 1e-2

    x = torch.randn(L, 4096, generator=g, device="cuda").to(torch.bfloat16)
    res = torch.randn(L, 4096, generator=g, device="cuda")
    w2 = torch.randn(4096, generator=g, device="cuda").to(torch.bfloat16)
    o, r = tb.add_rmsnorm(x, res, w2, 1e-5)
    o_ref, r_ref = pytorch.add_rmsnorm(x, res, w2, 1e-5)
    assert rel_err(o, o_ref) <= 1e-2 and rel_err(r, r_ref) <= 1e-6


# Sizes off the blocks: N 48 (in a block of 64), P 48 and 24 (blocks of 16, 32 and 64 end
# inside them), odd numbers of heads and groups, ragged lengths, at each configuration entry.
# Every element past N or P is masked; a mask against the block reads a neighbour's values and
# writes past the tensors, which the guards catch.
ODD = [(5, 48, 1, 48), (3, 24, 3, 48)]  # (heads, head dim, groups, state size)
ODD_IDS = ["H5-P48-G1-N48", "H3-P24-G3-N48"]
def ssd_reference(inp):
    return sequential_ssd_heads(**{k: v for k, v in inp.items() if k != "initial_state"}, dt_limit=(0.0, INF),
                                initial_state=inp["initial_state"])


@pytest.mark.parametrize("init", [True, False], ids=["init", "zero-state"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("odd", ODD, ids=ODD_IDS)
@pytest.mark.parametrize("entry", ["default"] + SSD_ENTRIES)
def test_ssd_prefill_off_the_blocks_matches_float64_recurrence(tb, guards, entry, odd, dtype, tol, init):
    h, p, g, n = odd
    inp = codestral_ssd_inputs(2, 333, dtype, seed=h * p, init=init, h=h, p=p, g_=g, n=n)
    if init:
        inp["initial_state"] = guards.wrap(inp["initial_state"])
    y, state = run_ssd(tb.ssd_prefill, inp, config=None if entry == "default" else ssd_entry(entry))
    y_ref, state_ref = ssd_reference(inp)
    torch.cuda.synchronize()
    assert rel_err(y, y_ref) <= tol
    assert rel_err(state, state_ref) <= tol
    guards.check()


@pytest.mark.parametrize("odd", ODD, ids=ODD_IDS)
@pytest.mark.parametrize("entry", SSD_ENTRIES)
def test_ssd_prefill_off_the_blocks_short_lengths_with_lengths_and_the_state_in_place(tb, guards, entry, odd):
    # Lengths about one and two chunks (32 and 64 are the entries' chunks), a second row
    # padded past its length, the final state written over the initial one.
    h, p, g, n = odd
    for L in (1, 2, 31, 32, 33, 63, 64, 65, 129):
        inp = codestral_ssd_inputs(2, L, torch.bfloat16, seed=2000 + L, h=h, p=p, g_=g, n=n)
        inp["initial_state"] = guards.wrap(inp["initial_state"])
        state0 = inp["initial_state"].clone()
        lens = torch.tensor([L, max(1, L // 2)], device="cuda")
        y, state = run_ssd(tb.ssd_prefill, inp, seq_len=lens, final_state=inp["initial_state"],
                           config=ssd_entry(entry))
        torch.cuda.synchronize()
        assert state.data_ptr() == inp["initial_state"].data_ptr()
        for row, m in enumerate(lens.tolist()):
            one = {k: (v[row : row + 1, :m] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
            one["initial_state"] = state0[row : row + 1]
            y_ref, state_ref = ssd_reference(one)
            assert rel_err(y[row : row + 1, :m], y_ref) <= 1e-2, (L, row)
            assert rel_err(state[row : row + 1], state_ref) <= 1e-2, (L, row)
            assert torch.all(y[row, m:] == 0), (L, row)
        guards.check()


@pytest.mark.parametrize("settled", [True, False], ids=["settled", "plain"])
@pytest.mark.parametrize("odd", ODD, ids=ODD_IDS)
@pytest.mark.parametrize("b", [1, 2, 4, 8])  # every configs.DECODE_STEP entry
def test_mixer_decode_step_off_the_blocks_at_every_batch_entry(tb, guards, b, odd, settled):
    # The inputs are made and the device synchronized before each call (under PDL a settled
    # state is loaded before the wait for the kernel launched just before).
    from mamba2_cli.kernels.triton import decode_step

    assert decode_step.entry_for(b) == ["batch1", "batch2-3", "batch4-7", "batch8+"][[1, 2, 4, 8].index(b)]
    h, p, g, n = odd
    st, draw = codestral_mixer(b, torch.bfloat16, seed=100 + b, h=h, p=p, g_=g, n=n)
    st["ssm_state"], st["conv_state"] = guards.wrap(st["ssm_state"]), guards.wrap(st["conv_state"])
    ref = {k: (v.float() if v.dtype == torch.bfloat16 else v).clone() for k, v in st.items()}
    for _ in range(3):
        zxbcdt = draw()
        torch.cuda.synchronize()
        out = run_mixer(tb.mixer_decode_step, st, zxbcdt, groups=g, state_settled=settled)
        out_ref = run_mixer(pytorch.mixer_decode_step, ref, zxbcdt.float(), groups=g)
        torch.cuda.synchronize()
        assert rel_err(out, out_ref) <= 1e-2
        assert rel_err(st["ssm_state"], ref["ssm_state"]) <= 1e-2
        assert rel_err(st["conv_state"], ref["conv_state"]) <= 1e-2
    guards.check()


@pytest.mark.parametrize("odd", ODD, ids=ODD_IDS)
def test_ssd_decode_step_off_the_blocks_continues_a_prefill(tb, guards, odd):
    h, p, g, n = odd
    inp = codestral_ssd_inputs(3, 40, torch.float32, seed=7, h=h, p=p, g_=g, n=n)
    y, state = run_ssd(tb.ssd_prefill, inp)
    head = {k: (v[:, :36] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    s = guards.wrap(run_ssd(tb.ssd_prefill, head)[1])
    for t in range(36, 40):
        yt = tb.ssd_decode_step(inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                                inp["D"], inp["dt_bias"], (0.0, INF), s)
        assert rel_err(yt, y[:, t]) <= 1e-4
    assert rel_err(s, state) <= 1e-4
    guards.check()


@pytest.mark.parametrize("width", [3, 4], ids=["conv-tiles", "conv-rows"])
def test_conv_and_norms_off_the_blocks(tb, guards, width):
    # 360 channels (P 24 x 3 heads, 3 groups of N 48): the conv's blocks of 256 or 128 end
    # inside them; 333 positions end inside its blocks of 16 or 32; norm rows of 144 in a tile
    # of 256 and groups of 24 in tiles of 32.
    gen = torch.Generator(device="cuda").manual_seed(31)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    b, L, d_inner, conv_dim = 2, 333, 72, 360
    xBC, w, bias = rn(b, L, conv_dim).bfloat16(), rn(conv_dim, width).bfloat16(), rn(conv_dim).bfloat16()
    cs = guards.wrap(rn(b, conv_dim, width - 1).bfloat16())
    cs_ref = cs.float()
    lens = torch.tensor([L, 100], device="cuda")
    out = tb.causal_conv1d(xBC, w, bias, cs, lens)
    out_ref = pytorch.causal_conv1d(xBC.float(), w.float(), bias.float(), cs_ref, lens)
    assert rel_err(out[0], out_ref[0]) <= 1e-2 and rel_err(out[1, :100], out_ref[1, :100]) <= 1e-2
    assert torch.equal(cs, cs_ref.to(cs.dtype))
    x1 = rn(b, conv_dim).bfloat16()
    o = tb.conv1d_step(x1, w, bias, cs)
    o_ref = pytorch.conv1d_step(x1.float(), w.float(), bias.float(), cs_ref)
    assert rel_err(o, o_ref) <= 1e-2 and torch.equal(cs, cs_ref.to(cs.dtype))

    y, z, nw = rn(b, L, d_inner).bfloat16(), rn(b, L, d_inner).bfloat16(), rn(d_inner).bfloat16()
    for nbg in (False, True):
        o = tb.gated_rmsnorm(y, z, nw, 24, 1e-5, nbg)
        assert rel_err(o, pytorch.gated_rmsnorm(y.float(), z.float(), nw.float(), 24, 1e-5, nbg)) <= 1e-2
    x, res, w2 = rn(L, 144).bfloat16(), rn(L, 144), rn(144).bfloat16()
    for rows in (L, 3):  # a prompt's rows, decode's few (launched with PDL)
        o, r = tb.add_rmsnorm(x[:rows], res[:rows], w2, 1e-5)
        o_ref, r_ref = pytorch.add_rmsnorm(x[:rows], res[:rows], w2, 1e-5)
        assert rel_err(o, o_ref) <= 1e-2 and rel_err(r, r_ref) <= 1e-6
    torch.cuda.synchronize()
    guards.check()
