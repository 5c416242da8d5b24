"""The one validation figure that chooses between models: the epoch kept by early stopping, and whether a node's
personalised layers replace the global model alone (`personalise.py`).

- Purchase logs (no impressions): the validation next-basket NDCG@10, `nb.all.ndcg@10`, each shopper's next basket
  ranked against the merchant's whole catalog (the test's own metric, on the validation cut). Their sampled
  negatives make a CTCVR AUC say little about a full-catalog ranking.
- Logs with impressions: the validation CTCVR AUC, `ctcvr.auc`, P(score of a purchased impression > score of an
  impression not bought).
Higher is better for both. Each figure comes with the number of units behind it (`Validation.units`: the
validation purchases for the AUC, the shoppers asked for a next basket for NDCG@10), so that a choice can refuse to
rest on a handful of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import metrics
from .loop import ItemSide, model_sums
from .prepare import Prepared

AUC_METRIC = "ctcvr.auc"
BASKET_METRIC = "nb.all.ndcg@10"


def selection_metric(prepared: Prepared) -> str:
    """The metric that chooses on this data (see the module doc)."""
    by_basket = prepared.implicit and len(prepared.baskets.get("validation", ())) > 0
    return BASKET_METRIC if by_basket else AUC_METRIC


@dataclass(frozen=True)
class Validation:
    """A model's `selection_metric` on the validation split (None where it has no value: no validation examples,
    or no purchase among them), the units behind it (purchases, or next-basket shoppers) and every finalised
    validation metric it was read from (empty without validation examples)."""

    value: float | None
    units: int
    metrics: dict[str, float | None]


def validation_score(model, side: ItemSide, prepared: Prepared, device: torch.device) -> Validation:
    """The model's `selection_metric` on the validation split, with the units behind it."""
    data = prepared.splits["validation"]
    if len(data) == 0:
        return Validation(None, 0, {})
    metric = selection_metric(prepared)
    by_basket = metric == BASKET_METRIC
    sums = model_sums(model, side, data, prepared.candidates, prepared.logs, device, rank=by_basket,
                      basket=prepared.baskets.get("validation") if by_basket else None)
    final = metrics.finalise(sums)
    value = final.get(metric)
    units = final.get("nb.all.n" if by_basket else "ctcvr.positives") or 0
    return Validation(None if value is None else float(value), int(units), final)
