"""A merchant's recommendations from the pushed-back global model: two stages, explanations, cold start.

`Recommender(model_dir, data_dir)` loads the model folder, the merchant's own data folder (one merchant: nothing of
another merchant is ever read) and the item index (`item_index.py`, rebuilt when the model version or the catalog
changes). For a shopper's history (stored, or given ad hoc):

1. retrieval: the query is the weighted mean of the history items' unit embeddings (purchase 3, cart 2, click 1,
   impression 0.25; later events weigh more); the `candidates` items with the largest dot product with it are kept,
   after the filters (category, price range, already bought);
2. re-ranking: the full model (target-aware user tower + ESMM head) scores each candidate: pCTR, pCVR and
   pCTCVR = pCTR x pCVR; items are ranked by pCTCVR;
3. explanations: for each item, the history items with the largest attention weights of the user tower, in words
   ("because you bought X and viewed Y").

A shopper without history gets the cold-start ranking: popularity by conversion, (purchases + m p) /
(impressions + m) with p the merchant's purchase rate per impression and m = 20, flagged `cold_start`. New items
(`add_items`) are embedded from their text at once and can be recommended immediately; they are kept in
`<model-dir>/index/added-items.parquet` and survive a restart.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedcvr.shared.data.contract import EVENT_TYPES
from fedcvr.shared.data.loader import load_merchant
from fedcvr.shared.model.errors import ModelConfigError
from fedcvr.shared.model.esmm import ScoreInputs
from fedcvr.shared.model.folder import load_model_folder
from fedcvr.shared.training.data import Catalog

from .item_index import INDEX_DIR, ItemIndex, catalog_digest, embed

ADDED_ITEMS = "added-items.parquet"
EVENT_WEIGHT = {"impression": 0.25, "click": 1.0, "cart": 2.0, "purchase": 3.0}
VERB = {"impression": "saw", "click": "viewed", "cart": "added to your cart", "purchase": "bought"}
POPULARITY_STRENGTH = 20.0  # m: impressions' worth of the merchant's average conversion every item starts with
ITEM_FIELDS = ("item_id", "title", "description", "category", "brand", "price")


class UnknownItems(KeyError):
    """Item ids not in the catalog; `ids` lists them."""

    def __init__(self, ids: list[str]):
        super().__init__(ids)
        self.ids = ids

    def __str__(self) -> str:
        return f"unknown item id(s): {', '.join(self.ids[:20])}" + (" ..." if len(self.ids) > 20 else "")


@dataclass
class History:
    """A shopper's recent events, oldest first: item ids, event types, ages in hours at scoring time."""

    item_ids: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    age_hours: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass
class Filters:
    category: str | None = None
    min_price: float | None = None
    max_price: float | None = None
    exclude_bought: bool = True


def model_version(model_dir: Path, settings: dict) -> str:
    version_file = model_dir / "VERSION"
    if version_file.is_file():
        return version_file.read_text().strip()
    return str(settings.get("version") or "unversioned")


def merged_items(base: pd.DataFrame, added: pd.DataFrame | None) -> pd.DataFrame:
    """The catalog: the merchant's items with added ones replacing those of the same id, new ones at the end."""
    base = base.reindex(columns=[c for c in ITEM_FIELDS if c in base.columns or c in ("item_id", "title")])
    if added is None or added.empty:
        return base.reset_index(drop=True)
    added = added.drop_duplicates("item_id", keep="last").set_index("item_id")
    merged = base.set_index("item_id")
    for column in added.columns:
        if column not in merged.columns:
            merged[column] = np.nan if column == "price" else ""
    merged = merged.astype({c: object for c in merged.columns if c != "price"})
    known = added.index.intersection(merged.index)
    merged.loc[known, added.columns] = added.loc[known].to_numpy()
    new = added.loc[added.index.difference(merged.index, sort=False)]
    return pd.concat([merged, new]).rename_axis("item_id").reset_index()


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
        self._lock = threading.Lock()
        added_path = self.model_dir / INDEX_DIR / ADDED_ITEMS
        added = pd.read_parquet(added_path) if added_path.is_file() else None
        self.index_built = False
        self._set_catalog(merged_items(self.data.items, added), rebuild=True)
        self._prepare_events()

    # ---------------------------------------------------------------- catalog and index

    def _set_catalog(self, items: pd.DataFrame, rebuild: bool, index: ItemIndex | None = None) -> None:
        catalog = Catalog.from_items([items])
        if rebuild:
            index, self.index_built = ItemIndex.load_or_build(self.model_dir / INDEX_DIR, self.model, self.backbone,
                                                              catalog, self.version)
        meta = items.set_index("item_id").reindex(index.item_ids)
        self.items = items
        self.index = index
        self.titles = meta["title"].astype(str).to_numpy(dtype=object)
        category = meta["category"] if "category" in meta else pd.Series("", index=meta.index)
        self.categories = category.fillna("").astype(str).str.casefold().to_numpy(dtype=object)
        price = meta["price"] if "price" in meta else pd.Series(np.nan, index=meta.index)
        self.prices = pd.to_numeric(price, errors="coerce").to_numpy(np.float64)

    def add_items(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Add or update items; each is embedded from its text at once. -> added ids, updated ids, catalog size."""
        frame = pd.DataFrame([{k: r.get(k) for k in ITEM_FIELDS if k in r or k in ("item_id", "title")}
                              for r in records])
        frame["item_id"] = frame["item_id"].astype(str)
        frame = frame.drop_duplicates("item_id", keep="last")
        with self._lock:
            known = set(self.index.position)
            updated = [i for i in frame["item_id"] if i in known]
            added = [i for i in frame["item_id"] if i not in known]
            items = merged_items(self.items, frame)
            vectors = embed(self.model, self.backbone, Catalog.from_items([frame]))
            index = self.index.upsert(list(frame["item_id"]), vectors, catalog_digest(Catalog.from_items([items])))
            folder = self.model_dir / INDEX_DIR
            path = folder / ADDED_ITEMS
            before = pd.read_parquet(path) if path.is_file() else None
            keep = pd.concat([before, frame]) if before is not None else frame
            keep.drop_duplicates("item_id", keep="last").to_parquet(path, index=False)
            index.save(folder)
            self._set_catalog(items, rebuild=False, index=index)
            self._popularity = self._popularity_scores()
        return {"added": added, "updated": updated, "catalog_size": len(self.index)}

    # ---------------------------------------------------------------- shoppers

    def _prepare_events(self) -> None:
        events = self.data.events.sort_values("timestamp", kind="stable")
        recent = events.groupby("user_id", sort=False).tail(self.history_length)
        self._histories: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for user, rows in recent.groupby("user_id", sort=False):
            now = rows["timestamp"].max() + pd.Timedelta(seconds=1)
            ages = ((now - rows["timestamp"]).dt.total_seconds() / 3600).to_numpy(np.float32)
            self._histories[str(user)] = (rows["item_id"].astype(str).to_numpy(dtype=object),
                                          rows["event"].astype(str).to_numpy(dtype=object), ages)
        purchases = events[events["event"] == "purchase"]
        self._bought = {str(u): set(g.astype(str)) for u, g in purchases.groupby("user_id")["item_id"]}
        counts = events.groupby(["item_id", "event"]).size().unstack(fill_value=0)
        self._impressions = counts.get("impression", pd.Series(dtype=float)).astype(float)
        self._purchases = counts.get("purchase", pd.Series(dtype=float)).astype(float)
        self._popularity = self._popularity_scores()

    def _popularity_scores(self) -> np.ndarray:
        ids = pd.Index(self.index.item_ids.astype(str))
        impressions = self._impressions.reindex(ids, fill_value=0.0).to_numpy()
        purchases = self._purchases.reindex(ids, fill_value=0.0).to_numpy()
        rate = purchases.sum() / max(impressions.sum(), 1.0)
        return (purchases + POPULARITY_STRENGTH * rate) / (impressions + POPULARITY_STRENGTH)

    def knows(self, user_id: str) -> bool:
        return user_id in self._histories

    def history_of(self, user_id: str) -> History:
        if user_id not in self._histories:
            return History()
        items, events, ages = self._histories[user_id]
        return History(list(items), list(events), [float(a) for a in ages])

    def bought_by(self, user_id: str | None) -> set[str]:
        return self._bought.get(user_id, set()) if user_id else set()

    # ---------------------------------------------------------------- scoring

    def rows_of(self, item_ids: list[str]) -> np.ndarray:
        missing = [i for i in item_ids if i not in self.index.position]
        if missing:
            raise UnknownItems(missing)
        return np.asarray([self.index.position[i] for i in item_ids], dtype=np.int64)

    @torch.no_grad()
    def _score(self, index: ItemIndex, rows: np.ndarray, history: History) -> tuple[np.ndarray, ...]:
        """pCTR, pCVR, pCTCVR (B,) and attention (B, L) of candidate rows for a history (rows of the index)."""
        b = len(rows)
        hist_rows = np.asarray([index.position[i] for i in history.item_ids], dtype=np.int64)
        length = max(len(hist_rows), 1)
        embeddings = torch.from_numpy(index.embeddings[np.concatenate([rows, hist_rows])])
        positions = torch.arange(b, b + len(hist_rows)) if len(hist_rows) else torch.zeros(1, dtype=torch.long)
        codes = pd.Index(EVENT_TYPES).get_indexer(history.events).astype(np.int64) if len(history) else [0]
        ages = history.age_hours if len(history) else [0.0]
        inputs = ScoreInputs(
            target=torch.arange(b),
            history=positions.repeat(b, 1),
            history_mask=torch.full((b, length), bool(len(history))),
            events=torch.as_tensor(codes, dtype=torch.long).repeat(b, 1),
            age_hours=torch.as_tensor(ages, dtype=torch.float32).repeat(b, 1),
            position=torch.zeros(b, dtype=torch.long),
        )
        ctr, cvr, attention = self.model.score(embeddings, inputs)
        p_ctr, p_cvr = torch.sigmoid(ctr).numpy(), torch.sigmoid(cvr).numpy()
        return p_ctr, p_cvr, p_ctr * p_cvr, attention.numpy()

    def _allowed(self, filters: Filters, bought: set[str]) -> np.ndarray | None:
        allowed = np.ones(len(self.index), dtype=bool)
        if filters.category:
            allowed &= self.categories == filters.category.casefold()
        if filters.min_price is not None:
            allowed &= self.prices >= filters.min_price
        if filters.max_price is not None:
            allowed &= self.prices <= filters.max_price
        if filters.exclude_bought and bought:
            allowed[[self.index.position[i] for i in bought if i in self.index.position]] = False
        return allowed

    def _because(self, weights: np.ndarray, history: History, limit: int = 2) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for position in np.argsort(-weights, kind="stable"):
            if len(out) == limit or weights[position] <= 0:
                break
            item = history.item_ids[position]
            if item in seen:
                continue
            seen.add(item)
            row = self.index.position[item]
            out.append({"item_id": item, "title": self.titles[row], "event": history.events[position],
                        "weight": round(float(weights[position]), 4)})
        return out

    @staticmethod
    def reason(because: list[dict[str, Any]]) -> str:
        if not because:
            return ""
        parts = [f"{VERB.get(b['event'], 'saw')} {b['title']}" for b in because]
        return "because you " + " and ".join(parts)

    def query(self, index: ItemIndex, history: History) -> np.ndarray:
        """The retrieval query of a history: the weighted mean of its items' unit embeddings, normalised."""
        weights = np.asarray([EVENT_WEIGHT.get(e, 1.0) for e in history.events], np.float32)
        weights *= np.linspace(0.5, 1.0, len(weights), dtype=np.float32)  # later events weigh more
        query = weights @ index.unit[self.rows_of(history.item_ids)]
        return (query / max(float(np.linalg.norm(query)), 1e-12)).astype(np.float32)

    def retrieve(self, index: ItemIndex, history: History, allowed: np.ndarray | None, n: int) -> np.ndarray:
        """Stage one: the `n` allowed rows with the largest dot product with the history's query, best first."""
        rows, _ = index.top(self.query(index, history), n, allowed)
        return rows

    def recommend(self, user_id: str | None = None, history: History | None = None, k: int = 10,
                  filters: Filters | None = None) -> dict[str, Any]:
        """Top `k` items by pCTCVR for a stored shopper (`user_id`) or an ad-hoc `history` (which wins)."""
        filters = filters or Filters()
        if history is None or not len(history):
            history = self.history_of(user_id) if user_id else History()
        index = self.index  # one consistent snapshot even if items are added meanwhile
        self.rows_of(history.item_ids)  # unknown history items -> UnknownItems
        bought = self.bought_by(user_id) | {i for i, e in zip(history.item_ids, history.events, strict=True)
                                            if e == "purchase"}
        allowed = self._allowed(filters, bought)
        cold = not len(history)
        if cold:
            popularity = np.where(allowed, self._popularity, -np.inf)
            n = min(k, int(np.isfinite(popularity).sum()))
            rows = np.argsort(-popularity, kind="stable")[:n]
        else:
            rows = self.retrieve(index, history, allowed, max(self.candidates, k))
        items: list[dict[str, Any]] = []
        if len(rows):
            p_ctr, p_cvr, p_ctcvr, attention = self._score(index, rows, history)
            order = np.arange(len(rows)) if cold else np.argsort(-p_ctcvr, kind="stable")[:k]
            for i in order:
                because = [] if cold else self._because(attention[i], history)
                items.append({"item_id": str(index.item_ids[rows[i]]), "title": self.titles[rows[i]],
                              "p_ctcvr": float(p_ctcvr[i]), "p_ctr": float(p_ctr[i]), "p_cvr": float(p_cvr[i]),
                              "because": because, "reason": self.reason(because)})
        return {"items": items, "cold_start": cold,
                "ranking": "popularity-by-conversion" if cold else "pctcvr", "model_version": self.version}

    def score(self, user_id: str | None, item_ids: list[str], history: History | None = None) -> dict[str, Any]:
        """The three scores of the given items for a shopper, in the order given."""
        index = self.index
        rows = self.rows_of(item_ids)
        if history is None or not len(history):
            history = self.history_of(user_id) if user_id else History()
        self.rows_of(history.item_ids)
        p_ctr, p_cvr, p_ctcvr, _ = self._score(index, rows, history) if len(rows) else ([], [], [], None)
        return {"items": [{"item_id": str(item), "title": self.titles[row], "p_ctcvr": float(a), "p_ctr": float(b),
                           "p_cvr": float(c)} for item, row, a, b, c in zip(item_ids, rows, p_ctcvr, p_ctr, p_cvr,
                                                                            strict=True)],
                "cold_start": not len(history), "model_version": self.version}

    def similar(self, item_id: str, k: int = 10) -> dict[str, Any]:
        """Items whose embeddings are closest (cosine) to the item's."""
        index = self.index
        row = self.rows_of([item_id])[0]
        allowed = np.ones(len(index), dtype=bool)
        allowed[row] = False
        rows, scores = index.top(index.unit[row], k, allowed)
        return {"item_id": item_id, "title": self.titles[row],
                "items": [{"item_id": str(index.item_ids[r]), "title": self.titles[r], "similarity": float(s)}
                          for r, s in zip(rows, scores, strict=True)]}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model_version": self.version, "catalog_size": len(self.index),
                "encoder": self.model.config.encoder or "all-MiniLM-L6-v2 (packaged)", "merchant": self.data.name,
                "shoppers": len(self._histories)}


def open_recommender(model_dir: Path, data_dir: Path, **kwargs: Any) -> Recommender:
    """A Recommender, or ModelConfigError naming what is wrong with the folders (nothing started)."""
    if not Path(model_dir).is_dir():
        raise ModelConfigError(f"--model-dir {model_dir} does not exist: pass the folder a node saved the "
                               "pushed-back model into (its --model-dir), or a run's model/ folder.")
    return Recommender(model_dir, data_dir, **kwargs)
