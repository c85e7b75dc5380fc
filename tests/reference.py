"""Independent references for the tests: the float64 sequential recurrence, step by step;
and guard regions around kernel outputs, to catch writes outside them."""

import importlib
import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F


def triton_module(name: str = ""):
    """mamba2_cli.kernels.triton (or its submodule `name`) for a kernel test: a missing Triton
    skips the test, except under CI=true, where it fails."""
    if importlib.util.find_spec("triton") is None:
        msg = "triton is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{msg}, and CI=true forbids skipping the kernel tests")
        pytest.skip(msg)
    return importlib.import_module("mamba2_cli.kernels.triton" + (f".{name}" if name else ""))


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


class Guards:
    """Tensors placed inside larger buffers whose bytes before and after hold a sentinel, so a
    kernel that writes outside its output (a store with a wrong mask) shows even when every
    value it returns is right; `check` asserts that the sentinel bytes are untouched.

    `empty` stands in for torch.empty (install it with monkeypatch): every output the kernel
    wrappers allocate then lies between guards, and its own elements are poisoned (NaN, or
    -12345 for integers) so an element a kernel forgets to write fails the comparison too.
    `wrap` places a copy of a tensor between guards: the in-place states passed to a kernel.
    """

    SENTINEL = 0xA5  # as fp32 -2.9e-16, as fp16 -0.022: no value a kernel computes here
    MIN_PAD, MAX_PAD = 16 << 10, 1 << 20  # guard bytes each side: the tensor's size, clamped

    def __init__(self, real_empty=torch.empty):
        self.real_empty = real_empty
        self.regions = []  # (description, uint8 buffer, first data byte, end of data)

    def alloc(self, shape, dtype, device) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        # 256-byte multiples keep the data as aligned as the allocator's own (Triton specializes
        # on 16-byte alignment, tensor descriptors need it).
        pad = -(-min(max(nbytes, self.MIN_PAD), self.MAX_PAD) // 256) * 256
        buf = self.real_empty(pad + nbytes + pad, dtype=torch.uint8, device=device)
        buf.fill_(self.SENTINEL)
        t = buf[pad:pad + nbytes].view(dtype).view(shape)
        self.regions.append((f"{dtype} {list(shape)}", buf, pad, pad + nbytes))
        return t

    def empty(self, *size, dtype=None, device=None, **kw):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        device = torch.device(device if device is not None else torch.get_default_device())
        if kw.get("requires_grad") or kw.get("pin_memory") or set(kw) - {"requires_grad", "pin_memory"} \
                or device.type == "meta":
            t = self.real_empty(*size, dtype=dtype, device=device, **kw)  # not a kernel output
        else:
            t = self.alloc(shape, dtype or torch.get_default_dtype(), device)
        t.fill_(math.nan if (t.is_floating_point() or t.is_complex()) else -12345)
        return t

    def wrap(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of t between guards."""
        out = self.alloc(t.shape, t.dtype, t.device)
        out.copy_(t)
        return out

    def install(self, monkeypatch) -> "Guards":
        """torch.empty becomes `empty` for the rest of the test."""
        monkeypatch.setattr(torch, "empty", self.empty)
        return self

    def finish(self) -> None:
        """After the test: wait for the GPU's kernels, then `check`."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.check()

    def check(self) -> None:
        """Assert every guard byte is untouched; the regions checked are then let go."""
        bad = []
        for what, buf, start, end in self.regions:
            for side, part in (("before", buf[:start]), ("after", buf[end:])):
                hit = (part != self.SENTINEL).nonzero()
                if hit.numel():
                    off = hit[0].item() - start if side == "before" else hit[-1].item()
                    bad.append(f"{what}: {hit.numel()} bytes written {side} it (farthest {off:+d} bytes)")
        self.regions = []
        assert not bad, "writes outside a kernel's tensors: " + "; ".join(bad)


SSD_ENTRIES = ["few", "many", "fp32", "few-segments", "many-segments"]


def ssd_entry(name: str) -> dict:
    """A configs.SSD entry as ssd_prefill's `config` (it replaces the chosen configuration)."""
    from mamba2_cli.kernels.triton import configs

    t = configs.SSD
    return {
        "few": dict(t["few"]),
        "many": {**t["few"], **t["many"]},
        "fp32": {**t["few"], **t["fp32"]},
        # Cut into segments: the states-only pass with "states" (S^T) after "few", with
        # "many_states" (S) after "many".
        "few-segments": {**t["few"], "SEGMENTS": 2},
        "many-segments": {**t["few"], **t["many"], "SEGMENTS": 3, "states": dict(t["many_states"])},
    }[name]
