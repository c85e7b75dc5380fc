"""Whole-model checks on a GPU: backends agree, CUDA-graph decode equals eager decode."""

import pytest
import torch

from mamba2_cli import load_preset, stream_generate
from reference import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def greedy_tokens(model, tok, prompt, n, **kw):
    return [e.token_id for e in stream_generate(model, tok, prompt, max_tokens=n, ignore_eos=True, **kw)
            if e.token_id is not None]


def test_triton_and_torch_logits_agree_on_a_codestral_shaped_model():
    model, _ = load_preset("codestral-7b", "cuda", "bfloat16", "triton")
    ids = torch.randint(3, 32768, (1, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        got = model(ids, model.new_state(1))
        model.set_backend("torch")
        want = model(ids, model.new_state(1))
    assert rel_err(got, want) <= 2e-2


def test_greedy_tokens_identical_across_backends_on_a_tiny_fp32_model():
    model, tok = load_preset("tiny", "cuda", "float32", "triton")
    prompt = list(range(3, 40))
    a = greedy_tokens(model, tok, prompt, 32)
    model.set_backend("torch")
    assert greedy_tokens(model, tok, prompt, 32) == a


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_replay_gives_the_eager_tokens(backend):
    model, tok = load_preset("mamba2-130m", "cuda", "bfloat16", backend)
    prompt = list(range(100, 164))
    eager = greedy_tokens(model, tok, prompt, 64, cuda_graph=False)
    graph = greedy_tokens(model, tok, prompt, 64, cuda_graph=True)
    assert len(eager) == 64 and graph == eager
