"""`fedcvr recommend` (the merchant's `Recommender`) scores an item exactly as the next-basket evaluation does: the
same history, the same candidate-in-history features and item statistics, the same local item memory."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import torch

from fedcvr.client.recommender import Recommender
from fedcvr.shared.data.examples import ExampleConfig, event_codes
from fedcvr.shared.data.loader import load_merchant
from fedcvr.shared.data.signals import repeat_prior
from fedcvr.shared.model.config import ModelConfig
from fedcvr.shared.model.esmm import initial_model
from fedcvr.shared.model.folder import save_model_folder
from fedcvr.shared.model.prefix_cache import PrefixCache
from fedcvr.shared.training.loop import ItemSide, basket_scorer, embed_catalog
from fedcvr.shared.training.prepare import prepare

HISTORY = 6


def test_recommend_scores_each_item_exactly_as_the_next_basket_evaluation(tmp_path, tiny_purchase_market, tiny_bert):
    full = tiny_purchase_market / "shop-1"
    events = load_merchant(full).events
    purchases = events.loc[events["event"] == "purchase", "timestamp"].sort_values()
    # the shop as it stood just before a late purchase: its "now" (last event + 1 s) is the evaluation's cut
    late = purchases.iloc[int(len(purchases) * 0.8)]
    before = events[events["timestamp"] < late]
    cut = before["timestamp"].max() + pd.Timedelta(seconds=1)
    shop = tmp_path / "shop"
    shutil.copytree(full, shop)
    before.to_parquet(shop / "events.parquet", index=False)

    config = ModelConfig.defaults(encoder=str(tiny_bert), dim=8, attention_hidden=8, head_hidden=8, max_text_tokens=32)
    model, backbone = initial_model(config, 3)
    data = load_merchant(full)
    prepared = prepare([data], ExampleConfig.defaults(test_from=str(cut), history_length=HISTORY))
    memory = model.attach_memory(prepared.catalog.item_ids)
    with torch.no_grad():  # a trained memory: every item its own offset, and a blend of the repeat prior
        memory.table.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        memory.table.weight[-1] = 0
        memory.blend.copy_(torch.from_numpy(repeat_prior()))
    model.eval()
    save_model_folder(tmp_path / "model", model, backbone, {"examples": {"history_length": HISTORY}})

    side = ItemSide(PrefixCache(backbone, 0, config.max_text_tokens).states(prepared.catalog.texts),
                    torch.from_numpy(prepared.catalog.numeric), prepared.catalog.item_ids)
    device = torch.device("cpu")
    task, pool = prepared.baskets["test"], prepared.candidates[0]
    assert len(task) >= 5 and (task.cut == cut.value).all()
    evaluated = basket_scorer(model, embed_catalog(model, side, device), device)(task, pool)

    recommender = Recommender(tmp_path / "model", shop)
    # the local layers travel through the model folder
    assert torch.equal(recommender.model.memory.blend, torch.from_numpy(repeat_prior()))
    assert recommender.implicit and recommender.history_length == HISTORY
    user_ids = event_codes(data)[1]
    item_ids = [str(i) for i in prepared.catalog.item_ids[pool]]
    for row in range(5):
        served = recommender.score(str(user_ids[task.shopper[row]]), item_ids)["items"]
        assert [s["item_id"] for s in served] == item_ids
        assert set(served[0]) == {"item_id", "title", "p_purchase"}  # one score on a purchase-only shop
        np.testing.assert_allclose([s["p_purchase"] for s in served], evaluated[row], rtol=1e-5, atol=1e-7)
