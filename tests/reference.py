"""Independent references for the tests: the float64 sequential recurrence, step by step."""

import torch
import torch.nn.functional as F


def sequential_ssd(x, dt, A, B, C, D, dt_bias, dt_limit, initial_state=None):
    """The Mamba-2 recurrence one token at a time, in float64. Same layouts as ssd_prefill."""
    x, dt, A, B, C, D, dt_bias = (t.double() for t in (x, dt, A, B, C, D, dt_bias))
    b, L, H, P = x.shape
    G, N = B.shape[-2:]
    dt = F.softplus(dt + dt_bias).clamp(min=dt_limit[0], max=dt_limit[1])
    heads_per_group = H // G
    S = torch.zeros(b, H, P, N, dtype=torch.float64) if initial_state is None else initial_state.double().clone()
    Dm = D[:, None] if D.dim() == 1 else D
    ys = []
    for t in range(L):
        y_t = torch.empty(b, H, P, dtype=torch.float64)
        for h in range(H):
            g = h // heads_per_group
            decay = torch.exp(dt[:, t, h] * A[h])[:, None, None]
            S[:, h] = decay * S[:, h] + dt[:, t, h, None, None] * x[:, t, h, :, None] * B[:, t, g, None, :]
            y_t[:, h] = torch.einsum("bpn,bn->bp", S[:, h], C[:, t, g])
        ys.append(y_t + x[:, t] * Dm)
    return torch.stack(ys, dim=1), S


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
