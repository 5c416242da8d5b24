"""Mergeable evaluation metrics for the ESMM conversion model: client sums, their merge, the server's ratios.

ESMM scores every impression with pCTR and pCTCVR = pCTR x pCVR. A node evaluates its own examples and reports
SUMS and COUNTS only (`node_metrics.py`: `prediction_sums`, `ranking_sums`); the server adds them up key by key
(`merge`, `merge_all`, `merge_evaluations`) and turns the totals into ratios (`finalise`). Ratios such as AUC
cannot be averaged across nodes, but their ingredients can be added, so the merged metrics equal those of the
pooled examples (GAUC too, since a shopper belongs to one merchant). Being plain additions, the sums also suit
secure aggregation; note that they still reveal a node's label counts and score histograms to whoever sees them
unaggregated.

Keys are namespaced: `click.*` (label: clicked, score: pCTR, over all impressions), `ctcvr.*` (label: purchased,
score: pCTCVR, over all impressions) and `rank.*` (catalog ranking of purchased items). What each sum holds:

    {t}.n, {t}.positives          examples, positive labels (= sum of labels)
    {t}.auc_pos, {t}.auc_neg      positives / negatives per score bin (AUC_BINS bins of logit(p) in [-16, 16])
    {t}.gauc_weighted             sum over users u with both classes of n_u * AUC_u
    {t}.gauc_weight, {t}.gauc_users   sum of those n_u, number of those users
    {t}.logloss_sum               sum of -[y log p + (1 - y) log(1 - p)], p clipped to [1e-7, 1 - 1e-7]
    {t}.p_sum                     sum of predictions
    {t}.ece_count, {t}.ece_p_sum, {t}.ece_y_sum   per ECE bin (ECE_BINS equal-width bins of p): n, sum p, sum y
    rank.n, rank.hr@K, rank.ndcg@K    ranked purchases, sum of hits, sum of discounted gains
    nb.*                          next-basket ranking of purchase logs (`evaluation/basket_metrics.py`)

`MetricSums.to_record()` gives a dict that a Flower `MetricRecord` accepts (int, float, list[int], list[float]);
`MetricSums.from_record()` reads it back. Flower's default strategies AVERAGE metric records, so the server
must add these with `merge_all` instead. All functions are pure numpy; no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import reduce

import numpy as np

from .evaluation import basket_metrics

PREDICTION_TASKS: tuple[str, ...] = ("click", "ctcvr")
"""The tasks `prediction_sums` reports: click (label clicked, score pCTR), ctcvr (label purchased, score pCTCVR)."""
RANKING_PREFIX = "rank"

AUC_BINS = 8192
"""Bins of the AUC histograms: width 32/8192 = 0.0039 on the logit scale, i.e. scores 0.4% apart (relative, for
small p) land in different bins. Measured against sklearn on realistic impressions (pCTCVR 1e-4..0.4, with and
without 4-decimal rounding): |AUC error| <= 2.3e-5 on 50k, <= 1e-5 on 200k (there 4096 bins: 2e-5, 1024: 1e-4);
<= 4e-5 on 2k uniform random scores. The margin is for nearly constant models (e.g. at initialisation): with a
logit standard deviation of 0.03 the error is 3e-5 with 8192 bins but 6e-4 with 4096; below about 0.01 (all
scores within ~1% of each other) it exceeds 2e-3 and drifts toward 0.5. Cost: 2 x 8192 counts (128 KiB) per
task in a reply."""
AUC_LOGIT_RANGE: tuple[float, float] = (-16.0, 16.0)
"""Logit range the AUC bins cover; scores outside go to the end bins. logit(1e-7) = -16.1."""
ECE_BINS = 10
"""Equal-width bins of p in [0, 1] for the expected calibration error; bin b holds p in [b/10, (b+1)/10), the
last one also p = 1."""
PROB_CLIP = 1e-7
"""Predictions are clipped to [PROB_CLIP, 1 - PROB_CLIP] inside the log loss."""
DEFAULT_KS: tuple[int, ...] = (10, 50)

METRIC_FORMULAS: dict[str, str] = {
    "auc": "ROC AUC from score histograms: (sum over bins b of pos_b * (negatives in bins below b) + 0.5 * pos_b "
           "* neg_b) / (P * N); bins are AUC_BINS equal-width bins of logit(p) in [-16, 16]",
    "gauc": "sum over users u having both a positive and a negative of n_u * AUC_u, divided by the sum of those "
            "n_u; AUC_u is the exact per-user AUC (rank formula, ties averaged), n_u the user's impressions",
    "logloss": "mean over examples of -[y log p + (1 - y) log(1 - p)], p clipped to [1e-7, 1 - 1e-7]",
    "calibration": "sum of predictions / sum of labels (1 is calibrated; > 1 over-predicts); None if no positives",
    "ece": "expected calibration error: sum over 10 equal-width bins b of p of (n_b / N) * |mean p_b - mean y_b|",
    "n": "number of examples",
    "positives": "number of positive labels",
    "gauc_users": "number of users with both a positive and a negative (the users GAUC averages over)",
    "hr@K": "hit rate: share of purchases whose item ranks in the top K of the catalog (rank <= K)",
    "ndcg@K": "mean over purchases of 1 / log2(rank + 1) if rank <= K else 0 (one relevant item per purchase)",
    "rank.n": "number of ranked purchases",
}
"""Each finalised metric's formula in words, keyed by its generic name; `formula_for` resolves full names."""

_AT_K = re.compile(r"^(hr|ndcg)@(\d+)$")


def formula_for(name: str) -> str:
    """The formula of a finalised metric name such as 'click.auc', 'ctcvr.ece', 'hr@10' or 'rank.n'."""
    if name in METRIC_FORMULAS:
        return METRIC_FORMULAS[name]
    next_basket = basket_metrics.formula_for(name)
    if next_basket is not None:
        return next_basket
    at_k = _AT_K.match(name)
    if at_k:
        return METRIC_FORMULAS[f"{at_k.group(1)}@K"].replace("K", at_k.group(2))
    generic = name.rsplit(".", 1)[-1]
    if generic in METRIC_FORMULAS:
        return METRIC_FORMULAS[generic]
    raise KeyError(f"no formula for metric {name!r}; known: {', '.join(METRIC_FORMULAS)}")


# ---------------------------------------------------------------- the container

SumValue = int | float | np.ndarray


@dataclass(eq=False)
class MetricSums:
    """Named sums and counts that add up across nodes.

    `values` maps a namespaced key to a Python int (a count), a Python float (a sum) or a 1-D numpy array of
    int64 counts or float64 sums (per-bin histograms). Build it with `node_metrics.prediction_sums` /
    `node_metrics.ranking_sums`, add with `merge`, read with `finalise`.
    """

    values: dict[str, SumValue] = field(default_factory=dict)

    def __getitem__(self, key: str) -> SumValue:
        return self.values[key]

    def __contains__(self, key: object) -> bool:
        return key in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def keys(self):
        return self.values.keys()

    def to_record(self) -> dict[str, int | float | list[int] | list[float]]:
        """Plain Python values that a Flower `MetricRecord` accepts: ints, floats and homogeneous lists of them."""
        record: dict[str, int | float | list[int] | list[float]] = {}
        for key, value in self.values.items():
            if isinstance(value, np.ndarray):
                record[key] = [int(v) for v in value] if value.dtype.kind in "iu" else [float(v) for v in value]
            else:
                record[key] = int(value) if isinstance(value, int | np.integer) else float(value)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> MetricSums:
        """Read the output of `to_record` back (e.g. a received `MetricRecord`); lists of ints stay int64.

        Raises TypeError naming the key for a value that is not a number or a list of numbers.
        """
        values: dict[str, SumValue] = {}
        for key, value in record.items():
            if isinstance(value, list | tuple | np.ndarray):
                items = list(value)
                if not all(_is_number(v) for v in items):
                    raise TypeError(f"metric sums: '{key}' holds a non-number; expected a list of ints or floats")
                all_ints = bool(items) and all(isinstance(v, int | np.integer) for v in items)
                values[key] = np.asarray(items, dtype=np.int64 if all_ints else np.float64)
            elif _is_number(value):
                values[key] = int(value) if isinstance(value, int | np.integer) else float(value)
            else:
                raise TypeError(f"metric sums: '{key}' is {value!r}; expected an int, a float or a list of them")
        return cls(values)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


# ---------------------------------------------------------------- merge

def merge(a: MetricSums, b: MetricSums) -> MetricSums:
    """Key-by-key sum of two nodes' sums. Both must hold the same keys with the same shapes.

    Raises ValueError naming the keys one side lacks, or the key whose shapes differ (e.g. nodes that used
    different AUC bin counts or different ks).
    """
    only_a, only_b = sorted(set(a.keys()) - set(b.keys())), sorted(set(b.keys()) - set(a.keys()))
    if only_a or only_b:
        raise ValueError(f"cannot merge metric sums with different keys: only in the first: {only_a or 'none'}; "
                         f"only in the second: {only_b or 'none'} (did the nodes evaluate different tasks or ks?)")
    merged: dict[str, SumValue] = {}
    for key in a.keys():
        x, y = a[key], b[key]
        shape_x, shape_y = np.shape(x), np.shape(y)
        if shape_x != shape_y:
            raise ValueError(f"cannot merge metric sums: '{key}' has shape {shape_x} in one and {shape_y} in the "
                             "other (do all nodes use the same number of bins?)")
        if isinstance(x, np.ndarray):
            merged[key] = np.add(x, y)
        else:
            merged[key] = x + y
    return MetricSums(merged)


def merge_all(parts: Iterable[MetricSums]) -> MetricSums:
    """Sum of any number of nodes' sums (see `merge`); no parts give an empty MetricSums."""
    parts = list(parts)
    if not parts:
        return MetricSums()
    return reduce(merge, parts[1:], parts[0])


def combine(*parts: MetricSums) -> MetricSums:
    """One node's sums of different kinds in one container (e.g. prediction and ranking sums), for one record.

    Unlike `merge`, this joins DISJOINT keys; raises ValueError naming any key present twice.
    """
    values: dict[str, SumValue] = {}
    for part in parts:
        clash = sorted(set(values) & set(part.keys()))
        if clash:
            raise ValueError(f"cannot combine metric sums that share keys {clash}; use merge() to add them")
        values.update(part.values)
    return MetricSums(values)


# ---------------------------------------------------------------- finalise

def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def histogram_auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """AUC = (sum_b pos_b * (negatives in bins below b) + 0.5 * pos_b * neg_b) / (P * N); None if P or N is 0.

    Bins are in ascending score order; pairs sharing a bin count as ties (one half).
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos == 0 or total_neg == 0:
        return None
    neg_below = np.cumsum(neg) - neg
    return float(np.sum(pos * (neg_below + 0.5 * neg)) / (total_pos * total_neg))


def _need(sums: MetricSums, key: str) -> SumValue:
    if key not in sums:
        raise ValueError(f"metric sums lack '{key}' (they hold: {', '.join(sums.keys())})")
    return sums[key]


def _finalise_task(sums: MetricSums, task: str) -> dict[str, float | int | None]:
    def get(name: str) -> SumValue:
        return _need(sums, f"{task}.{name}")

    n, positives = get("n"), get("positives")
    ece_count, ece_p, ece_y = (np.asarray(get(k), dtype=np.float64) for k in ("ece_count", "ece_p_sum", "ece_y_sum"))
    return {
        f"{task}.auc": histogram_auc(get("auc_pos"), get("auc_neg")),
        f"{task}.gauc": _ratio(get("gauc_weighted"), get("gauc_weight")),
        f"{task}.logloss": _ratio(get("logloss_sum"), n),
        f"{task}.calibration": _ratio(get("p_sum"), positives),
        # sum_b (n_b / N) |sum p_b / n_b - sum y_b / n_b| = sum_b |sum p_b - sum y_b| / N
        f"{task}.ece": _ratio(float(np.abs(ece_p - ece_y).sum()), float(ece_count.sum())),
        f"{task}.n": n,
        f"{task}.positives": positives,
        f"{task}.gauc_users": get("gauc_users"),
    }


def finalise(sums: MetricSums) -> dict[str, float | None]:
    """The metrics of (merged) sums as a flat dict; None where a metric is undefined.

    For each task present ('click', 'ctcvr'): `{t}.auc`, `{t}.gauc`, `{t}.logloss`, `{t}.calibration`, `{t}.ece`
    and the counts `{t}.n`, `{t}.positives`, `{t}.gauc_users`. With ranking sums: `hr@K`, `ndcg@K` per K and
    `rank.n`. Formulas: `METRIC_FORMULAS`. AUC is None without positives or negatives, GAUC without a user having
    both, calibration without positives, the means without examples.
    """
    result: dict[str, float | None] = {}
    for task in PREDICTION_TASKS:
        if any(key.startswith(f"{task}.") for key in sums.keys()):
            result.update(_finalise_task(sums, task))
    if any(key.startswith(f"{RANKING_PREFIX}.") for key in sums.keys()):
        count = _need(sums, f"{RANKING_PREFIX}.n")
        ks = sorted(int(key.rsplit("@", 1)[1]) for key in sums.keys() if key.startswith(f"{RANKING_PREFIX}.hr@"))
        for k in ks:
            result[f"hr@{k}"] = _ratio(_need(sums, f"{RANKING_PREFIX}.hr@{k}"), count)
            result[f"ndcg@{k}"] = _ratio(_need(sums, f"{RANKING_PREFIX}.ndcg@{k}"), count)
        result["rank.n"] = count
    if any(key.startswith(f"{basket_metrics.PREFIX}.") for key in sums.keys()):
        result.update(basket_metrics.finalise(sums.values))
    known = tuple(f"{prefix}." for prefix in (*PREDICTION_TASKS, RANKING_PREFIX, basket_metrics.PREFIX))
    unknown = [key for key in sums.keys() if not key.startswith(known)]
    if unknown:
        raise ValueError(f"metric sums hold keys of no known task: {unknown}; known prefixes: {', '.join(known)}")
    return result


_NOT_SUMS = ("num-examples", "evaluate-seconds")  # keys of an evaluation reply beside its sums (`protocol.py`)


def merge_evaluations(records: Iterable[Mapping[str, object]]) -> dict[str, float]:
    """Server side: add up the nodes' metric records (`MetricSums.to_record`; a reply's `num-examples` and
    `evaluate-seconds`, which are not sums, ignored), then finalise; metrics without a value (None, or not finite)
    are left out."""
    parts = [MetricSums.from_record({k: v for k, v in r.items() if k not in _NOT_SUMS}) for r in records]
    final = finalise(merge_all(parts))
    return {k: float(v) for k, v in final.items() if v is not None and np.isfinite(v)}
