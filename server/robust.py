"""Screening of the nodes' updates and robust aggregation: plain functions over named numpy arrays.

`screen_updates(reference, updates, norm_factor)` checks each node's new trainable weights against the global
weights the round sent (`reference`) and rejects an update when
  - its names differ from the global model's (missing or unexpected arrays),
  - an array's shape differs from the global one's,
  - it holds NaN or Inf values,
  - its change is far larger than the others': ||w_node - w_global||_2 (all arrays as one vector) above
    `norm_factor` x the median change norm of the round's updates that passed the checks above. The median needs
    at least 3 such updates to mean anything (with 2, a huge update drags the median up with it); below that, and
    with `norm_factor` = 0, the norm check is skipped.

`combine(updates, weights, method, trim)` aggregates the kept updates:
  mean          sum_i n_i w_i / sum_i n_i, weighted by the nodes' training examples n_i (Flower's FedAvg)
  median        the coordinate-wise median, unweighted (Yin et al., 2018)
  trimmed-mean  per coordinate, the mean of the values left after dropping the floor(trim x k) largest and the
                floor(trim x k) smallest of the k updates; unweighted (Yin et al., 2018)
With one hostile node of five, `median` and `trimmed-mean` with trim >= 0.2 ignore its values coordinate by
coordinate, whatever their size; the norm screen catches only a far too large update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

METHODS = ("mean", "median", "trimmed-mean")
MIN_UPDATES_FOR_NORM = 3

Arrays = Mapping[str, np.ndarray]


@dataclass
class Screening:
    """The indices of the kept updates, and (index, reason) for each rejected one; `norms` of the change of every
    update that passed the shape and value checks (index -> norm)."""

    kept: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    norms: dict[int, float] = field(default_factory=dict)
    median_norm: float | None = None


def _shape_problem(reference: Arrays, update: Arrays) -> str | None:
    missing = sorted(set(reference) - set(update))
    unexpected = sorted(set(update) - set(reference))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} array(s) missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected array(s) (e.g. {unexpected[0]!r})")
        return "its arrays do not match the global model's: " + ", ".join(parts)
    for name, ref in reference.items():
        shape = tuple(np.shape(update[name]))
        if shape != tuple(np.shape(ref)):
            return f"array {name!r} has shape {shape}, the global model's has {tuple(np.shape(ref))}"
    return None


def _value_problem(update: Arrays) -> str | None:
    for name, array in update.items():
        values = np.asarray(array)
        if not np.issubdtype(values.dtype, np.number):
            return f"array {name!r} holds {values.dtype} values, not numbers"
        bad = values.size - int(np.isfinite(values).sum())
        if bad:
            return f"array {name!r} holds {bad} NaN or Inf value(s)"
    return None


def change_norm(reference: Arrays, update: Arrays) -> float:
    """||update - reference||_2 over all arrays together (float64)."""
    total = 0.0
    for name, ref in reference.items():
        diff = np.asarray(update[name], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def screen_updates(reference: Arrays, updates: Sequence[Arrays], norm_factor: float) -> Screening:
    """Which updates to aggregate and why the others are rejected (see the module's description)."""
    result = Screening()
    candidates: list[int] = []
    for index, update in enumerate(updates):
        problem = _shape_problem(reference, update) or _value_problem(update)
        if problem:
            result.rejected.append((index, problem))
        else:
            candidates.append(index)
            result.norms[index] = change_norm(reference, update)
    if norm_factor > 0 and len(candidates) >= MIN_UPDATES_FOR_NORM:
        median = float(np.median([result.norms[i] for i in candidates]))
        result.median_norm = median
        if median > 0:
            limit = norm_factor * median
            for index in candidates:
                norm = result.norms[index]
                if norm > limit:
                    result.rejected.append((index, f"its change has norm {norm:.4g}, above reject-norm-factor "
                                                   f"{norm_factor:g} x the round's median {median:.4g}"))
    rejected = {i for i, _ in result.rejected}
    result.kept = [i for i in range(len(updates)) if i not in rejected]
    result.rejected.sort()
    return result


def trimmed_count(k: int, trim: float) -> int:
    """How many values trimmed-mean drops at each end of k."""
    return min(int(math.floor(trim * k)), (k - 1) // 2)


def combine(updates: Sequence[Arrays], weights: Sequence[float], method: str,
            trim: float = 0.2) -> dict[str, np.ndarray]:
    """The aggregate of `updates` (each the same names and shapes) by `method` (see the module's description)."""
    if method not in METHODS:
        raise ValueError(f"aggregation method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if not updates:
        raise ValueError("no update to aggregate")
    names = list(updates[0])
    out: dict[str, np.ndarray] = {}
    if method == "mean":
        w = np.asarray(weights, dtype=np.float64)
        if w.sum() <= 0:
            raise ValueError(f"the updates' weights sum to {w.sum()}; they must be positive")
        for name in names:
            stacked = np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])
            out[name] = np.tensordot(w / w.sum(), stacked, axes=1).astype(np.asarray(updates[0][name]).dtype)
        return out
    cut = trimmed_count(len(updates), trim)
    for name in names:
        dtype = np.asarray(updates[0][name]).dtype
        stacked = np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])
        if method == "median":
            value = np.median(stacked, axis=0)
        else:
            ordered = np.sort(stacked, axis=0)
            value = ordered[cut:len(updates) - cut].mean(axis=0)
        out[name] = value.astype(dtype)
    return out
