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


def reference_logits(sd: dict, shape: dict, ids: list[int], norm_before_gate: bool = False,
                     dt_limit=(0.0, float("inf")), eps: float = 1e-5) -> torch.Tensor:
    """The whole Mamba-2 LM, written out from the design notes in float64, one token at a time.

    sd uses HF names; shape is a tests/checkpoints.py shape dict. Returns [L, vocab_size].
    """
    W = {k: v.double() for k, v in sd.items()}
    H_P = shape["expand"] * shape["d_model"]
    P, G, N, K = shape["headdim"], shape["ngroups"], shape["d_state"], shape["d_conv"]
    H = H_P // P
    group_of_head = torch.arange(H) // (H // G)
    L = len(ids)

    def rms(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * w

    residual = W["backbone.embeddings.weight"][torch.tensor(ids)]  # [L, d]
    for i in range(shape["n_layer"]):
        p = f"backbone.layers.{i}."
        h = rms(residual, W[p + "norm.weight"])
        zxbcdt = h @ W[p + "mixer.in_proj.weight"].T
        z = zxbcdt[:, :H_P]
        xBC = zxbcdt[:, H_P : 2 * H_P + 2 * G * N]
        dt_raw = zxbcdt[:, 2 * H_P + 2 * G * N :]
        cw, cb = W[p + "mixer.conv1d.weight"][:, 0, :], W[p + "mixer.conv1d.bias"]
        conv = torch.zeros_like(xBC)
        for t in range(L):
            acc = cb.clone()
            for k in range(K):  # tap k sees the input K-1-k steps back
                src = t - (K - 1 - k)
                if src >= 0:
                    acc = acc + cw[:, k] * xBC[src]
            conv[t] = acc * torch.sigmoid(acc)
        x = conv[:, :H_P].reshape(L, H, P)
        B = conv[:, H_P : H_P + G * N].reshape(L, G, N)
        C = conv[:, H_P + G * N :].reshape(L, G, N)
        dt = F.softplus(dt_raw + W[p + "mixer.dt_bias"]).clamp(min=dt_limit[0], max=dt_limit[1])
        A = -torch.exp(W[p + "mixer.A_log"])
        Dp = W[p + "mixer.D"]
        Dp = Dp[:, None] if Dp.dim() == 1 else Dp
        S = torch.zeros(H, P, N, dtype=torch.float64)
        y = torch.zeros(L, H, P, dtype=torch.float64)
        for t in range(L):
            Bh, Ch = B[t][group_of_head], C[t][group_of_head]  # [H, N]
            S = torch.exp(dt[t] * A)[:, None, None] * S + (dt[t][:, None] * x[t])[:, :, None] * Bh[:, None, :]
            y[t] = (S * Ch[:, None, :]).sum(-1) + Dp * x[t]
        y = y.reshape(L, H_P)
        gate = z * torch.sigmoid(z)
        v = y if norm_before_gate else y * gate
        gsz = H_P // G
        v = torch.cat([rms(v[:, g * gsz : (g + 1) * gsz], 1.0) for g in range(G)], dim=-1) * W[p + "mixer.norm.weight"]
        if norm_before_gate:
            v = v * gate
        residual = residual + v @ W[p + "mixer.out_proj.weight"].T
    h = rms(residual, W["backbone.norm_f.weight"])
    return (h @ W["lm_head.weight"].T)[:, : shape["vocab_size"]]
