"""The decode matvec kernel against F.linear (Triton's interpreter on CPU, the GPU when present)."""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from reference import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def gemv_mod():
    if importlib.util.find_spec("triton") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("triton is not installed, and CI=true forbids skipping the kernel tests")
        pytest.skip("triton is not installed")
    from mamba2_cli.kernels import gemv

    return gemv


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K", [96, 300])
def test_gemv_matches_linear(gemv_mod, M, dtype, K):
    g = torch.Generator().manual_seed(M * K)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = torch.randn(37, K, generator=g).to(DEVICE, dtype)
    b = torch.randn(37, generator=g).to(DEVICE, dtype)
    want = F.linear(x.double(), w.double(), b.double())
    got = gemv_mod.gemv(x, w, b)
    assert got.dtype == dtype and got.shape == (M, 37)
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2e-3)
    assert rel_err(gemv_mod.gemv(x, w), F.linear(x.double(), w.double())) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_linear_uses_matmul_for_many_rows_and_matvec_for_few(gemv_mod):
    x = torch.randn(2, 5, 16, device=DEVICE)
    w = torch.randn(12, 16, device=DEVICE)
    assert rel_err(gemv_mod.linear(x, w), F.linear(x, w)) < 1e-5
    assert rel_err(gemv_mod.linear(x[:1, :1], w), F.linear(x[:1, :1], w)) < 1e-5


def test_gemv_refuses_mismatched_shapes(gemv_mod):
    from mamba2_cli.errors import Mamba2Error

    with pytest.raises(Mamba2Error, match="do not multiply"):
        gemv_mod.gemv(torch.randn(1, 8, device=DEVICE), torch.randn(4, 9, device=DEVICE))
    with pytest.raises(Mamba2Error, match="rows"):
        gemv_mod.gemv(torch.randn(9, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE))
