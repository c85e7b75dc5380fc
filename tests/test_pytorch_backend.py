"""The PyTorch backend's operations against independent references (float64, step by step)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mamba2_cli.kernels import pytorch as R
from reference import rel_err, sequential_ssd

INF = math.inf


def ssd_inputs(b=2, L=37, H=4, P=8, G=2, N=16, seed=0, dtype=torch.float32, D_hdim=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(
        x=r(b, L, H, P).to(dtype), dt=(r(b, L, H) - 1.0).to(dtype), A=-(torch.rand(H, generator=g) * 0.5 + 0.1),
        B=r(b, L, G, N).to(dtype), C=r(b, L, G, N).to(dtype), D=r(H, P) if D_hdim else r(H),
        dt_bias=r(H) * 0.1,
    )


@pytest.mark.parametrize("L", [1, 7, 8, 9, 16, 23, 40])
@pytest.mark.parametrize("with_initial", [False, True])
def test_chunked_ssd_matches_sequential_recurrence(L, with_initial):
    t = ssd_inputs(L=L)
    s0 = torch.randn(2, 4, 8, 16) if with_initial else None
    y, s = R.ssd_prefill(**t, dt_limit=(0.0, INF), chunk_size=8, initial_state=s0)
    y_ref, s_ref = sequential_ssd(**t, dt_limit=(0.0, INF), initial_state=s0)
    assert y.shape == (2, L, 4, 8) and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


def test_chunked_ssd_groups_and_per_channel_D():
    t = ssd_inputs(L=19, H=8, G=4, D_hdim=True)
    y, s = R.ssd_prefill(**t, dt_limit=(0.0, INF), chunk_size=8)
    y_ref, s_ref = sequential_ssd(**t, dt_limit=(0.0, INF))
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_dt_is_clamped_to_time_step_limit():
    t = ssd_inputs(L=12)
    limit = (0.2, 0.4)
    y, _ = R.ssd_prefill(**t, dt_limit=limit, chunk_size=8)
    y_ref, _ = sequential_ssd(**t, dt_limit=limit)
    y_free, _ = sequential_ssd(**t, dt_limit=(0.0, INF))
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(y_free, y_ref) > 1e-2  # the limit binds for these inputs


def test_decode_steps_match_sequential_recurrence():
    t = ssd_inputs(L=13)
    state = torch.randn(2, 4, 8, 16)
    y_ref, s_ref = sequential_ssd(**t, dt_limit=(0.0, INF), initial_state=state)
    ys = [R.ssd_decode_step(t["x"][:, i], t["dt"][:, i], t["A"], t["B"][:, i], t["C"][:, i], t["D"],
                            t["dt_bias"], (0.0, INF), state) for i in range(13)]
    assert rel_err(torch.stack(ys, 1), y_ref) < 1e-5
    assert rel_err(state, s_ref) < 1e-5


def test_ssd_in_pieces_equals_whole():
    t = ssd_inputs(L=30)
    y_all, s_all = R.ssd_prefill(**t, dt_limit=(0.0, INF), chunk_size=8)
    s = None
    ys = []
    for a, b in [(0, 5), (5, 17), (17, 30)]:
        piece = {k: (v[:, a:b] if k in ("x", "dt", "B", "C") else v) for k, v in t.items()}
        y, s = R.ssd_prefill(**piece, dt_limit=(0.0, INF), chunk_size=8, initial_state=s)
        ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_all) < 1e-5
    assert rel_err(s, s_all) < 1e-5


def test_ssd_keeps_fp32_state_for_half_inputs():
    t = ssd_inputs(L=20, dtype=torch.bfloat16)
    y, s = R.ssd_prefill(**t, dt_limit=(0.0, INF), chunk_size=8)
    y_ref, s_ref = sequential_ssd(**t, dt_limit=(0.0, INF))
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-2 and rel_err(s, s_ref) < 1e-5


def test_causal_conv_prefill_and_steps_agree_with_direct_convolution():
    g = torch.Generator().manual_seed(1)
    b, L, C, K = 2, 11, 6, 4
    x = torch.randn(b, L, C, generator=g)
    w, bias = torch.randn(C, K, generator=g), torch.randn(C, generator=g)
    # Direct definition: out[t] = silu(bias + sum_k w[k] * x[t - (K-1) + k]), zeros before the start.
    xp = F.pad(x, (0, 0, K - 1, 0))
    direct = torch.stack([F.silu(bias + (w.T * xp[:, t : t + K]).sum(1)) for t in range(L)], 1)
    state = torch.zeros(b, C, K - 1)
    out = R.causal_conv1d(x[:, :6], w, bias, state)
    steps = [R.conv1d_step(x[:, t], w, bias, state) for t in range(6, L)]
    got = torch.cat([out, torch.stack(steps, 1)], 1)
    assert rel_err(got, direct) < 1e-6
    assert torch.equal(state, x[:, -(K - 1):].transpose(1, 2))


def test_gated_rmsnorm_normalizes_each_group_separately():
    g = torch.Generator().manual_seed(2)
    y, z, w = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g), torch.randn(16, generator=g)
    out = R.gated_rmsnorm(y, z, w, group_size=4, eps=1e-5)
    h = y * F.silu(z)
    for gi in range(4):
        sl = slice(4 * gi, 4 * gi + 4)
        want = h[:, sl] / torch.sqrt(h[:, sl].pow(2).mean(-1, keepdim=True) + 1e-5) * w[sl]
        assert torch.allclose(out[:, sl], want, atol=1e-6)
    before = R.gated_rmsnorm(y, z, w, group_size=4, eps=1e-5, norm_before_gate=True)
    assert not torch.allclose(before, out, atol=1e-3)
