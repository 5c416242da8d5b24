"""A merchant's recommendations from the pushed-back global model: two stages, explanations, cold start.

`Recommender(model_dir, data_dir)` loads the model folder, the merchant's own data folder (one merchant: nothing of
another merchant is ever read) and the item index (`item_index.py`, rebuilt when the model version or the catalog
changes). For a shopper's history (stored, or given ad hoc):

1. retrieval: the query is the weighted mean of the history items' unit embeddings (purchase 3, cart 2, click 1,
   impression 0.25; later events weigh more); the `candidates` items with the largest dot product with it are kept,
   after the filters (category, price range, already bought);
   the items of the shopper's whole history join the candidates (buying again is what many shops see most);
2. re-ranking: the full model (target-aware user tower + ESMM head) scores each candidate with its signals
   (`Recommender.signals`, the same `EventLog` functions as training and evaluation): pCTR, pCVR and
   pCTCVR = pCTR x pCVR; items are ranked by pCTCVR. A shop whose log holds no impressions (purchase logs,
   reviews) has no click/purchase funnel to split: its items carry one score, `p_purchase` (the model's purchase
   propensity, pCTCVR), and are ranked by it (`ranking` "p_purchase");
3. explanations: for each item, the history items whose removal lowers that item's own pCTCVR the most
   (`scoring.py`), in words ("because you bought X and viewed Y").

A shopper without history gets the cold-start ranking: popularity by conversion, (purchases + m p) /
(impressions + m) with p the merchant's purchase rate per impression and m = 20, flagged `cold_start`; its items
carry that `popularity`, the score they are ranked by. New items (`add_items`) are embedded from their text, in
batches of `ADD_BATCH`, and can be recommended at once; they are kept in `<model-dir>/index/added-items.parquet`
and survive a restart.

Items can be added while requests are answered: the catalog (index, titles, categories, prices, popularity) is one
immutable `CatalogSnapshot`, replaced by a single assignment once a new one is complete; every read takes the
current snapshot once and uses only it. Writers take a lock, so one write at a time builds on the latest snapshot.
Several worker processes may serve one model folder (`fedcvr serve --workers`): a write holds a lock on the index
folder across processes and starts from the folder's latest index, and each read first checks whether the saved
index changed since this process last read it (one `stat`), and if so re-reads it with the added items.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcvr.shared.data.contract import EVENT_TYPES
from fedcvr.shared.data.examples import event_codes, histories
from fedcvr.shared.data.loader import load_merchant
from fedcvr.shared.data.pseudonym import KEY_FILE, merchant_key, pseudonym
from fedcvr.shared.data.signals import EventLog
from fedcvr.shared.model.errors import ModelConfigError
from fedcvr.shared.model.folder import load_model_folder
from fedcvr.shared.training.data import Catalog

from .catalog import ITEM_FIELDS, CatalogSnapshot, Filters, ShopperMatch, UnknownItems, merged_items, model_version
from .item_index import INDEX_DIR, ItemIndex, catalog_digest, embed, folder_lock, index_stamp
from .scoring import History, Scores, contributions, explain, reason, score_rows

__all__ = ["CatalogSnapshot", "Filters", "History", "Recommender", "ShopperMatch", "UnknownItems",
           "open_recommender"]

ADDED_ITEMS = "added-items.parquet"
ADD_BATCH = 32  # items embedded per forward pass when items are added: bounds the memory one write takes
EVENT_WEIGHT = {"impression": 0.25, "click": 1.0, "cart": 2.0, "purchase": 3.0}
POPULARITY_STRENGTH = 20.0  # m: impressions' worth of the merchant's average conversion every item starts with


class Recommender:
    """Ranks one merchant's catalog for its shoppers with a saved model folder; see the module text."""

    def __init__(self, model_dir: Path, data_dir: Path, history_length: int | None = None, candidates: int = 200):
        self.model_dir = Path(model_dir)
        self.model, self.backbone, self.settings = load_model_folder(self.model_dir)
        self.model.eval()
        self.version = model_version(self.model_dir, self.settings)
        self.data = load_merchant(data_dir)
        examples = self.settings.get("examples", {})
        self.history_length = int(history_length or examples.get("history_length", 30))
        self.candidates = candidates
        self._write_lock = threading.Lock()
        self._prepare_events()
        added_path = self.model_dir / INDEX_DIR / ADDED_ITEMS
        added = pd.read_parquet(added_path) if added_path.is_file() else None
        items = merged_items(self.data.items, added)
        index, self.index_built = ItemIndex.load_or_build(self.model_dir / INDEX_DIR, self.model, self.backbone,
                                                          Catalog.from_items([items]), self.version)
        self._snapshot = self._make_snapshot(items, index)
        self._seen = index_stamp(self.model_dir / INDEX_DIR)

    # ---------------------------------------------------------------- catalog and index

    @property
    def snapshot(self) -> CatalogSnapshot:
        """The current catalog (re-read first if another process saved a newer index); a reader that needs it more
        than once takes it once and keeps it."""
        if index_stamp(self.model_dir / INDEX_DIR) != self._seen:
            with self._write_lock:
                self._refresh()
        return self._snapshot

    @property
    def index(self) -> ItemIndex:
        return self.snapshot.index

    @property
    def titles(self) -> np.ndarray:
        return self.snapshot.titles

    def _refresh(self) -> None:
        """Under the write lock: re-read the saved index and the added items if another process changed them."""
        folder = self.model_dir / INDEX_DIR
        stamp = index_stamp(folder)
        if stamp == self._seen:
            return
        index = ItemIndex.load(folder)  # a save that lands meanwhile changes the stamp again: read at the next call
        if index is not None and index.version == self.version:
            added = folder / ADDED_ITEMS
            items = merged_items(self.data.items, pd.read_parquet(added) if added.is_file() else None)
            self._snapshot = self._make_snapshot(items, index)
        self._seen = stamp

    def _make_snapshot(self, items: pd.DataFrame, index: ItemIndex) -> CatalogSnapshot:
        meta = items.set_index("item_id").reindex(index.item_ids)
        category = meta["category"] if "category" in meta else pd.Series("", index=meta.index)
        price = meta["price"] if "price" in meta else pd.Series(np.nan, index=meta.index)
        arrays = {
            "titles": meta["title"].astype(str).to_numpy(dtype=object),
            "categories": category.fillna("").astype(str).str.casefold().to_numpy(dtype=object),
            "prices": pd.to_numeric(price, errors="coerce").to_numpy(np.float64),
            "popularity": self._popularity_scores(index),
        }
        for array in arrays.values():
            array.flags.writeable = False
        return CatalogSnapshot(items=items, index=index, **arrays)

    def add_items(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Add or update items, embedded from their text in batches of ADD_BATCH; readers see either the catalog
        before or the one after, never a mix. -> added ids, updated ids, catalog size."""
        frame = pd.DataFrame([{k: r.get(k) for k in ITEM_FIELDS if k in r or k in ("item_id", "title")}
                              for r in records])
        frame["item_id"] = frame["item_id"].astype(str)
        frame = frame.drop_duplicates("item_id", keep="last").reset_index(drop=True)
        vectors = np.concatenate([embed(self.model, self.backbone, Catalog.from_items([frame.iloc[s:s + ADD_BATCH]]))
                                  for s in range(0, len(frame), ADD_BATCH)])
        folder = self.model_dir / INDEX_DIR
        with self._write_lock, folder_lock(folder):  # one write at a time, in this process and across workers
            self._refresh()  # build on the latest catalog, whichever worker wrote it
            current = self._snapshot
            updated = [i for i in frame["item_id"] if i in current.index.position]
            added = [i for i in frame["item_id"] if i not in current.index.position]
            items = merged_items(current.items, frame)
            index = current.index.upsert(list(frame["item_id"]), vectors, catalog_digest(Catalog.from_items([items])))
            path = folder / ADDED_ITEMS
            before = pd.read_parquet(path) if path.is_file() else None
            keep = pd.concat([before, frame]) if before is not None else frame
            keep.drop_duplicates("item_id", keep="last").to_parquet(path, index=False)
            index.save(folder)
            self._snapshot = self._make_snapshot(items, index)  # the one step that makes the items visible
            self._seen = index_stamp(folder)
        return {"added": added, "updated": updated, "catalog_size": len(index)}

    # ---------------------------------------------------------------- shoppers

    def _prepare_events(self) -> None:
        events = self.data.events.sort_values("timestamp", kind="stable")
        # one "now" for the whole shop: its last event + 1 s (ages and signals are counted back from it)
        now = events["timestamp"].max() + pd.Timedelta(seconds=1) if len(events) else pd.Timestamp(0)
        self._shop_now = int(now.value)
        codes, user_ids = event_codes(self.data)  # the encoding training examples use (items: rows of the items table)
        # each shopper's last events before now, by the function that builds training and evaluation histories
        shoppers = np.arange(len(user_ids), dtype=np.int32)
        items, kinds, ages = histories(shoppers, np.full(len(shoppers), self._shop_now, np.int64), codes["user"],
                                       codes["t"], codes["item"], codes["event"], self.history_length)
        item_ids = self.data.items["item_id"].astype(str).to_numpy(dtype=object)
        names = np.asarray(EVENT_TYPES, dtype=object)
        self._histories: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for shopper, user in enumerate(user_ids):
            real = items[shopper] >= 0
            self._histories[str(user)] = (item_ids[items[shopper][real]], names[kinds[shopper][real]],
                                          ages[shopper][real])
        purchases = events[events["event"] == "purchase"]
        self._bought = {str(u): set(g.astype(str)) for u, g in purchases.groupby("user_id")["item_id"]}
        self._log = EventLog.build(codes["user"], codes["item"], codes["event"], codes["t"])
        self._log_items = pd.Index(self.data.items["item_id"].astype(str))
        self._log_users = {str(u): i for i, u in enumerate(user_ids)}
        self._whole_history = {str(u): list(dict.fromkeys(g.astype(str)))
                               for u, g in events.groupby("user_id", sort=False)["item_id"]}
        counts = events.groupby(["item_id", "event"]).size().unstack(fill_value=0)
        self._impressions = counts.get("impression", pd.Series(dtype=float)).astype(float)
        self._purchases = counts.get("purchase", pd.Series(dtype=float)).astype(float)
        self.implicit = not bool((events["event"] == "impression").any())

    def _score_fields(self, scores: Scores, i: int) -> dict[str, float]:
        """The scores an item carries: pCTCVR, pCTR and pCVR on a shop with impressions; `p_purchase` alone on a
        purchase-only shop, where the split carries no information."""
        if self.implicit:
            return {"p_purchase": float(scores.p_ctcvr[i])}
        return {"p_ctcvr": float(scores.p_ctcvr[i]), "p_ctr": float(scores.p_ctr[i]), "p_cvr": float(scores.p_cvr[i])}

    def _popularity_scores(self, index: ItemIndex) -> np.ndarray:
        ids = pd.Index(index.item_ids.astype(str))
        impressions = self._impressions.reindex(ids, fill_value=0.0).to_numpy()
        purchases = self._purchases.reindex(ids, fill_value=0.0).to_numpy()
        rate = purchases.sum() / max(impressions.sum(), 1.0)
        return (purchases + POPULARITY_STRENGTH * rate) / (impressions + POPULARITY_STRENGTH)

    def knows(self, user_id: str) -> bool:
        return user_id in self._histories

    def match_shopper(self, user_id: str) -> ShopperMatch:
        """Find a shopper given as stored in the events table or, where the data folder has its `pseudonym.key`
        (an import pseudonymised the ids), as the raw id. PseudonymKeyError when that key cannot be used."""
        if self.knows(user_id):
            return ShopperMatch(user_id, "as given")
        key_file = Path(self.data.folder) / KEY_FILE
        if not key_file.is_file():
            return ShopperMatch(None, "", f"as given in {self.data.folder} (the folder has no {KEY_FILE}, so ids "
                                          "were not pseudonymised there)")
        hashed = pseudonym(user_id, merchant_key(self.data.folder))
        if self.knows(hashed):
            return ShopperMatch(hashed, f"as the raw id {user_id}: its pseudonym {hashed} under {key_file}")
        return ShopperMatch(None, "", f"as given and as a raw id (its pseudonym {hashed} under {key_file})")

    def history_of(self, user_id: str) -> History:
        if user_id not in self._histories:
            return History()
        items, events, ages = self._histories[user_id]
        return History(list(items), list(events), [float(a) for a in ages])

    def bought_by(self, user_id: str | None) -> set[str]:
        return self._bought.get(user_id, set()) if user_id else set()

    # ---------------------------------------------------------------- scoring

    def rows_of(self, item_ids: list[str]) -> np.ndarray:
        return self.snapshot.rows_of(item_ids)

    def signals(self, user_id: str | None, history: History, rows: np.ndarray, snap: CatalogSnapshot,
                stored: bool) -> np.ndarray:
        """(B, N_SIGNALS) signals of index `rows` for this shopper (`data/signals.py`, the functions training and
        evaluation use), at the shop's "now" (its last event + 1 s, the time history ages are counted back from). A
        stored shopper (`stored`): from the shop's log, over their whole history. An ad-hoc history: the
        candidate-in-history part from the events given, the item statistics from the shop's log."""
        row_ids = snap.index.item_ids[rows].astype(str)
        items = self._log_items.get_indexer(row_ids)
        now = self._shop_now
        if stored and user_id in self._log_users:
            return self._log.grid(np.array([self._log_users[user_id]]), items, np.array([now]))[0]
        ids = pd.Index(pd.unique(np.concatenate([np.asarray(history.item_ids, dtype=object),
                                                 row_ids.astype(object)])))
        times = now - (np.asarray(history.age_hours, np.float64) * 3.6e12).astype(np.int64)
        own = EventLog.build(np.zeros(len(history), np.int64), ids.get_indexer(history.item_ids),
                             pd.Index(EVENT_TYPES).get_indexer(history.events), times)
        at = np.full(len(rows), now, np.int64)
        return np.concatenate([own.pair_signals(np.zeros(len(rows), np.int64),
                                                ids.get_indexer(row_ids), at),
                               self._log.item_signals(items, at)], 1)

    def _history(self, user_id: str | None, history: History | None, snap: CatalogSnapshot) -> tuple[History, bool]:
        """The history to score: an ad-hoc one (its last `history_length` events, as the model was trained with)
        or the stored one (then True); UnknownItems for history items not in the catalog."""
        stored = history is None or not len(history)
        if stored:
            history = self.history_of(user_id) if user_id else History()
        history = history.last(self.history_length)
        snap.rows_of(history.item_ids)
        return history, stored and bool(user_id)

    def _allowed(self, snap: CatalogSnapshot, filters: Filters, bought: set[str]) -> np.ndarray:
        allowed = np.ones(len(snap.index), dtype=bool)
        if filters.category:
            allowed &= snap.categories == filters.category.casefold()
        if filters.min_price is not None:
            allowed &= snap.prices >= filters.min_price
        if filters.max_price is not None:
            allowed &= snap.prices <= filters.max_price
        if filters.exclude_bought and bought:
            allowed[[snap.index.position[i] for i in bought if i in snap.index.position]] = False
        return allowed

    def query(self, snap: CatalogSnapshot, history: History) -> np.ndarray:
        """The retrieval query of a history: the weighted mean of its items' unit embeddings, normalised."""
        weights = np.asarray([EVENT_WEIGHT.get(e, 1.0) for e in history.events], np.float32)
        weights *= np.linspace(0.5, 1.0, len(weights), dtype=np.float32)  # later events weigh more
        query = weights @ snap.index.unit[snap.rows_of(history.item_ids)]
        return (query / max(float(np.linalg.norm(query)), 1e-12)).astype(np.float32)

    def retrieve(self, snap: CatalogSnapshot, history: History, allowed: np.ndarray | None, n: int) -> np.ndarray:
        """Stage one: the `n` allowed rows with the largest dot product with the history's query, best first."""
        rows, _ = snap.index.top(self.query(snap, history), n, allowed)
        return rows

    def recommend(self, user_id: str | None = None, history: History | None = None, k: int = 10,
                  filters: Filters | None = None) -> dict[str, Any]:
        """Top `k` items by pCTCVR for a stored shopper (`user_id`) or an ad-hoc `history` (which wins); without
        history, the top `k` by popularity (each item's `popularity` is then the score it is ranked by)."""
        filters = filters or Filters()
        snap = self.snapshot  # one consistent catalog for the whole request, even if items are added meanwhile
        history, stored = self._history(user_id, history, snap)
        bought = self.bought_by(user_id) | {i for i, e in zip(history.item_ids, history.events, strict=True)
                                            if e == "purchase"}
        allowed = self._allowed(snap, filters, bought)
        if not len(history):
            return self._cold_start(snap, allowed, k)
        rows = self.retrieve(snap, history, allowed, max(self.candidates, k))
        past = [snap.index.position[i] for i in (self._whole_history.get(user_id, []) if stored else history.item_ids)
                if i in snap.index.position]
        retrieved = set(rows.tolist())
        rows = np.concatenate([rows, [r for r in dict.fromkeys(past) if allowed[r] and r not in retrieved]]
                              ).astype(np.int64)
        signals = self.signals(user_id, history, rows, snap, stored)
        scores = score_rows(self.model, snap.index, rows, history, signals)
        order = np.argsort(-scores.p_ctcvr, kind="stable")[:k]
        top = rows[order]
        distinct, drops = contributions(self.model, snap.index, top, history, scores.p_ctcvr[order], signals[order])
        items: list[dict[str, Any]] = []
        for n, i in enumerate(order):
            because = explain(drops[n], scores.attention[i], distinct, history, snap.title_of)
            items.append({"item_id": str(snap.index.item_ids[rows[i]]), "title": snap.titles[rows[i]],
                          **self._score_fields(scores, i), "because": because, "reason": reason(because)})
        return {"items": items, "cold_start": False, "ranking": "p_purchase" if self.implicit else "pctcvr",
                "model_version": self.version}

    def _cold_start(self, snap: CatalogSnapshot, allowed: np.ndarray, k: int) -> dict[str, Any]:
        """The top `k` allowed items by popularity, with the model's scores for an empty history beside it."""
        popularity = np.where(allowed, snap.popularity, -np.inf)
        rows = np.argsort(-popularity, kind="stable")[:min(k, int(np.isfinite(popularity).sum()))]
        scores = score_rows(self.model, snap.index, rows, History(),
                            self.signals(None, History(), rows, snap, stored=False))
        items = [{"item_id": str(snap.index.item_ids[r]), "title": snap.titles[r],
                  "popularity": float(snap.popularity[r]), **self._score_fields(scores, i), "because": [],
                  "reason": ""}
                 for i, r in enumerate(rows)]
        return {"items": items, "cold_start": True, "ranking": "popularity-by-conversion",
                "model_version": self.version}

    def score(self, user_id: str | None, item_ids: list[str], history: History | None = None) -> dict[str, Any]:
        """The scores of the given items for a shopper, in the order given (see `_score_fields`)."""
        snap = self.snapshot
        rows = snap.rows_of(item_ids)
        history, stored = self._history(user_id, history, snap)
        scores = score_rows(self.model, snap.index, rows, history, self.signals(user_id, history, rows, snap, stored))
        return {"items": [{"item_id": str(item), "title": snap.titles[row], **self._score_fields(scores, i)}
                          for i, (item, row) in enumerate(zip(item_ids, rows, strict=True))],
                "cold_start": not len(history), "model_version": self.version}

    def similar(self, item_id: str, k: int = 10) -> dict[str, Any]:
        """Items whose embeddings are closest (cosine) to the item's."""
        snap = self.snapshot
        row = snap.rows_of([item_id])[0]
        allowed = np.ones(len(snap.index), dtype=bool)
        allowed[row] = False
        rows, scores = snap.index.top(snap.index.unit[row], k, allowed)
        return {"item_id": item_id, "title": snap.titles[row],
                "items": [{"item_id": str(snap.index.item_ids[r]), "title": snap.titles[r], "similarity": float(s)}
                          for r, s in zip(rows, scores, strict=True)]}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model_version": self.version, "catalog_size": len(self.snapshot.index),
                "encoder": self.model.config.encoder or "all-MiniLM-L6-v2 (packaged)", "merchant": self.data.name,
                "shoppers": len(self._histories)}


def open_recommender(model_dir: Path, data_dir: Path, **kwargs: Any) -> Recommender:
    """A Recommender, or ModelConfigError naming what is wrong with the folders (nothing started)."""
    if not Path(model_dir).is_dir():
        raise ModelConfigError(f"--model-dir {model_dir} does not exist: pass the folder a node saved the "
                               "pushed-back model into (its --model-dir), or a run's model/ folder.")
    return Recommender(model_dir, data_dir, **kwargs)
