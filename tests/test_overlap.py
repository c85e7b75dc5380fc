"""Two-stream prefill (overlap.py): the same pieces through the same operations, so the same
logits and states as the pieces one after the other (on a CPU the streams are one)."""

from __future__ import annotations

import pytest
import torch

from mamba2_cli.errors import Mamba2Error
from mamba2_cli.generate import prefill
from mamba2_cli.overlap import prefill_overlapped
from test_prefill_graphs import BACKENDS, random_state, tiny_model


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("L,chunk,depth", [(37, 8, 2), (40, 8, 3), (37, 8, 1), (20, 32, 2), (33, 16, 2), (1, 8, 2)])
def test_overlapped_prefill_equals_the_pieces_in_order(name, L, chunk, depth):
    model = tiny_model(name, n_layer=3)
    ids = torch.randint(0, 50, (2, L), generator=torch.Generator().manual_seed(L))
    want_state, got_state = random_state(model, 2), random_state(model, 2)
    want = prefill(model, ids, want_state, chunk_tokens=chunk)
    got = prefill_overlapped(model, ids, got_state, chunk, depth=depth)
    assert got.shape == want.shape == (2, 50)
    assert torch.equal(got, want)
    assert torch.equal(got_state.ssm, want_state.ssm)
    assert torch.equal(got_state.conv, want_state.conv)


def test_overlapped_prefill_refuses_an_empty_prompt_and_bad_settings():
    model = tiny_model("torch", n_layer=1)
    with pytest.raises(Mamba2Error):
        prefill_overlapped(model, torch.zeros(1, 0, dtype=torch.long), model.new_state(1), 8)
    with pytest.raises(Mamba2Error):
        prefill_overlapped(model, torch.zeros(1, 4, dtype=torch.long), model.new_state(1), 0)
