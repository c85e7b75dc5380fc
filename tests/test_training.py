"""Autograd through the torch model: what scripts/train_tiny.py trains the built-in model with."""

import torch

from mamba2_cli.checkpoint import random_model
from mamba2_cli.config import Mamba2Config


def _model(dtype=torch.float64):
    cfg = Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=16, chunk_size=8, ngroups=2)
    m = random_model(cfg, torch.device("cpu"), torch.float32, seed=3).to(dtype)
    for p in m.parameters():
        p.requires_grad_(True)
    m.set_backend("torch")
    return m


def _loss(m, x):
    logits = m(x[:, :-1], m.new_state(x.shape[0]))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), x[:, 1:].reshape(-1))


def test_gradient_matches_finite_differences():
    """<grad, v> equals the central difference of the loss along a random direction v (float64)."""
    torch.manual_seed(0)
    m = _model()
    x = torch.randint(0, 50, (2, 21))  # 20 positions: several scan chunks of 8, one ragged
    params = list({id(p): p for p in m.parameters()}.values())
    loss = _loss(m, x)
    grads = torch.autograd.grad(loss, params)
    v = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, v)).item()
    eps = 1e-5  # measured error 8e-6 here; a parameter without its gradient (A_log: 2e-3) stands out
    # The losses are taken in grad mode too: that path reads A and the conv weights live.
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(eps * d)
    up = _loss(m, x).item()
    with torch.no_grad():
        for p, d in zip(params, v):
            p.sub_(2 * eps * d)
    down = _loss(m, x).item()
    numeric = (up - down) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-4 * max(1.0, abs(numeric)), (analytic, numeric)


def test_every_parameter_learns():
    m = _model(torch.float32)
    loss = _loss(m, torch.randint(0, 50, (2, 17)))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_training_forward_is_the_inference_forward():
    """The grad-mode path (A and conv weights taken live from the parameters) computes the same logits."""
    m = _model(torch.float32)
    m.prepare()
    x = torch.randint(0, 50, (2, 19))
    s1, s2 = m.new_state(2), m.new_state(2)
    with torch.no_grad():
        ref = m(x, s1)
    out = m(x, s2)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2.ssm, s1.ssm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2.conv.detach(), s1.conv, rtol=1e-5, atol=1e-5)
