"""The small tables' per-example gradient norms (ghost clipping) equal Opacus's embedding function and the norms
of one-example-at-a-time autograd gradients."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample.embedding import compute_embedding_norm_sample

from fedcvr.shared.model.table import TableEmbedding
from fedcvr.shared.training import dp_samplers


@pytest.mark.parametrize("shape", [(7,), (7, 5), (7, 3, 4)])
def test_table_norms_equal_opacus_and_one_example_autograd(shape):
    torch.manual_seed(0)
    table = TableEmbedding(6, 3)
    ids = torch.randint(0, 6, shape)
    ids[0] = 2  # an example that looks up one row many times: its gradients add before the norm
    backprops = torch.randn(*shape, 3)
    ours = dp_samplers.table_norm_sample(table, [ids], backprops)[table.weight]
    theirs = compute_embedding_norm_sample(table, [ids], backprops)[table.weight]
    torch.testing.assert_close(ours, theirs)
    for i in range(shape[0]):
        grad = torch.autograd.grad((table(ids[i]) * backprops[i]).sum(), table.weight)[0]
        assert float(ours[i]) == pytest.approx(float(grad.norm()), rel=1e-5)


def test_large_tables_use_opacus_function(monkeypatch):
    monkeypatch.setattr(dp_samplers, "MAX_DENSE", 10)
    table = TableEmbedding(50, 4)
    ids = torch.randint(0, 50, (8, 3))
    backprops = torch.randn(8, 3, 4)
    torch.testing.assert_close(dp_samplers.table_norm_sample(table, [ids], backprops)[table.weight],
                               compute_embedding_norm_sample(table, [ids], backprops)[table.weight])


def test_the_model_uses_table_embeddings_with_unchanged_weight_names():
    from fedcvr.shared.model.esmm import ESMMHead
    from fedcvr.shared.model.user_tower import UserTower

    tower, head = UserTower(8, 8), ESMMHead(8, 8, 10)
    assert isinstance(tower.event, TableEmbedding) and isinstance(head.position_bias, TableEmbedding)
    assert {"event.weight", "recency.weight"} <= set(tower.state_dict())
    assert "position_bias.weight" in head.state_dict()
