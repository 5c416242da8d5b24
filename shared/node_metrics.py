"""What a node computes from its own predictions: the mergeable sums of `metrics.py` (whose docstring lists every
key and `METRIC_FORMULAS` every formula). Inputs are checked and refused with the argument's name; all pure numpy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .metrics import AUC_BINS, AUC_LOGIT_RANGE, DEFAULT_KS, ECE_BINS, PROB_CLIP, RANKING_PREFIX, MetricSums, SumValue

# ---------------------------------------------------------------- input checks

def _vector(name: str, values: object, length: int | None = None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D with shape (N,), got shape {array.shape}")
    if length is not None and len(array) != length:
        raise ValueError(f"{name} has {len(array)} entries but the other inputs have {length}; pass one per example")
    return array


def _labels(name: str, values: object, length: int) -> np.ndarray:
    array = _vector(name, values, length)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold 0/1 labels, got dtype {array.dtype}")
    if not np.isin(array, (0, 1)).all():
        bad = array[~np.isin(array, (0, 1))][0].item()
        raise ValueError(f"{name} must hold 0/1 labels, found {bad!r}")
    return array.astype(np.float64)


def _probabilities(name: str, values: object, length: int) -> np.ndarray:
    array = _vector(name, values, length)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold probabilities in [0, 1], got dtype {array.dtype}")
    array = array.astype(np.float64)
    outside = ~np.isfinite(array) | (array < 0) | (array > 1)
    if outside.any():
        raise ValueError(f"{name} must hold probabilities in [0, 1], found {array[outside][0].item()!r}; "
                         "pass sigmoid outputs, not logits")
    return array


# ---------------------------------------------------------------- per-example sums

def _logit_bins(p: np.ndarray, bins: int) -> np.ndarray:
    low, high = AUC_LOGIT_RANGE
    p = np.clip(p, 1e-300, 1.0)  # logit(0) = -inf lands in bin 0 after the clip below
    with np.errstate(divide="ignore"):
        logit = np.log(p) - np.log1p(-p)
    logit = np.clip(logit, low, high)
    index = np.floor((logit - low) / (high - low) * bins).astype(np.int64)
    return np.clip(index, 0, bins - 1)


def _grouped_auc(y: np.ndarray, p: np.ndarray, users: np.ndarray) -> tuple[float, int, int]:
    """(sum_u n_u * AUC_u, sum_u n_u, number of users) over users having both a positive and a negative.

    AUC_u = (R_u - P_u (P_u + 1) / 2) / (P_u N_u), with R_u the sum of the positives' ranks among the user's
    examples (ascending score, ties given their average rank): the Mann-Whitney form, equal to sklearn's AUC.
    """
    if len(y) == 0:
        return 0.0, 0, 0
    _, codes = np.unique(users, return_inverse=True)
    order = np.lexsort((p, codes.ravel()))
    codes, p, y = codes.ravel()[order], p[order], y[order]
    n = len(y)
    position = np.arange(n)
    new_user = np.r_[True, codes[1:] != codes[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, position, 0))
    new_tie = new_user | np.r_[True, p[1:] != p[:-1]]  # tie blocks never cross users
    tie_start = position[new_tie]
    tie_end = np.r_[tie_start[1:], n]
    mean_position = (tie_start + tie_end - 1) / 2.0
    rank = mean_position[np.cumsum(new_tie) - 1] - user_start + 1.0
    user = np.cumsum(new_user) - 1
    n_u = np.bincount(user)
    pos_u = np.bincount(user, weights=y)
    rank_sum_u = np.bincount(user, weights=rank * y)
    neg_u = n_u - pos_u
    both = (pos_u > 0) & (neg_u > 0)
    auc_u = (rank_sum_u[both] - pos_u[both] * (pos_u[both] + 1) / 2) / (pos_u[both] * neg_u[both])
    return float(np.sum(n_u[both] * auc_u)), int(n_u[both].sum()), int(both.sum())


def auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """ROC AUC of scores `p` for binary labels `y` (ties count half; sklearn's value); None without both classes."""
    total, weight, groups = _grouped_auc(np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64),
                                         np.zeros(len(y), dtype=np.int64))
    return total / weight if groups else None


def _task_sums(task: str, y: np.ndarray, p: np.ndarray, users: np.ndarray, bins: int) -> dict[str, SumValue]:
    positive = y == 1
    auc_bin = _logit_bins(p, bins)
    p_clipped = np.clip(p, PROB_CLIP, 1 - PROB_CLIP)
    logloss = -(y * np.log(p_clipped) + (1 - y) * np.log1p(-p_clipped))
    ece_bin = np.minimum(np.floor(p * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    gauc_weighted, gauc_weight, gauc_users = _grouped_auc(y, p, users)
    return {
        f"{task}.n": len(y),
        f"{task}.positives": int(positive.sum()),
        f"{task}.auc_pos": np.bincount(auc_bin[positive], minlength=bins).astype(np.int64),
        f"{task}.auc_neg": np.bincount(auc_bin[~positive], minlength=bins).astype(np.int64),
        f"{task}.gauc_weighted": gauc_weighted,
        f"{task}.gauc_weight": gauc_weight,
        f"{task}.gauc_users": gauc_users,
        f"{task}.logloss_sum": float(logloss.sum()),
        f"{task}.p_sum": float(p.sum()),
        f"{task}.ece_count": np.bincount(ece_bin, minlength=ECE_BINS).astype(np.int64),
        f"{task}.ece_p_sum": np.bincount(ece_bin, weights=p, minlength=ECE_BINS).astype(np.float64),
        f"{task}.ece_y_sum": np.bincount(ece_bin[positive], minlength=ECE_BINS).astype(np.int64),
    }


def prediction_sums(
    labels_click: Sequence[float] | np.ndarray,
    labels_purchase: Sequence[float] | np.ndarray,
    p_ctr: Sequence[float] | np.ndarray,
    p_ctcvr: Sequence[float] | np.ndarray,
    users: Sequence[object] | np.ndarray,
    *,
    bins: int = AUC_BINS,
) -> MetricSums:
    """The mergeable sums of one node's evaluated impressions, for the click and ctcvr tasks.

    Args:
        labels_click: (N,) 1 if the impression was clicked, else 0.
        labels_purchase: (N,) 1 if it led to a purchase, else 0.
        p_ctr: (N,) predicted click probability, in [0, 1].
        p_ctcvr: (N,) predicted click-and-purchase probability pCTR x pCVR, in [0, 1].
        users: (N,) shopper ids or integer codes (any sortable values), for GAUC.
        bins: number of AUC histogram bins; every node must use the same (merge refuses otherwise).

    Returns sums under `click.*` (labels_click scored by p_ctr) and `ctcvr.*` (labels_purchase scored by
    p_ctcvr); the module docstring lists them. Raises ValueError naming the argument on bad shapes or values.
    """
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    n = len(_vector("labels_click", labels_click))
    user_codes = _vector("users", users, n)
    parts = {
        "click": (_labels("labels_click", labels_click, n), _probabilities("p_ctr", p_ctr, n)),
        "ctcvr": (_labels("labels_purchase", labels_purchase, n), _probabilities("p_ctcvr", p_ctcvr, n)),
    }
    values: dict[str, SumValue] = {}
    for task, (y, p) in parts.items():
        values.update(_task_sums(task, y, p, user_codes, int(bins)))
    return MetricSums(values)


def rank_of(target_scores: Sequence[float] | np.ndarray, all_scores: np.ndarray) -> np.ndarray:
    """1-based rank of each target among its row of catalog scores: 1 + number of items scoring STRICTLY higher.

    Args:
        target_scores: (P,) the score of each purchased item.
        all_scores: (P, I) the scores of the whole catalog for that shopper (may include the target itself).

    Returns (P,) int64 ranks in 1..I+1. Tie rule: items scoring exactly the target's score do not push it down
    (the optimistic rank), so the target counting itself in `all_scores` changes nothing; a model that gives
    many items the same score is flattered, so report the score resolution alongside HR/NDCG if that can happen.
    Raises ValueError on mismatched shapes or non-finite scores.
    """
    targets = np.asarray(target_scores, dtype=np.float64)
    scores = np.asarray(all_scores, dtype=np.float64)
    if targets.ndim != 1:
        raise ValueError(f"target_scores must be 1-D with shape (P,), got shape {targets.shape}")
    if scores.ndim != 2 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"all_scores must have shape (P, I) = ({targets.shape[0]}, I), got shape {scores.shape}")
    if not (np.isfinite(targets).all() and np.isfinite(scores).all()):
        raise ValueError("target_scores and all_scores must be finite (found NaN or inf); ranks would be arbitrary")
    return 1 + np.sum(scores > targets[:, None], axis=1, dtype=np.int64)


def ranking_sums(ranks: Sequence[int] | np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> MetricSums:
    """The mergeable sums of the catalog ranks of one node's purchases.

    Args:
        ranks: (P,) 1-based rank of each purchased item among the catalog scored for its shopper (`rank_of`).
        ks: cut-offs K.

    Returns `rank.n` = P, `rank.hr@K` = sum of 1[rank <= K] and `rank.ndcg@K` = sum of 1/log2(rank + 1) for
    rank <= K, else 0 (one relevant item, so the ideal DCG is 1).
    """
    array = _vector("ranks", ranks)
    if len(array) and (array.dtype.kind not in "iuf" or not np.isfinite(array).all()
                       or (array < 1).any() or (array != np.floor(array)).any()):
        raise ValueError("ranks must be whole numbers >= 1 (1 = the best-scored item)")
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat, got {ks!r}")
    rank = array.astype(np.float64)
    gain = 1.0 / np.log2(rank + 1.0)
    values: dict[str, SumValue] = {f"{RANKING_PREFIX}.n": len(rank)}
    for k in ks:
        hit = rank <= k
        values[f"{RANKING_PREFIX}.hr@{int(k)}"] = int(hit.sum())
        values[f"{RANKING_PREFIX}.ndcg@{int(k)}"] = float(gain[hit].sum())
    return MetricSums(values)
