"""Rank a merchant's whole catalog for one shopper with a saved model (the pushed-back global model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.contract import EVENT_TYPES
from ..data.examples import event_codes
from ..data.loader import MerchantData
from ..data.signals import EventLog
from ..model.esmm import ScoreInputs
from ..model.folder import load_model_folder
from ..model.prefix_cache import PrefixCache
from .data import Catalog
from .loop import ItemSide, embed_catalog

_NS_PER_HOUR = 3_600 * 1_000_000_000


@torch.no_grad()
def recommend(model_dir: Path, data: MerchantData, user_id: str, k: int = 10, history_length: int = 30,
              exclude_bought: bool = True) -> pd.DataFrame:
    """The top `k` catalog items for `user_id` by pCTCVR, with pCTR and pCVR, from the shopper's last
    `history_length` events and each item's signals in the shop's log (`data/signals.py`), as of the shop's latest
    event. A shopper without history gets the model's ranking for an empty history. Columns: item_id,
    title, p_ctcvr, p_ctr, p_cvr."""
    model, backbone, _ = load_model_folder(model_dir)
    model.eval()
    catalog = Catalog.from_items([data.items])
    cache = PrefixCache(backbone, model.config.adapter_layers, model.config.max_text_tokens)
    side = ItemSide(cache.states(catalog.texts), torch.from_numpy(catalog.numeric), catalog.item_ids)
    items = embed_catalog(model, side, torch.device("cpu"))
    mine = data.events[data.events["user_id"] == user_id].tail(history_length)
    # the shop's "now": its last event + 1 s; history ages and signals are counted back from it
    now = data.events["timestamp"].max() + pd.Timedelta(seconds=1) if len(data.events) else pd.Timestamp.now()
    codes, user_ids = event_codes(data)
    log = EventLog.build(codes["user"], catalog.codes(data.items["item_id"].to_numpy(dtype=object))[codes["item"]],
                         codes["event"], codes["t"])
    user_code = np.searchsorted(user_ids, user_id) if user_id in set(user_ids) else -1
    signals = log.grid(np.array([user_code]), np.arange(len(catalog)), np.array([now.value]))[0]
    history = torch.from_numpy(catalog.codes(mine["item_id"].to_numpy()))
    n, length = len(catalog), max(len(mine), 1)
    codes = torch.from_numpy(pd.Index(EVENT_TYPES).get_indexer(mine["event"]).astype(np.int64))
    ages = torch.from_numpy(((now - mine["timestamp"]).dt.total_seconds() / 3600).to_numpy(np.float32))
    inputs = ScoreInputs(
        target=torch.arange(n),
        history=(history if len(mine) else torch.zeros(1, dtype=torch.long)).repeat(n, 1),
        history_mask=torch.full((n, length), bool(len(mine))),
        events=(codes if len(mine) else torch.zeros(1, dtype=torch.long)).repeat(n, 1),
        age_hours=(ages if len(mine) else torch.zeros(1)).repeat(n, 1),
        position=torch.zeros(n, dtype=torch.long),
        signals=torch.from_numpy(signals),
    )
    ctr, cvr, _ = model.score(items, inputs)
    p_ctr, p_cvr = torch.sigmoid(ctr).numpy(), torch.sigmoid(cvr).numpy()
    ranked = pd.DataFrame({"item_id": catalog.item_ids, "title": data.items.set_index("item_id").loc[
        catalog.item_ids, "title"].to_numpy(), "p_ctcvr": p_ctr * p_cvr, "p_ctr": p_ctr, "p_cvr": p_cvr})
    if exclude_bought:
        bought = set(data.events.loc[(data.events["user_id"] == user_id) & (data.events["event"] == "purchase"),
                                     "item_id"])
        ranked = ranked[~ranked["item_id"].isin(bought)]
    return ranked.sort_values("p_ctcvr", ascending=False).head(k).reset_index(drop=True)
