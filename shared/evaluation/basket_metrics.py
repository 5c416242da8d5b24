"""Next-basket ranking metrics: per-shopper values, mergeable sums, and means with bootstrap 95% intervals.

Each shopper's whole merchant catalog is ranked (no sampled negatives); ties are broken by one fixed random order
of the catalog (the same for every ranker). With R the shopper's relevant items (`baskets.py`) and hit_r = 1 when
the item at rank r is in R:

    ndcg@K    = sum_{r <= K} hit_r / log2(r + 1)  /  sum_{r <= min(|R|, K)} 1 / log2(r + 1)
    hr@K      = 1 if some item of R ranks in the top K, else 0
    recall@K  = (items of R in the top K) / |R|

Two variants: "all" ranks every catalog item against R; "new" removes the items the shopper bought before the cut
from both the ranking and R (shoppers whose R is then empty are left out of it). Each metric is the mean over
shoppers.

Sums (what a node sends; keys add up across nodes): `nb.{variant}.n` shoppers, and per metric
`nb.{variant}.{metric}.hist` (shoppers per value bin: HIST_BINS equal bins of [0, 1], the last holding 1) and
`.hist_sum` (the sum of the values in each bin). The server's mean is sum(hist_sum) / n, exact; its 95% interval
is the 2.5 and 97.5 percentiles of BOOTSTRAP means of n shoppers resampled with replacement, each bin standing
for its shoppers with their bin's mean value (binary metrics are exact; others move by at most 1/HIST_BINS).
"""

from __future__ import annotations

import numpy as np

PREFIX = "nb"
VARIANTS = ("all", "new")
METRICS = ("ndcg@10", "hr@10", "recall@10", "ndcg@50")
TOP = 50
HIST_BINS = 1000
BOOTSTRAP = 1000
TIE_SEED = 20111101

FORMULAS = {
    "ndcg@K": "next basket: mean over shoppers of sum_{r <= K} hit_r / log2(r + 1) divided by sum_{r <= min(|R|, K)} "
              "1 / log2(r + 1); R = the distinct items of the shopper's first basket after the cut, the whole "
              "catalog ranked",
    "hr@K": "next basket: share of shoppers with at least one item of R in the top K of the whole catalog",
    "recall@K": "next basket: mean over shoppers of (items of R in the top K) / |R|",
    "n": "next basket: shoppers ranked (with history before the cut and a basket after it)",
}
"""Formulas by generic name; variant 'new' drops the items bought before the cut from the ranking and from R."""


def tie_order(size: int) -> np.ndarray:
    """The fixed random order that breaks ties among `size` candidates (the same for every ranker)."""
    return np.random.default_rng(TIE_SEED).permutation(size)


def top_items(scores: np.ndarray, pool: np.ndarray, exclude: list[np.ndarray] | None = None,
              k: int = TOP) -> np.ndarray:
    """The top `k` catalog rows of each shopper: scores (S, C) over `pool` (C,) catalog rows, higher first, ties
    in `tie_order`; items in exclude[s] are left out. Rows shorter than k are padded with -1.

    Raises ValueError when a score is NaN (a ranker that produced one ranks nothing meaningful)."""
    scores = np.array(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(pool):
        raise ValueError(f"scores must have shape (shoppers, {len(pool)}), got {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("the ranker produced NaN scores; nothing can be ranked from them")
    if exclude is not None:
        for s, items in enumerate(exclude):
            if len(items):
                scores[s, np.isin(pool, items)] = -np.inf
    order = tie_order(len(pool))
    ranked = order[np.argsort(-scores[:, order], axis=1, kind="stable")[:, :k]]
    top = pool[ranked]
    if exclude is not None:
        top = np.where(np.take_along_axis(scores, ranked, 1) == -np.inf, -1, top)
    if top.shape[1] < k:
        top = np.hstack([top, np.full((len(top), k - top.shape[1]), -1, dtype=top.dtype)])
    return top


def shopper_metrics(top: np.ndarray, relevant: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-shopper METRICS of ranked lists `top` (S, >= 50) against the relevant sets (each non-empty)."""
    discount = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
    hits = np.stack([np.isin(top[s], relevant[s]) for s in range(len(relevant))]) if relevant else \
        np.zeros((0, top.shape[1]), bool)
    sizes = np.array([len(r) for r in relevant], dtype=np.float64)
    ideal = np.cumsum(discount)
    out: dict[str, np.ndarray] = {}
    for k in (10, 50):
        dcg = (hits[:, :k] * discount[:k]).sum(1)
        out[f"ndcg@{k}"] = dcg / ideal[np.minimum(sizes, k).astype(int) - 1] if len(sizes) else dcg
    found = hits[:, :10].sum(1)
    out["hr@10"] = (found > 0).astype(np.float64)
    out["recall@10"] = found / np.maximum(sizes, 1)
    return {name: out[name] for name in METRICS}


def value_sums(values: dict[str, np.ndarray], variant: str) -> dict[str, int | np.ndarray]:
    """The mergeable sums of one variant's per-shopper values."""
    n = len(next(iter(values.values()))) if values else 0
    sums: dict[str, int | np.ndarray] = {f"{PREFIX}.{variant}.n": int(n)}
    for name in METRICS:
        v = np.clip(values[name], 0.0, 1.0) if n else np.zeros(0)
        bins = np.minimum((v * HIST_BINS).astype(np.int64), HIST_BINS - 1)
        sums[f"{PREFIX}.{variant}.{name}.hist"] = np.bincount(bins, minlength=HIST_BINS).astype(np.int64)
        sums[f"{PREFIX}.{variant}.{name}.hist_sum"] = np.bincount(bins, weights=v, minlength=HIST_BINS)
    return sums


def ranked_sums(scores: np.ndarray, pool: np.ndarray, relevant: list[np.ndarray],
                bought: list[np.ndarray]) -> dict[str, int | np.ndarray]:
    """Sums of both variants for S shoppers whose scores (S, C) over `pool` are given."""
    out: dict[str, int | np.ndarray] = {}
    out.update(value_sums(shopper_metrics(top_items(scores, pool), relevant), "all"))
    new_relevant = [np.setdiff1d(r, b) for r, b in zip(relevant, bought, strict=True)]
    keep = np.array([len(r) > 0 for r in new_relevant], dtype=bool)
    rows = np.flatnonzero(keep)
    new_top = top_items(scores[rows], pool, [bought[s] for s in rows]) if len(rows) else np.zeros((0, TOP), int)
    out.update(value_sums(shopper_metrics(new_top, [new_relevant[s] for s in rows]), "new"))
    return out


def add(a: dict, b: dict) -> dict:
    """Key-by-key sum of two sets of next-basket sums (empty dict = nothing yet)."""
    if not a:
        return dict(b)
    return {key: a[key] + b[key] for key in a}


def finalise(sums: dict, bootstrap: int = BOOTSTRAP, seed: int = 0) -> dict[str, float | int | None]:
    """Means and bootstrap 95% intervals: `nb.{variant}.{metric}` and `.lo` / `.hi` (none when `bootstrap` is 0),
    and `nb.{variant}.n`."""
    rng = np.random.default_rng(seed)
    out: dict[str, float | int | None] = {}
    for variant in VARIANTS:
        key_n = f"{PREFIX}.{variant}.n"
        if key_n not in sums:
            continue
        n = int(sums[key_n])
        out[key_n] = n
        for name in METRICS:
            base = f"{PREFIX}.{variant}.{name}"
            counts = np.asarray(sums[f"{base}.hist"], dtype=np.int64)
            totals = np.asarray(sums[f"{base}.hist_sum"], dtype=np.float64)
            if n == 0 or counts.sum() != n:
                out[base] = out[f"{base}.lo"] = out[f"{base}.hi"] = None
                continue
            out[base] = float(totals.sum() / n)
            if bootstrap < 1:
                continue
            bin_mean = np.divide(totals, counts, out=np.zeros_like(totals), where=counts > 0)
            draws = rng.multinomial(n, counts / n, size=bootstrap)
            means = draws @ bin_mean / n
            out[f"{base}.lo"], out[f"{base}.hi"] = (float(x) for x in np.percentile(means, [2.5, 97.5]))
    return out


def formula_for(name: str) -> str | None:
    """The formula of a finalised next-basket metric name ('nb.new.ndcg@10', 'nb.all.hr@10.lo'), else None."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != PREFIX or parts[1] not in VARIANTS:
        return None
    metric = parts[2]
    generic = "n" if metric == "n" else metric.split("@")[0] + "@K"
    text = FORMULAS.get(generic)
    if text is None:
        return None
    if "@" in metric:
        text = text.replace("K", metric.split("@")[1])
    if parts[1] == "new":
        text += "; items bought before the cut left out of the ranking and of R"
    if parts[-1] in ("lo", "hi"):
        text = f"{'lower' if parts[-1] == 'lo' else 'upper'} end of the bootstrap 95% interval of: {text}"
    return text
