"""Next-basket evaluation of any ranker: the model or a classic baseline, per merchant (local) or pooled.

`ranking_sums` ranks every shopper of a task against its merchant's whole catalog and returns mergeable sums
(`basket_metrics`). Baselines are fitted strictly on purchases before the cut, in one of two scopes:
- local: each merchant's baseline from its own purchases only (what a merchant alone could run);
- pooled: one baseline from every merchant's purchases (the centralised reference), refitted per distinct cut.
Tuning picks each baseline's setting by validation NDCG@10 (`baselines.py`), on the validation task only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import basket_metrics
from .baselines import BaselineConfig, fit
from .baskets import BasketTask

SCOPES = ("local", "pooled")
SHOPPERS_AT_ONCE = 512

TaskScorer = Callable[[BasketTask, np.ndarray], np.ndarray]
"""scorer(shoppers of a task, pool (C,) catalog rows) -> scores (S, C), higher first."""


def ranking_sums(task: BasketTask, candidates: dict[int, np.ndarray], scorer: TaskScorer) -> dict:
    """Next-basket sums of `scorer` over every shopper of `task` (each against its merchant's catalog)."""
    sums: dict = {}
    for merchant in np.unique(task.merchant):
        pool = candidates[int(merchant)]
        rows = np.flatnonzero(task.merchant == merchant)
        for start in range(0, len(rows), SHOPPERS_AT_ONCE):
            part = task.subset(rows[start:start + SHOPPERS_AT_ONCE])
            scores = scorer(part, pool)
            sums = basket_metrics.add(sums, basket_metrics.ranked_sums(scores, pool, part.relevant, part.bought))
    return sums or basket_metrics.value_sums({}, "all") | basket_metrics.value_sums({}, "new")


def _groups(task: BasketTask, scope: str) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(shopper rows, purchase mask, cut) of each fit: per merchant and cut (local) or per distinct cut (pooled).
    The fit itself keeps only the purchases before its cut."""
    out = []
    if scope == "local":
        for merchant, cut in sorted(set(zip(task.merchant.tolist(), task.cut.tolist(), strict=True))):
            rows = np.flatnonzero((task.merchant == merchant) & (task.cut == cut))
            out.append((rows, task.purchases.merchant == merchant, int(cut)))
    else:
        for cut in np.unique(task.cut):
            out.append((np.flatnonzero(task.cut == cut), task.purchases.t < cut, int(cut)))
    return out


def baseline_sums(name: str, params: dict[str, Any], task: BasketTask, candidates: dict[int, np.ndarray],
                  n_items: int, config: BaselineConfig, scope: str, embeddings: np.ndarray | None = None,
                  seed: int = 0) -> dict:
    """Next-basket sums of baseline `name` with `params`, fitted in `scope` on the purchases before the cut."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    sums: dict = {}
    for rows, mask, cut in _groups(task, scope):
        scorer = fit(name, params, task.purchases.subset(mask & (task.purchases.t < cut)), n_items, cut, config,
                     embeddings, seed)
        part = task.subset(rows)
        sums = basket_metrics.add(sums, ranking_sums(part, candidates, lambda t, pool, s=scorer: s(t.shopper, pool)))
    return sums or ranking_sums(task, candidates, lambda t, pool: np.zeros((len(t), len(pool))))


@dataclass
class BaselineResult:
    """One baseline in one scope: the setting chosen on validation, its test sums and finalised metrics."""

    name: str
    scope: str
    params: dict[str, Any]
    validation_ndcg: float | None
    sums: dict
    metrics: dict[str, float | int | None]


def evaluate_baselines(names: list[str], validation: BasketTask | None, test: BasketTask,
                       candidates: dict[int, np.ndarray], n_items: int, config: BaselineConfig, scope: str,
                       embeddings: np.ndarray | None = None, seed: int = 0,
                       progress: Callable[[str], None] | None = None) -> list[BaselineResult]:
    """Tune each baseline on `validation` (when it has shoppers and tuning is on), then evaluate it on `test`."""
    say = progress or (lambda _text: None)
    key = f"{basket_metrics.PREFIX}.all.ndcg@10"
    out = []
    for name in names:
        grid = config.grid(name)
        best, best_score = config.default_setting(name), None
        if len(grid) > 1 and validation is not None and len(validation):
            for params in grid:
                sums = baseline_sums(name, params, validation, candidates, n_items, config, scope, embeddings, seed)
                score = basket_metrics.finalise(sums, bootstrap=0).get(key)
                if score is not None and (best_score is None or score > best_score):
                    best, best_score = params, score
        say(f"{name} ({scope}): {params_text(best)}")
        sums = baseline_sums(name, best, test, candidates, n_items, config, scope, embeddings, seed)
        out.append(BaselineResult(name, scope, best, best_score, sums, basket_metrics.finalise(sums)))
    return out


def params_text(params: dict[str, Any]) -> str:
    """A baseline's setting in words: 'days 30', 'factors 64, alpha 1'."""
    return ", ".join(f"{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"{k.replace('_', '-')} {v}"
                     for k, v in params.items())


def text_embeddings(backbone, texts: list[str], max_tokens: int, cache_root=None) -> np.ndarray:
    """(N, H) text embeddings of the `text` baseline: the encoder's mean-pooled last hidden state of each item
    text (the frozen-prefix cache's pooled entries, shared with a model of `adapter.layers = 0`)."""
    from ..model.prefix_cache import PrefixCache

    states = PrefixCache(backbone, 0, max_tokens, cache_root).states(texts)
    return states.states[:, 0, :].float().numpy().astype(np.float64)


def run_baselines(names: list[str], prepared, config: BaselineConfig, scope: str, backbone=None,
                  max_tokens: int = 64, cache_root=None, seed: int = 0,
                  progress: Callable[[str], None] | None = None) -> list[BaselineResult]:
    """The baselines `names` on a `Prepared` data set's next-basket tasks (none for impression logs)."""
    if not prepared.baskets or "test" not in prepared.baskets:
        return []
    embeddings = None
    if "text" in names:
        if backbone is None:
            raise ValueError("the text baseline needs the encoder (backbone); none was given")
        embeddings = text_embeddings(backbone, prepared.catalog.texts, max_tokens, cache_root)
    return evaluate_baselines(names, prepared.baskets.get("validation"), prepared.baskets["test"],
                              prepared.candidates, len(prepared.catalog), config, scope, embeddings, seed, progress)


def baseline_record(result: BaselineResult) -> dict[str, Any]:
    """A baseline result as JSON-ready data (its setting, validation NDCG@10 and finalised test metrics)."""
    params = {k: ("inf" if isinstance(v, float) and np.isinf(v) else v) for k, v in result.params.items()}
    return {"name": result.name, "scope": result.scope, "params": params,
            "validation_ndcg@10": result.validation_ndcg, "metrics": result.metrics}
