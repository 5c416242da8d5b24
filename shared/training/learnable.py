"""Whether training examples can be learned from, and the refusal when they cannot.

A model learns what shoppers want from the contrast between positive examples (clicked, and perhaps purchased)
and negative ones. A training split whose labels are all one class teaches it nothing, and all-positive examples
of a merchant tell it only that everything is bought: a purchase log (implicit feedback) of a one-item catalog
has no other item to draw a negative from (`fedcvr.shared.data.examples`).
  - A node refuses to train on its merchant's training split when it is empty or of a single class
    (`train_round` declines with `label_problem`'s reason, which the node sends back as its error).
  - Centralised training refuses when the pooled training split is of a single class, or when any merchant's
    training examples are all positive (`refuse_unlearnable`); a merchant with only negatives adds true
    negatives to the pool and is kept.
`fedcvr data validate` warns about such folders beforehand (`fedcvr.shared.data.learnable`).
"""

from __future__ import annotations

import numpy as np

from ..model.errors import ModelConfigError
from .data import TrainingSet
from .prepare import Prepared


class UnlearnableDataError(ModelConfigError):
    """The data passes the contract, but its training examples cannot be learned from; the message says why."""


def label_problem(data: TrainingSet, catalog_items: int) -> str | None:
    """Why one merchant's training examples cannot be learned from, with the fix; None when they can."""
    n = len(data)
    positives = int(np.count_nonzero(data.clicked > 0))
    if n == 0:
        return ("no training examples: the training split (the events before the validation cut) holds no "
                "impression, or no purchase in a log without impressions. fix: add the merchant's earlier events, "
                "or leave this merchant out")
    if positives == n:
        cause = (f"its catalog holds {catalog_items} item, so no negative example can be drawn for a purchase"
                 if catalog_items < 2 else "no example is a shown item the shopper passed over")
        fix = ("add the merchant's other items to its items table (a coarser --partition-by at import gives "
               "folders of several items)" if catalog_items < 2 else
               "log every impression, the ones not clicked too")
        return (f"all {n:,} training examples are positive ({cause}): one class of labels teaches the model nothing. "
                f"fix: {fix}, or leave this merchant out")
    if positives == 0:
        return (f"none of the {n:,} training examples is clicked or purchased: one class of labels teaches the model "
                "nothing. fix: add the click and purchase events that followed the impressions, or leave this "
                "merchant out")
    return None


def refuse_unlearnable(prepared: Prepared) -> None:
    """Raise UnlearnableDataError naming every merchant that makes the pooled training split unlearnable."""
    train = prepared.splits["train"]
    refused: dict[str, str] = {}
    for k, name in enumerate(prepared.names):
        mine = train.subset(np.flatnonzero(train.merchant == k))
        if len(mine) and np.all(mine.clicked > 0):
            refused[name] = label_problem(mine, len(prepared.candidates[k]))
    if refused:
        kept = [n for n in prepared.names if n not in refused]
        raise UnlearnableDataError(
            f"cannot train on {len(refused)} merchant folder(s) whose training examples are all positive:\n  "
            + "\n  ".join(f"{name}: {problem}" for name, problem in refused.items())
            + (f"\nto train on the others, pass --merchants {','.join(kept)}" if kept else ""))
    problem = label_problem(train, len(prepared.catalog))
    if problem is not None:
        raise UnlearnableDataError(f"cannot train on the merchants' pooled training split: {problem}")
