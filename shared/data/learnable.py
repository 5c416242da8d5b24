"""What the data contract allows but a model may not learn from: the warnings of one valid merchant folder.

Examples come from impressions (explicit feedback: labelled clicked / purchased by the events that follow) or, in a
log without impressions, from purchases with negatives drawn from the merchant's own catalog (implicit feedback;
see `examples.py`). So a folder warns when
  - its catalog holds fewer than 2 items: nothing to rank, and no negative can be drawn for a purchase;
  - it logs impressions but no click or purchase: every example is negative;
  - it logs impressions and clicks but no purchase: conversion (CVR) cannot be learned from it;
  - it logs neither impressions nor purchases: no example at all.
A purchase log has no clicks by nature, which is no warning. Warnings do not stop a run: training itself refuses a
merchant whose training examples hold a single class of labels (`fedcvr.shared.training.learnable`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .contract import DataProblem

MIN_ITEMS = 2

_LEAVE_OUT = "or leave this merchant out of training (e.g. train-central --merchants with the other folders)"


def folder_warnings(items_file: Path, events_file: Path, items: pd.DataFrame,
                    events: pd.DataFrame) -> list[DataProblem]:
    """The warnings of a merchant folder whose tables passed validation (normalised tables as the loader returns)."""
    counts = events["event"].value_counts()
    impressions, clicks, purchases = (int(counts.get(name, 0)) for name in ("impression", "click", "purchase"))
    found = []
    if len(items) < MIN_ITEMS:
        found.append(DataProblem(
            str(items_file), "item_id",
            f"the catalog holds {len(items)} item: there is nothing to rank it against, and no negative example "
            "can be drawn for a purchase (every example would be positive)",
            f"add the merchant's other items to the items table, {_LEAVE_OUT}; an import with a coarser "
            "--partition-by writes folders of several items"))
    if impressions and not clicks and not purchases:
        found.append(DataProblem(
            str(events_file), "event",
            f"has {impressions:,} impressions but no click or purchase: every example is negative, so nothing "
            "tells the model what shoppers want",
            f"add the click and purchase events that followed these impressions, {_LEAVE_OUT}"))
    elif impressions and not purchases:
        found.append(DataProblem(
            str(events_file), "event",
            f"has {impressions:,} impressions and {clicks:,} clicks but no purchase: conversion after a click "
            "cannot be learned from this merchant",
            "add the merchant's purchase events (map e.g. 'order' or 'checkout' to purchase)"))
    if not impressions and not purchases:
        found.append(DataProblem(
            str(events_file), "event",
            "has neither impressions nor purchases: no training example can be built (examples come from "
            "impressions, or from purchases when a log has no impressions)",
            f"add the impressions (or, for a purchase log, the purchases), {_LEAVE_OUT}"))
    return found
