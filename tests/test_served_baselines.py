"""The last table of `fedcvr simulate`: each merchant's served model beside the baselines it fits alone, on next
baskets, for logs with impressions (the demo) and purchase logs alike."""

from __future__ import annotations

import numpy as np
import pytest

from fedcvr.shared.data.loader import merchant_folders
from fedcvr.shared.model.config import ModelConfig
from fedcvr.shared.model.esmm import initial_model
from fedcvr.shared.model.folder import save_model_folder
from fedcvr.simulations.served_baselines import served_vs_baselines


@pytest.mark.parametrize("market", ["tiny_market", "tiny_purchase_market"])
def test_each_merchants_served_model_stands_beside_its_own_baselines(market, request, tmp_path, tiny_bert):
    root = request.getfixturevalue(market)
    folders = merchant_folders(root)
    config = ModelConfig.defaults(encoder=str(tiny_bert), dim=8, attention_hidden=8, head_hidden=8, max_text_tokens=32)
    for folder in folders[:2]:  # the third merchant saved no model: it is left out, not an error
        model, backbone = initial_model(config, 0)
        save_model_folder(tmp_path / "models" / folder.name, model, backbone, {"examples": {"history_length": 8}})
    rankers = served_vs_baselines(tmp_path, folders, ("popularity", "repeat"))
    labels = [label for label, _ in rankers]
    assert labels == ["served model (global)", "popularity (local)", "repeat (local)"]
    sizes = {m["nb.all.n"] for _, m in rankers}
    assert len(sizes) == 1 and sizes.pop() > 0  # the same shoppers for every ranker
    assert all(0 <= m["nb.all.ndcg@10"] <= 1 for _, m in rankers)
    assert np.isfinite([m["nb.all.hr@10"] for _, m in rankers]).all()


def test_no_saved_model_means_no_table(tmp_path, tiny_market):
    assert served_vs_baselines(tmp_path, merchant_folders(tiny_market)) == []
