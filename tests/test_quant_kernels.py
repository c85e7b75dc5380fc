"""The quantized matvec and dequantize kernels against the torch reference of the same scheme
(dequantize, then multiply in fp32): Triton's interpreter on CPU (fp32/fp16 activations; its
bf16 dot is wrong), the GPU in bf16 when present. Shapes are not multiples of the blocks or
groups; every output lies between guard regions (reference.Guards)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba2_cli.linear import Int4Linear, Int8Linear  # noqa: E402
from reference import Guards, rel_err, triton_module  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]


@pytest.fixture(scope="module")
def qm():
    return triton_module("quant_matvec")


@pytest.fixture(autouse=True)
def guards(monkeypatch):
    g = Guards().install(monkeypatch)
    yield g
    g.finish()


def _proj(scheme, N, K, group, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if bias else None
    cls = Int8Linear if scheme == "int8" else Int4Linear
    return cls.from_weight(w.to(DEVICE), b, group, dtype)


def _reference(x, proj):
    y = x.float() @ proj.dequantize(torch.float32).t()
    return y if proj.bias is None else y + proj.bias.float()


# N: not a multiple of any block; K: not a power of two (int8) or of the fma tile (int4: 3 or 5 groups).
CASES = [("int8", 37, 200, 0), ("int8", 21, 1100, 0), ("int4", 37, 96, 32), ("int4", 19, 320, 64),
         ("int4", 11, 384, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("scheme,N,K,group", CASES)
def test_quant_matvec_matches_reference(qm, scheme, N, K, group, rows, dtype):
    proj = _proj(scheme, N, K, group, dtype, bias=rows == 3)
    x = torch.randn(rows, K, device=DEVICE).to(dtype)
    from mamba2_cli.kernels.triton.configs import QUANT_MATVEC

    configs = [None]
    if rows == 1:  # a tile shorter than K, so the double-buffered loop runs more than once
        configs.append({**QUANT_MATVEC[f"{scheme}_rows1"], "block_k": max(group, 64)})
    for cfg in configs:
        y = qm.quant_matvec(x, proj, cfg)
        assert y.shape == (rows, N) and y.dtype == dtype
        assert rel_err(y, _reference(x, proj)) < (1e-5 if dtype == torch.float32 else 2e-2), cfg


@pytest.mark.parametrize("scheme,N,K,group", CASES)
def test_dequantize_kernel_matches_reference(qm, scheme, N, K, group):
    proj = _proj(scheme, N, K, group, torch.float32, bias=False)
    assert torch.equal(qm.dequantize(proj, torch.float32), proj.dequantize(torch.float32))


def test_rows_view_and_prompt_path(qm):
    """in_proj's row views (the z part and the rest) and more than 8 rows (dequantize + matmul)."""
    proj = _proj("int4", 50, 96, 32, torch.float32, bias=True)
    part = proj.rows(13, 41)
    for rows in (1, 5, 12):
        x = torch.randn(rows, 96, device=DEVICE)
        assert rel_err(qm.quant_linear(x, part), _reference(x, part)) < 1e-5


def test_backend_linear_dispatches_quantized(qm):
    from mamba2_cli.kernels.triton import linear

    proj = _proj("int8", 40, 64, 0, torch.float32, bias=False)
    x = torch.randn(2, 1, 64, device=DEVICE)
    y = linear(x, proj)
    assert y.shape == (2, 1, 40) and rel_err(y, _reference(x, proj)) < 1e-5
