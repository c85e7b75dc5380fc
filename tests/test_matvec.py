"""The decode matvec kernels against F.linear (Triton's interpreter on CPU, the GPU when present).

Every output the kernels allocate lies between guard regions and is poisoned with NaN
(reference.Guards): a write outside it fails the test even when every value is right.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mamba2_cli.linear import Linear  # noqa: E402
from reference import Guards, rel_err, triton_module  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def mv():
    return triton_module("matvec")


@pytest.fixture(autouse=True)
def guards(monkeypatch):
    """torch.empty hands out NaN-poisoned tensors between guard regions, checked after the test."""
    g = Guards().install(monkeypatch)
    yield g
    g.finish()


def _table():
    from mamba2_cli.kernels.triton import configs

    return configs.MATVEC


def test_tensor_core_pipeline_fits_shared_memory(mv):
    # fp32 tiles are twice the 16-bit ones the 8-row configuration was tuned with: at 4 stages
    # they ask for 245760 bytes of shared memory, past the H200's 232448.
    for entry in ("rows2-8", "rows2-8_k8192"):  # the second with an early tile outside the stages
        cfg = _table()[entry]
        bn, bk, extra = cfg["block_n"], cfg["block_k"], cfg["block_n"] if cfg["early_tile"] else 0
        for itemsize in (2, 4):
            stages = mv.dot_stages(cfg, bn, bk, 16, itemsize)
            assert (stages * (bn + 16) + extra) * bk * itemsize <= mv.DOT_SMEM_BYTES < 232448
        if not cfg["early_tile"]:
            assert mv.dot_stages(cfg, bn, bk, 16, 2) == cfg["num_stages"]  # 16-bit: as tuned


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K", [96, 300])
def test_matvec_matches_linear(mv, M, dtype, K):
    g = torch.Generator().manual_seed(M * K)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = torch.randn(37, K, generator=g).to(DEVICE, dtype)
    b = torch.randn(37, generator=g).to(DEVICE, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    got = mv.matvec(x, w, b)
    assert got.dtype == dtype and got.shape == (M, 37)
    assert rel_err(got, F.linear(x.double(), w.double(), b.double())) < tol
    assert rel_err(mv.matvec(x, w), F.linear(x.double(), w.double())) < tol


def test_linear_takes_the_projection_and_uses_matmul_for_many_rows(mv):
    x = torch.randn(2, 5, 16, device=DEVICE)
    proj = Linear.from_tensors(torch.randn(12, 16, device=DEVICE), torch.randn(12, device=DEVICE))
    want = F.linear(x, proj.weight, proj.bias)
    assert rel_err(mv.linear(x, proj), want) < 1e-5  # 10 rows: F.linear
    assert rel_err(mv.linear(x[:1, :1], proj), want[:1, :1]) < 1e-5  # 1 row: the kernel
    y, res = mv.norm_linear(x[:1, :1], None, torch.ones(16, device=DEVICE), 1e-5, True, proj)
    from mamba2_cli.kernels import pytorch

    y_ref, res_ref = pytorch.norm_linear(x[:1, :1], None, torch.ones(16, device=DEVICE), 1e-5, True, proj)
    assert rel_err(y, y_ref) < 1e-5 and torch.equal(res, res_ref)


class _LaunchSpy:
    """A kernel stand-in that notes each launch (name, grid, BLOCK_N, num_warps, EVICT) and runs it."""

    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.launched.append((self.name, grid[0], kw.get("BLOCK_N"), kw.get("num_warps"), kw.get("EVICT")))
            return self.kernel[grid](*args, **kw)

        return launch


def test_default_kernel_follows_the_rows_and_k(mv, monkeypatch):
    """One row: whole weight rows (K 8192 with its own layout), K tiles past WHOLE_ROW_MAX_K;
    2-8 rows: tensor cores. Each path gives the product."""
    launched = []
    for name in ("_matvec_whole_rows_kernel", "_matvec_k_tiles_kernel", "_matvec_tensor_core_kernel"):
        monkeypatch.setattr(mv, name, _LaunchSpy(getattr(mv, name), name, launched))
    monkeypatch.setattr(mv, "WHOLE_ROW_MAX_K", 256)
    g = torch.Generator().manual_seed(11)
    table = _table()
    for M, K, want in ((1, 64, ("_matvec_whole_rows_kernel", 37, 1, table["rows1"]["num_warps"], "")),
                       (1, 300, ("_matvec_k_tiles_kernel", 37, 1, table["rows1_long"]["num_warps"], None)),
                       (3, 64, ("_matvec_tensor_core_kernel", 1, 64, 4, None))):
        x = torch.randn(M, K, generator=g).to(DEVICE)
        w = torch.randn(37, K, generator=g).to(DEVICE)
        assert rel_err(mv.matvec(x, w), F.linear(x.double(), w.double())) < 1e-5
        assert launched[-1] == want
    assert mv.entry_for(1, 8192) == "rows1_k8192" and table["rows1_k8192"]["evict_first"]
    assert mv.entry_for(8, 8192) == "rows2-8_k8192" and table["rows2-8_k8192"]["early_tile"]
    assert mv.entry_for(2, 4096) == "rows2-8" and mv.entry_for(1, 32768) == "rows1_long"


def test_matvec_refuses_what_it_cannot_do(mv):
    from mamba2_cli.errors import Mamba2Error

    with pytest.raises(Mamba2Error, match="do not multiply"):
        mv.matvec(torch.randn(1, 8, device=DEVICE), torch.randn(4, 9, device=DEVICE))
    with pytest.raises(Mamba2Error, match="rows"):
        mv.matvec(torch.randn(9, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE))
    with pytest.raises(Mamba2Error, match="kind"):
        mv.matvec(torch.randn(1, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE), config={**_table()["rows1"], "kind": "nope"})
    with pytest.raises(Mamba2Error, match="one row"):
        mv.matvec(torch.randn(2, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE), config=_table()["rows1"])


def _small(entry, **kw):
    """A table entry with small tiles, so K spans several tiles and ends in a partial one."""
    return {**_table()[entry], **kw}


CONFIGS = {
    "whole-rows": _small("rows1"),
    "whole-rows-n4-evict": _small("rows1_k8192", block_n=4),
    "k-tiles": _small("rows1_long", block_n=2, block_k=64),
    "k-tiles-one-tile": _small("rows1_long", block_n=2, block_k=512),
    "tensor-cores": _small("rows2-8", block_n=16, block_k=32, num_stages=2, tma=False),
    "tensor-cores-tma": _small("rows2-8", block_n=16, block_k=32, num_stages=2),
    "tensor-cores-early": _small("rows2-8_k8192", block_n=16, block_k=32, num_stages=2, tma=False),
    "tensor-cores-tma-early": _small("rows2-8_k8192", block_n=16, block_k=32, num_stages=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K", [256, 300])
def test_every_matvec_kernel_matches_linear(mv, name, dtype, K):
    cfg = CONFIGS[name]
    M = 1 if cfg["kind"] != "tensor_cores" else 5
    g = torch.Generator().manual_seed(K)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = torch.randn(70, K, generator=g).to(DEVICE, dtype)
    b = torch.randn(70, generator=g).to(DEVICE, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel_err(mv.matvec(x, w, b, config=cfg), F.linear(x.double(), w.double(), b.double())) < tol
    xs = torch.randn(M, K + 40, generator=g).to(DEVICE, dtype)[:, :K]  # rows K + 40 apart
    assert rel_err(mv.matvec(xs, w, config=cfg), F.linear(xs.double(), w.double())) < tol


@pytest.mark.parametrize("entry", ["rows1", "rows1_k8192", "rows1_long", "rows2-8", "rows2-8_k8192"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("K", [300, 1100])
def test_default_entries_off_the_blocks_match_linear(mv, guards, entry, dtype, K):
    # Each configs.MATVEC entry with its own blocks at sizes that are no multiple of them: 101
    # outputs (odd: a last program of 2 rows holds one; tiles of 64 end at 128), K 300 and 1100
    # (tiles of 256 or 1024 end inside K). fp32 rows of 1200 and 4400 bytes take tensor
    # descriptors, 16-bit rows of 600 and 2200 the 16-byte copies; bf16 on a GPU only.
    cfg = _table()[entry]
    M = 1 if cfg["kind"] != "tensor_cores" else 5
    g = torch.Generator().manual_seed(K + M)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = torch.randn(101, K, generator=g).to(DEVICE, dtype)
    b = torch.randn(101, generator=g).to(DEVICE, dtype)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(mv.matvec(x, w, b, config=cfg), F.linear(x.double(), w.double(), b.double())) < tol
    assert rel_err(mv.matvec(x, w, config=cfg), F.linear(x.double(), w.double())) < tol
    guards.check()


def test_batched_default_takes_tensor_descriptors_where_rows_are_aligned(mv):
    assert _table()["rows2-8"]["kind"] == "tensor_cores" and _table()["rows2-8"]["tma"]
    w = torch.randn(8, 304, device=DEVICE, dtype=torch.float16)
    assert mv._tma_ok(w[:4], w)  # 608-byte rows
    assert mv._tma_ok(w[:4, :300], w[:, :300])  # views of them: the row stride is still 608 bytes
    x = torch.randn(4, 300, device=DEVICE, dtype=torch.float16)
    assert not mv._tma_ok(x, torch.randn(8, 300, device=DEVICE, dtype=torch.float16))  # 600-byte rows
    assert not mv._tma_ok(w[:4, 1:], w[:, 1:])  # a base 2 bytes past alignment


def _forced_decode(model, backend, batch, steps, seed=1):
    """fp32 logits [steps, batch, V] of decode steps fed fixed random tokens (prefill on torch)."""
    from mamba2_cli.generation import decode_one_token

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, model.cfg.vocab_size, (batch, 4), generator=g)
    feed = torch.randint(3, model.cfg.vocab_size, (steps, batch), generator=g)
    with torch.inference_mode():
        model.set_backend("torch")
        state = model.new_state(batch)
        model(prompt, state)
        model.set_backend(backend)
        return torch.stack([decode_one_token(model, t, state).float() for t in feed])


@pytest.mark.parametrize("batch,dtype", [(1, torch.float32), (3, torch.float16), (8, torch.float16)],
                         ids=["b1", "b3", "b8"])
def test_decode_with_the_default_matvecs_matches_the_torch_backend(mv, monkeypatch, batch, dtype):
    # The whole model, fed the same tokens on both backends (teacher forcing: a free greedy run
    # of a random model diverges at the first near-tied argmax). The shapes keep what the
    # kernel checks do not: the first layer without a residual, lm_head after norm_f with
    # N >> K and N (1008, padded vocab) no multiple of the blocks, K (48) no multiple of the
    # tile, a tied lm_head, biases, in_proj's input a view of the embedding, out_proj's input
    # the decode step's y. fp16 at 3 and 8 rows, as the interpreter's tl.dot multiplies bf16
    # as raw 16-bit integers (bf16 tensor cores are checked on the GPU).
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the model runs on CPU, under Triton's interpreter")
    from mamba2_cli.checkpoint import random_model
    from mamba2_cli.config import Mamba2Config

    calls = []
    real = mv.matvec
    monkeypatch.setattr(mv, "matvec", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = Mamba2Config(d_model=48, n_layer=2, vocab_size=1000, pad_vocab_size_multiple=16, d_state=16, headdim=16,
                       chunk_size=16, ngroups=2, tie_embeddings=True, bias=True)
    out = {}
    for dt in dict.fromkeys((dtype, torch.float32)):  # fp32 once
        model = random_model(cfg, torch.device("cpu"), dt)
        for n, p in model.named_parameters():  # CPU keeps projections input-major; the kernels take rows
            p.data = p.data.contiguous()
            if n.endswith("proj.bias"):
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        model.prepare()
        for backend in ("torch", "triton") if dt == dtype else ("torch",):
            out[backend, dt] = _forced_decode(model, backend, batch, 3)
    assert len(calls) == 3 * (2 * cfg.n_layer + 1)  # every in_proj, out_proj and lm_head
    ref32 = out["torch", torch.float32]
    if dtype == torch.float32:
        assert rel_err(out["triton", dtype], ref32) < 1e-4
        return
    noise = rel_err(out["torch", dtype], ref32)  # the dtype's own rounding, through the model
    assert noise < 5e-2
    assert rel_err(out["triton", dtype], out["torch", dtype]) < 3 * noise
    assert rel_err(out["triton", dtype], ref32) < 2 * noise


def _replays_equal_eager(chain):
    """chain() -> tensors, run eagerly, then captured in a CUDA graph and replayed three times:
    the replays' outputs must equal the eager ones bit for bit. Returns the eager outputs."""
    eager = chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(o, e) for o, e in zip(out, eager))
    return eager


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("K", [4096, 8192])
def test_bf16_defaults_at_codestral_shapes(mv, M, K):
    g = torch.Generator(device="cuda").manual_seed(M + K)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(18560, K, device="cuda", generator=g) / K ** 0.5).to(torch.bfloat16)
    assert rel_err(mv.matvec(x, w), F.linear(x.float(), w.float())) < 1e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8])
def test_decode_chain_under_pdl_equals_plain_launches(mv, monkeypatch, rows):
    # Decode's chain as the defaults run it: add_rmsnorm, in_proj, out_proj reading in_proj's
    # output, layer after layer, each kernel launched with PDL (it starts before the one
    # before it ends, loads its weights, then waits for its input). Against the same chain
    # with plain launches, eager and in a CUDA graph: the same bits.
    from mamba2_cli.kernels.triton import configs, norm

    g = torch.Generator(device="cuda").manual_seed(8)
    D, DI, L = 4096, 8192, 6
    w_in = [Linear.from_tensors((torch.randn(DI, D, device="cuda", generator=g) / D ** 0.5).to(torch.bfloat16))
            for _ in range(L)]
    w_out = [Linear.from_tensors((torch.randn(D, DI, device="cuda", generator=g) / DI ** 0.5).to(torch.bfloat16))
             for _ in range(L)]
    nw = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(torch.bfloat16)
    x0 = torch.randn(rows, D, device="cuda", generator=g).to(torch.bfloat16)

    def chain():
        h, res = x0 * 1, None  # a plain launch first, as decode's embedding
        for i in range(L):
            normed, res = norm.add_rmsnorm(h, res, nw, 1e-5, True)
            h = mv.linear(mv.linear(normed, w_in[i]), w_out[i])
        return h, res

    def run(pdl):
        monkeypatch.setitem(configs.NORM["add"], "pdl_max_rows", 8 if pdl else 0)
        for entry in configs.MATVEC:
            monkeypatch.setitem(configs.MATVEC[entry], "pdl", pdl)
        return _replays_equal_eager(chain)

    on, off = run(True), run(False)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
