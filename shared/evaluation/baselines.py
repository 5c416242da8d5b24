"""The classic recommenders a shop would run instead of fedcvr's model, fitted on purchases before a cut.

Each baseline is fitted on the purchases strictly before the cut (`Purchases`) and scores every catalog item for
each shopper; `pop` below is the popularity score scaled into [0, 1), used to break ties.

    popularity  B_W(i) + B(i) / (1 + max B): distinct buyers of i in the last W days before the cut, all-time
                distinct buyers B as ties. Setting: days W.
    repeat      the shopper's own past items first, by recency-weighted frequency
                F(u, i) = sum over u's purchases of i of 0.5 ^ (age in days / half-life), then popularity:
                1[F > 0] x (1 + F / max_i F(u, i)) + 1e-6 x pop(i). Setting: half-life (inf = plain counts).
    item-knn    item-item cosine over co-purchases, S(i, j) = c(i, j) / sqrt(b(i) b(j)) with c the shoppers who
                bought both and b(i) the buyers of i, S(i, i) = 0, each item keeping its k most similar items
                (k = 0: all); score(u, j) = sum over the distinct items i u bought of S(i, j), + 1e-6 x pop(j).
                Setting: neighbours k.
    als         implicit-feedback matrix factorisation (`implicit.als.AlternatingLeastSquares`, confidence
                1 + alpha x purchase count); score = user factors . item factors. Settings: factors, alpha.
    text        cosine of the item's text embedding (the encoder's mean-pooled last hidden state, all-MiniLM-L6-v2
                by default) to the mean unit embedding of the shopper's last R distinct purchased items.
                Setting: recent R.

With tuning on (`baselines.tune`), each baseline's setting is the one of its grid (`GRIDS`) with the best
validation NDCG@10 (next basket, "all" variant); otherwise `defaults`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..settings import Section, SettingsError
from . import BASELINES
from .baskets import Purchases

NAMES = BASELINES
TIE_WEIGHT = 1e-6
_DAY_NS = 86_400 * 1_000_000_000

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""scorer(shoppers (S,), pool (C,) catalog rows) -> scores (S, C), higher first."""


class BaselineError(SettingsError):
    """A bad baselines setting; the message names the key, the value and the fix."""


@dataclass(frozen=True)
class BaselineConfig(Section):
    """How baselines are fitted; `baselines.*` keys of the run config."""

    popularity_days: float
    tune: bool
    als_iterations: int

    KEYS = {"baselines.popularity-days": "popularity_days", "baselines.tune": "tune",
            "baselines.als-iterations": "als_iterations"}
    ERROR = BaselineError

    def __post_init__(self) -> None:
        if not self.popularity_days > 0:
            raise BaselineError(f"baselines.popularity-days = {self.popularity_days}: must be > 0 (days), e.g. 30")
        if self.als_iterations < 1:
            raise BaselineError(f"baselines.als-iterations = {self.als_iterations}: must be >= 1, e.g. 15")

    def default_setting(self, name: str) -> dict[str, Any]:
        return {"popularity": {"days": self.popularity_days}, "repeat": {"half_life_days": 30.0},
                "item-knn": {"neighbours": 100}, "als": {"factors": 64, "alpha": 1.0},
                "text": {"recent": 5}}[name]

    def grid(self, name: str) -> list[dict[str, Any]]:
        """The settings tried on the validation split (the default among them)."""
        if not self.tune:
            return [self.default_setting(name)]
        grids: dict[str, list[dict[str, Any]]] = {
            "popularity": [{"days": d} for d in sorted({7.0, 14.0, 30.0, 90.0, 365.0, self.popularity_days})],
            "repeat": [{"half_life_days": h} for h in (7.0, 30.0, 90.0, 365.0, math.inf)],
            "item-knn": [{"neighbours": k} for k in (20, 100, 0)],
            "als": [{"factors": f, "alpha": a} for f in (32, 64, 128) for a in (1.0, 10.0)],
            "text": [{"recent": r} for r in (1, 5, 20)],
        }
        return grids[name]


def check_names(names: list[str], where: str) -> list[str]:
    """The baseline names, checked; BaselineError naming `where`, the unknown name and the known ones."""
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise BaselineError(f"{where}: unknown baseline(s) {', '.join(map(repr, unknown))}; the baselines are "
                            f"{', '.join(NAMES)}")
    return list(dict.fromkeys(names))


class _Shoppers:
    """The fitting purchases as a sparse shopper x item matrix (weights per purchase summed)."""

    def __init__(self, data: Purchases, n_items: int, weights: np.ndarray | None = None):
        self.ids = np.unique(data.user)
        rows = np.searchsorted(self.ids, data.user)
        values = np.ones(len(data)) if weights is None else weights
        self.matrix = sp.csr_matrix((values, (rows, data.item)), shape=(len(self.ids), n_items))
        self.matrix.sum_duplicates()

    def index(self, shoppers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of each shopper, whether it has one): shoppers without purchases here have none."""
        at = np.searchsorted(self.ids, shoppers)
        found = np.zeros(len(shoppers), bool)
        if len(self.ids):  # no purchases before the cut (a merchant whose shoppers only clicked): all rows empty
            found = (at < len(self.ids)) & (self.ids[np.minimum(at, len(self.ids) - 1)] == shoppers)
        return np.minimum(at, max(len(self.ids) - 1, 0)), found

    def rows(self, shoppers: np.ndarray) -> sp.csr_matrix:
        """The rows of `shoppers` (empty rows for shoppers without purchases here)."""
        at, found = self.index(shoppers)
        picker = sp.csr_matrix((np.ones(int(found.sum())), (np.flatnonzero(found), at[found])),
                               shape=(len(shoppers), len(self.ids)))
        return (picker @ self.matrix).tocsr()


def popularity_scores(data: Purchases, n_items: int, cut: int, days: float) -> np.ndarray:
    """B_W(i) + B(i) / (1 + max B) for every catalog row (see the module doc)."""
    pairs = np.unique(np.stack([data.user, data.item]), axis=1) if len(data) else np.zeros((2, 0), np.int64)
    all_time = np.bincount(pairs[1], minlength=n_items).astype(np.float64)
    recent = data.subset(data.t >= cut - int(days * _DAY_NS))
    recent_pairs = np.unique(np.stack([recent.user, recent.item]), axis=1) if len(recent) else np.zeros((2, 0),
                                                                                                        np.int64)
    window = np.bincount(recent_pairs[1], minlength=n_items).astype(np.float64)
    return window + all_time / (1.0 + all_time.max(initial=0.0))


def _tie_break(data: Purchases, n_items: int, cut: int, days: float) -> np.ndarray:
    pop = popularity_scores(data, n_items, cut, days)
    return TIE_WEIGHT * pop / (1.0 + pop.max(initial=0.0))


def fit(name: str, params: dict[str, Any], data: Purchases, n_items: int, cut: int, config: BaselineConfig,
        embeddings: np.ndarray | None = None, seed: int = 0) -> Scorer:
    """Fit baseline `name` with `params` on `data` (purchases before `cut`); returns its scorer."""
    if name == "popularity":
        pop = popularity_scores(data, n_items, cut, float(params["days"]))
        return lambda shoppers, pool: np.broadcast_to(pop[pool], (len(shoppers), len(pool)))
    ties = _tie_break(data, n_items, cut, config.popularity_days)
    if name == "repeat":
        age_days = (cut - data.t) / _DAY_NS
        half_life = float(params["half_life_days"])
        weights = np.ones(len(data)) if math.isinf(half_life) else 0.5 ** (age_days / half_life)
        history = _Shoppers(data, n_items, weights)

        def repeat(shoppers: np.ndarray, pool: np.ndarray) -> np.ndarray:
            freq = history.rows(shoppers)[:, pool].toarray()
            top = freq.max(axis=1, keepdims=True, initial=0.0)
            own = np.where(freq > 0, 1.0 + freq / np.where(top > 0, top, 1.0), 0.0)
            return own + ties[pool]
        return repeat
    if name == "item-knn":
        bought = _Shoppers(data, n_items)
        binary = bought.matrix.copy()
        binary.data[:] = 1.0
        similarity = _cosine(binary, int(params["neighbours"]))
        return lambda shoppers, pool: ((bought.rows(shoppers) > 0).astype(np.float64) @ similarity[:, pool]
                                       ).toarray() + ties[pool]
    if name == "als":
        return _fit_als(data, n_items, params, config, seed, ties)
    if name == "text":
        if embeddings is None:
            raise BaselineError("the text baseline needs the items' text embeddings; none were given")
        return _fit_text(data, embeddings, int(params["recent"]))
    raise BaselineError(f"unknown baseline {name!r}; the baselines are {', '.join(NAMES)}")


def _cosine(binary: sp.csr_matrix, neighbours: int) -> sp.csr_matrix:
    """Item x item cosine of co-purchases, zero diagonal, each row cut to its `neighbours` largest (0 = all)."""
    buyers = np.asarray(binary.sum(axis=0)).ravel()
    norm = sp.diags(1.0 / np.sqrt(np.maximum(buyers, 1.0)))
    similarity = (norm @ (binary.T @ binary) @ norm).tocsr()
    similarity.setdiag(0.0)
    similarity.eliminate_zeros()
    if neighbours > 0:
        indptr, data = similarity.indptr, similarity.data
        for row in range(similarity.shape[0]):
            start, end = indptr[row], indptr[row + 1]
            if end - start > neighbours:
                values = data[start:end]
                cut = np.partition(values, -neighbours)[-neighbours]
                drop = np.flatnonzero(values < cut)
                values[drop] = 0.0  # ties at the cut value are all kept
        similarity.eliminate_zeros()
    return similarity  # row i: the items similar to a bought item i; history @ similarity scores candidates


def _fit_als(data: Purchases, n_items: int, params: dict[str, Any], config: BaselineConfig, seed: int,
             ties: np.ndarray) -> Scorer:
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from ..training.loop import cpu_threads

    counts = _Shoppers(data, n_items)
    if counts.matrix.nnz == 0:
        return lambda shoppers, pool: np.broadcast_to(ties[pool], (len(shoppers), len(pool)))
    # implicit weighs an observed pair by the matrix value times its own alpha (unobserved pairs weigh 1), so the
    # confidence 1 + alpha x count goes in as the matrix, with implicit's alpha left at 1
    confidence = counts.matrix.astype(np.float32).tocsr()
    confidence.data = (1.0 + float(params["alpha"]) * confidence.data).astype(np.float32)
    with threadpool_limits(1, "blas"):  # implicit runs its own threads; BLAS threads inside them slow it down
        model = AlternatingLeastSquares(factors=int(params["factors"]), alpha=1.0, regularization=0.01,
                                        iterations=config.als_iterations, random_state=seed,
                                        num_threads=cpu_threads(), use_gpu=False)
        model.fit(confidence, show_progress=False)
    users, items = np.asarray(model.user_factors), np.asarray(model.item_factors)

    def als(shoppers: np.ndarray, pool: np.ndarray) -> np.ndarray:
        at, found = counts.index(shoppers)
        factors = np.where(found[:, None], users[at], 0.0)
        return factors.astype(np.float64) @ items[pool].T.astype(np.float64) + ties[pool]
    return als


def _fit_text(data: Purchases, embeddings: np.ndarray, recent: int) -> Scorer:
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    # each shopper's last `recent` distinct items: last purchase time per (shopper, item), newest first
    order = np.lexsort((-data.t, data.user))
    user, item = data.user[order], data.item[order]
    first = np.ones(len(user), bool)
    if len(user):
        pair = np.stack([user, item])
        _, keep = np.unique(pair, axis=1, return_index=True)
        first[:] = False
        first[keep] = True  # np.unique keeps the first occurrence: the newest purchase of each pair
    user, item, t = user[first], item[first], data.t[order][first]
    again = np.lexsort((-t, user))
    user, item = user[again], item[again]
    ids, starts = np.unique(user, return_index=True)

    def text(shoppers: np.ndarray, pool: np.ndarray) -> np.ndarray:
        profiles = np.zeros((len(shoppers), unit.shape[1]))
        at = np.searchsorted(ids, shoppers)
        for s, (shopper, where) in enumerate(zip(shoppers, at, strict=True)):
            if where < len(ids) and ids[where] == shopper:
                end = starts[where + 1] if where + 1 < len(ids) else len(user)
                chosen = item[starts[where]:min(end, starts[where] + recent)]
                profiles[s] = unit[chosen].mean(0)
        profiles /= np.maximum(np.linalg.norm(profiles, axis=1, keepdims=True), 1e-12)
        return profiles @ unit[pool].T
    return text
