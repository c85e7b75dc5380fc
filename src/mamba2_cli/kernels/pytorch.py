"""The PyTorch backend: every operation of `kernels` in plain PyTorch.

The backend on CPUs, and the reference the Triton kernels are tested against. Runs on any
device and dtype. Numerics: dt, A, decays and the SSM state are fp32 (or
float64 when the inputs are float64, which the tests use); outputs come back in the input
dtype. The chunked scan never builds an (L, L) matrix nor a (Q, Q, H, N) product: per chunk
it holds O(Q^2 * H + Q * H * (P + N)) numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..linear import QuantizedLinear

name = "torch"


def scan_chunk_size(chunk_size: int, device_type: str) -> int:
    """The block length this backend's chunked scan runs fastest at.

    The chunked scan is exact for any block length, so a backend need not use the
    checkpoint's chunk_size. On CPU the within-chunk work (Q^2 per head per chunk) dominates
    and 64 halves prefill time against 256 (mamba2-130m, 1024 tokens: 1.5 s vs 2.0 s).
    """
    return min(chunk_size, 64) if device_type == "cpu" else chunk_size


def linear(x, proj):
    """x [..., K] @ proj.weight[N, K]^T (+ proj.bias): the projections (in_proj, out_proj, lm_head)."""
    if isinstance(proj, QuantizedLinear):
        return quantized_linear(x, proj)
    return F.linear(x, proj.weight, proj.bias)


def quantized_linear(x, proj):
    """A quantized projection: on CPU, int8 through PyTorch's int8 weight-only matmul
    (aten._weight_int8pack_mm) when K is a multiple of 32 (its bf16 path reads out of bounds
    at K = 70); otherwise the weight is dequantized into x's dtype and multiplied (the
    reference the kernels are tested against).

    The op runs in bf16 whatever x's dtype: its fp32 path is scalar code, 3-6x slower than
    fp32 F.linear on a 2-core AVX-512 CPU (0.8 against 12 GB/s at mamba2-130m's lm_head),
    while its bf16 path reads the int8 weights 1.6-2.9x faster than fp32 F.linear. The
    scales multiply the fp32 sum afterwards, so bf16 rounds only x and the unscaled sum
    (about 2^-9 relative each, an eighth of int8's own error)."""
    if (proj.scheme == "int8" and x.device.type == "cpu" and x.dtype in _INT8PACK_DTYPES
            and proj.in_features % 32 == 0):
        K = x.shape[-1]
        ones = _ones_bf16(proj.out_features)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, K).to(torch.bfloat16), proj.qweight, ones)
        y = y.float().mul_(proj.scales)
        if proj.bias is not None:
            y.add_(proj.bias)
        return y.to(x.dtype).view(*x.shape[:-1], proj.out_features)
    return F.linear(x, proj.dequantize(x.dtype), proj.bias)


_INT8PACK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 (the tests' references) stays exact


_ONES: dict[int, torch.Tensor] = {}


def _ones_bf16(n: int) -> torch.Tensor:
    if n not in _ONES:
        _ONES[n] = torch.ones(n, dtype=torch.bfloat16)
    return _ONES[n]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def softplus_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    """dt = clamp(softplus(dt + dt_bias), *dt_limit), computed in fp32 (or fp64)."""
    ct = _compute_dtype(dt)
    dt = F.softplus(dt.to(ct) + dt_bias.to(ct))
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _D_term(D: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # D is [H] or [H, P]; x is [..., H, P].
    return x * (D[:, None] if D.dim() == 1 else D).to(x.dtype)


def valid_positions(seq_len, L: int, device) -> torch.Tensor:
    """[b, L] bool: position t of row i is real (t < seq_len[i]); the rest is padding."""
    return torch.arange(L, device=device)[None, :] < seq_len.to(device)[:, None]


def ssd_prefill(x, dt, A, B, C, D, dt_bias, dt_limit, chunk_size, initial_state=None, seq_len=None,
                final_state=None):
    """Chunked SSD scan over a whole prompt, continuing from `initial_state`.

    x [b, L, H, P]; dt [b, L, H] (raw, before softplus); A [H] fp32 (negative);
    B, C [b, L, G, N]; D [H] or [H, P]; dt_bias [H]; dt_limit (lo, hi);
    initial_state [b, H, P, N] fp32 or None (zeros).
    Returns y [b, L, H, P] in x.dtype and the final state [b, H, P, N] fp32.

    seq_len: None, or an integer tensor [b] on the device: row i holds seq_len[i] real
    positions followed by padding. Padding is never read: its dt, x, B and C count as zero,
    so the state passes through it unchanged (the final state is the state after the real
    positions) and its y is zero. With seq_len[i] = 0 the row's state is left as it was.
    final_state: None, or an fp32 [b, H, P, N] tensor to write the final state into (it may
    be `initial_state` itself: the update is then in place); it is also what is returned.

    Heads are handled as (group, head-in-group) so B and C are never copied per head:
    head h = g * (H / G) + j reads group g, as repeat_interleave would have it.
    """
    b, L, H, P = x.shape
    G, N = B.shape[-2:]
    hpg = H // G
    ct = _compute_dtype(x)
    Q = chunk_size
    nc = -(-L // Q)
    pad = nc * Q - L

    dt = softplus_dt(dt, dt_bias, dt_limit)  # [b, L, H]
    xf, Bf, Cf = x.to(ct), B.to(ct), C.to(ct)
    if seq_len is not None:
        # masked_fill, not a product with the mask: padding may hold anything, NaN included.
        pad_pos = ~valid_positions(seq_len, L, x.device)
        dt = dt.masked_fill(pad_pos[:, :, None], 0.0)
        xf, Bf, Cf = (t.masked_fill(pad_pos[:, :, None, None], 0.0) for t in (xf, Bf, Cf))
    if pad:
        # Padding positions get dt = 0: no decay, no input, so the state passes through.
        dt = F.pad(dt, (0, 0, 0, pad))
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))

    # Layouts: [b, c, G, hpg, Q, ...] for per-head work, [b, c, G, Q, N] for B and C.
    dtc = dt.view(b, nc, Q, G, hpg).permute(0, 1, 3, 4, 2)  # [b, c, G, hpg, Q]
    a = torch.cumsum(dtc * A.to(ct).view(G, hpg, 1), dim=-1)  # cumulative log-decay in each chunk
    xdt = (xf.view(b, nc, Q, G, hpg, P) * dt.view(b, nc, Q, G, hpg, 1)).permute(0, 1, 3, 4, 2, 5)
    Bc = Bf.view(b, nc, Q, G, N).transpose(2, 3)  # [b, c, G, Q, N]
    Cc = Cf.view(b, nc, Q, G, N).transpose(2, 3)

    # 1. Within each chunk: y[q] = sum_{s<=q} (C_q . B_s) exp(a_q - a_s) dt_s x_s.
    #    a_q - a_s is a difference inside one chunk, where fp32 keeps it accurate.
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp((a[..., :, None] - a[..., None, :]).masked_fill_(~causal, float("-inf")))
    CB = torch.matmul(Cc, Bc.transpose(-1, -2))  # [b, c, G, Q, Q], once per group
    # In place when no gradient is taken: autograd keeps exp's output for the backward pass.
    decay = decay * CB[:, :, :, None] if torch.is_grad_enabled() else decay.mul_(CB[:, :, :, None])
    y = torch.matmul(decay, xdt)  # [b, c, G, hpg, Q, P]
    del decay

    # 2. Each chunk's own end state, starting from zero: sum_s exp(a_end - a_s) dt_s x_s B_s^T.
    # Heads of a group share B, so one matmul per group covers them: [hpg*P, Q] @ [Q, N].
    to_end = torch.exp(a[..., -1:] - a)  # [b, c, G, hpg, Q]
    xw = (xdt * to_end[..., None]).transpose(-1, -2).reshape(b, nc, G, hpg * P, Q)
    chunk_states = torch.matmul(xw, Bc).view(b, nc, G, hpg, P, N)

    # 3. Carry states across chunk boundaries, starting from the initial state.
    state = (
        torch.zeros(b, G, hpg, P, N, dtype=ct, device=x.device)
        if initial_state is None
        else initial_state.to(ct).reshape(b, G, hpg, P, N)
    )
    if torch.is_grad_enabled() and initial_state is not None:
        state = state.clone()  # autograd keeps it, and callers overwrite their state in place
    chunk_decay = torch.exp(a[..., -1])  # [b, c, G, hpg]
    starts = []
    for c in range(nc):
        starts.append(state)
        state = state * chunk_decay[:, c, :, :, None, None] + chunk_states[:, c]
    start_states = torch.stack(starts, dim=1)  # [b, c, G, hpg, P, N]

    # 4. The state entering each chunk: y[q] += exp(a_q) C_q . S_in.
    S_in = start_states.permute(0, 1, 2, 5, 3, 4).reshape(b, nc, G, N, hpg * P)
    y_off = torch.matmul(Cc, S_in).view(b, nc, G, Q, hpg, P).transpose(3, 4)  # [b, c, G, hpg, Q, P]
    y = y.add_(y_off * torch.exp(a)[..., None])

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, nc * Q, H, P)[:, :L]
    y = y + _D_term(D.to(ct), xf[:, :L])
    final = state.reshape(b, H, P, N).to(torch.float64 if ct == torch.float64 else torch.float32)
    if final_state is not None:
        final = final_state.copy_(final)
    return y.to(x.dtype), final


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A Python-side check is cheaper than a no-op dispatch; the decode path calls this a lot.
    return t if t.dtype == dtype else t.to(dtype)


def ssd_decode_step(x, dt, A, B, C, D, dt_bias, dt_limit, ssm_state):
    """One token of the recurrence; updates `ssm_state` in place.

    x [b, H, P]; dt [b, H] raw; B, C [b, G, N]; ssm_state [b, H, P, N] fp32.
    Returns y [b, H, P] in x.dtype:  S = exp(dt A) S + dt x B^T;  y = S C + D x.
    """
    b, H, P = x.shape
    G, N = B.shape[-2:]
    hpg = H // G
    ct = ssm_state.dtype
    dt = softplus_dt(dt, dt_bias, dt_limit)  # [b, H]
    dA = torch.exp(dt * A)
    xf = _as(x, ct)
    S = ssm_state.view(b, G, hpg, P, N)  # head h = g * (H / G) + j reads group g
    S.mul_(dA.view(b, G, hpg, 1, 1)).addcmul_((xf * dt[..., None]).view(b, G, hpg, P, 1), _as(B, ct).view(b, G, 1, 1, N))
    y = torch.matmul(S.view(b, G, hpg * P, N), _as(C, ct).view(b, G, N, 1)).view(b, H, P)
    y.addcmul_(xf, D[:, None] if D.dim() == 1 else D)
    return _as(y, x.dtype)


def causal_conv1d(xBC, weight, bias, conv_state, seq_len=None):
    """Depthwise causal conv + SiLU over a prompt, continuing from `conv_state`.

    xBC [b, L, C]; weight [C, K]; bias [C] or None; conv_state [b, C, K-1] holds the K-1
    inputs before this prompt (oldest first) and is overwritten with the last K-1 inputs.
    Returns [b, L, C] in xBC.dtype.
    seq_len: None, or an integer tensor [b] on the device (see `ssd_prefill`): row i's
    conv state becomes the K-1 inputs before position seq_len[i] (older ones from the old
    state when seq_len[i] < K-1); outputs at padded positions are unspecified.
    """
    b, L, Cdim = xBC.shape
    K = weight.shape[-1]
    # Time-major [b, K-1+L, C]: each tap is one strided multiply-add over contiguous channels.
    window = torch.cat([conv_state.transpose(1, 2).to(xBC.dtype), xBC], dim=1)
    w = weight.to(xBC.dtype)
    out = window[:, 0:L] * w[:, 0]
    for k in range(1, K):
        out.addcmul_(window[:, k : k + L], w[:, k])
    if bias is not None:
        out += bias.to(out.dtype)
    if seq_len is None:
        conv_state.copy_(window[:, L:].transpose(1, 2))
    else:
        # The state after row i's real inputs is window[i, n : n + K-1], n = seq_len[i].
        n = seq_len.to(xBC.device, torch.long).clamp(0, L)
        idx = n[:, None] + torch.arange(K - 1, device=xBC.device)
        conv_state.copy_(window.gather(1, idx[:, :, None].expand(b, K - 1, Cdim)).transpose(1, 2))
    return F.silu(out, inplace=True)


def conv1d_step(xBC, weight, bias, conv_state):
    """One token of the causal conv: xBC [b, C] -> [b, C]; shifts `conv_state` in place.

    The window is filled in place and reduced with a multiply and a sum: on a CPU this is
    half the time of a concatenation and an einsum (mamba2-130m, one layer: 46 against 75 µs)."""
    b, C, K1 = conv_state.shape
    window = conv_state.new_empty(b, C, K1 + 1)
    window[..., :K1] = conv_state
    window[..., K1] = xBC
    ct = _compute_dtype(window)  # products and sum in fp32 (fp64) whatever the state's dtype
    out = (_as(window, ct) * _as(weight, ct)).sum(-1)
    if bias is not None:
        out += bias
    conv_state.copy_(window[..., 1:])
    return _as(F.silu(out, inplace=True), xBC.dtype)


def gated_rmsnorm(y, z, weight, group_size, eps, norm_before_gate=False):
    """RMSNorm over each group of `group_size` channels, gated by silu(z).

    norm_before_gate False: RMSNorm_g(y * silu(z)) * w;  True: RMSNorm_g(y) * w * silu(z).
    """
    shape = y.shape
    ct = _compute_dtype(y)
    yf, zf = _as(y, ct), _as(z, ct)
    if not norm_before_gate:
        yf = yf * F.silu(zf)
    g = F.rms_norm(yf.reshape(*shape[:-1], shape[-1] // group_size, group_size), (group_size,), eps=eps)
    out = g.view(shape) * _as(weight, ct)
    if norm_before_gate:
        out = out * F.silu(zf)
    return _as(out, y.dtype)


def add_rmsnorm(x, residual, weight, eps, residual_in_fp32=True):
    """residual += x (in fp32 when asked); returns (RMSNorm(residual) * w in x.dtype, residual)."""
    if residual is None:
        residual = _as(x, torch.float32) if residual_in_fp32 and x.dtype != torch.float64 else x
    else:
        residual = residual + x
    r = residual if residual.dtype == torch.float64 else _as(residual, torch.float32)
    out = F.rms_norm(r, (r.shape[-1],), _as(weight, r.dtype), eps)
    return _as(out, x.dtype), residual


def norm_linear(x, residual, norm_weight, eps, residual_in_fp32, proj):
    """(linear(add_rmsnorm(x, residual, norm_weight, eps)[0], proj), new residual)."""
    normed, residual = add_rmsnorm(x, residual, norm_weight, eps, residual_in_fp32)
    return linear(normed, proj), residual


def mixer_decode_step(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, dt_limit,
                      norm_weight, ssm_state, ngroups, eps, norm_before_gate=False, *, state_settled=False):
    """One decode token of the mixer between in_proj and out_proj.

    zxbcdt [b, 2*d_inner + 2*G*N + H] (in_proj output); conv_state [b, conv_dim, K-1] and
    ssm_state [b, H, P, N] are updated in place. Returns the gated, normed y [b, d_inner].
    state_settled: a promise that no kernel launched just before this call wrote ssm_state
    (a GPU backend may then fetch the state early); the results are the same either way.
    """
    b = zxbcdt.shape[0]
    H, P, N = ssm_state.shape[1:]
    d_inner = H * P
    conv_dim = d_inner + 2 * ngroups * N
    z, xBC, dt = torch.split(zxbcdt, [d_inner, conv_dim, H], dim=-1)
    xBC = conv1d_step(xBC, conv_weight, conv_bias, conv_state)
    x, B, C = torch.split(xBC, [d_inner, ngroups * N, ngroups * N], dim=-1)
    y = ssd_decode_step(
        x.reshape(b, H, P), dt, A, B.reshape(b, ngroups, N), C.reshape(b, ngroups, N),
        D, dt_bias, dt_limit, ssm_state,
    )
    return gated_rmsnorm(y.reshape(b, d_inner), z, norm_weight, d_inner // ngroups, eps, norm_before_gate)
