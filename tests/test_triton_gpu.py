"""The triton backend at full Codestral layer shapes on a GPU (marker `gpu`).

H 128, P 64, G 8, N 128, conv width 4, against the float64 recurrence (vectorized over
heads here, on the GPU, so moderate lengths stay fast): rel err <= 1e-2 for bf16 inputs,
<= 1e-4 for fp32. Outputs are poisoned with NaN through torch.empty.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mamba2_cli.kernels import pytorch
from reference import rel_err, sequential_ssd

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
def tb(monkeypatch):
    from mamba2_cli.kernels import triton as triton_backend

    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        t.fill_(math.nan if t.is_floating_point() else -12345)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    return triton_backend


def codestral_ssd_inputs(b, L, dtype, seed, init=True):
    """Codestral-like ranges: dt = softplus(raw + bias) mostly in [1e-3, 1e-1], A in [-16, -1]."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    dt_init = torch.exp(torch.rand(H, generator=g, device="cuda") * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(
        x=rn(b, L, H, P).to(dtype), dt=(rn(b, L, H) * 0.5).to(dtype),
        A=-torch.exp(torch.rand(H, generator=g, device="cuda") * math.log(16.0)),
        B=rn(b, L, G, N).to(dtype), C=rn(b, L, G, N).to(dtype), D=rn(H),
        dt_bias=dt_init + torch.log(-torch.expm1(-dt_init)),  # inverse softplus
        initial_state=rn(b, H, P, N) * 0.1 if init else None,
    )


def run_ssd(fn, inp, dt_limit=(0.0, INF)):
    return fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["dt_bias"], dt_limit, 256,
              inp["initial_state"])


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


def sweep_lengths(tb, lengths, b, dtype, init):
    """ssd_prefill against pytorch (fp32 math) at each length; returns the failures."""
    bad = []
    for L in lengths:
        inp = codestral_ssd_inputs(b, L, dtype, seed=1000 + L, init=init)
        y, state = run_ssd(tb.ssd_prefill, inp)
        try:
            torch.cuda.synchronize()
        except Exception as e:  # a fault poisons the context: name the length, stop here
            raise AssertionError(f"L={L} (earlier failures {bad}): {str(e)[:80]}") from e
        as_fp32 = {k: (v.float() if v is not None else None) for k, v in inp.items()}
        y_ref, state_ref = run_ssd(pytorch.ssd_prefill, as_fp32)
        ey, es = rel_err(y, y_ref), rel_err(state, state_ref)
        if not (ey <= 1e-2 and es <= 1e-2):  # NaN (an unwritten output) fails too
            bad.append((L, f"{ey:.1e}", f"{es:.1e}"))
    return bad


@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "init-state"])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("config", ["default", "many"])
def test_ssd_prefill_length_sweep_matches_torch_reference(tb, monkeypatch, config, b, init):
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
    bad = sweep_lengths(tb, SWEEP_L, b, torch.bfloat16, init)
    assert not bad, f"(L, y err, state err) over 1e-2: {bad}"


@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "init-state"])
def test_ssd_prefill_short_lengths_fp16(tb, init):
    bad = sweep_lengths(tb, [1, 2, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129], 1, torch.float16, init)
    assert not bad, f"(L, y err, state err) over 1e-2: {bad}"


def codestral_mixer(b, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device="cuda") * scale

    d_inner = H * P
    conv_dim = d_inner + 2 * G * N
    dt_init = torch.exp(torch.rand(H, generator=g, device="cuda") * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    st = dict(
        conv_weight=rn(conv_dim, K, scale=0.5).to(dtype), conv_bias=rn(conv_dim, scale=0.1).to(dtype),
        conv_state=rn(b, conv_dim, K - 1).to(dtype), A=-torch.exp(torch.rand(H, generator=g, device="cuda") * 2.77),
        D=rn(H), dt_bias=dt_init + torch.log(-torch.expm1(-dt_init)),
        norm_weight=(1.0 + rn(d_inner, scale=0.1)).to(dtype), ssm_state=rn(b, H, P, N, scale=0.1),
    )
    return st, (lambda: rn(b, 2 * d_inner + 2 * G * N + H).to(dtype))


def run_mixer(fn, st, zxbcdt, nbg=False, **kw):
    return fn(zxbcdt, st["conv_weight"], st["conv_bias"], st["conv_state"], st["A"], st["D"], st["dt_bias"],
              (0.0, INF), st["norm_weight"], st["ssm_state"], G, 1e-5, nbg, **kw)


@pytest.mark.parametrize("b", [1, 5, 8, 64])  # every configs.DECODE_STEP entry but batch2-3
@pytest.mark.parametrize("block_p", [None, 16])
def test_mixer_decode_step_codestral_matches_float_reference(tb, b, block_p):
    st, draw = codestral_mixer(b, torch.bfloat16, seed=b)
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
