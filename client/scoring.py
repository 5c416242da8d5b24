"""Scoring catalog rows for a shopper's history with the full model, and why each item scores as it does.

`score_rows` runs the target-aware user tower and the ESMM head over candidate rows of the item index, in chunks
of at most `MAX_CELLS` (row x history position) cells, so that neither a large k nor a long history can make one
forward pass large. `explain` gives each item its own reasons: the user tower's attention is target-aware (each
candidate gets its own attention row), but most of an attention weight comes from the behaviour alone (its event
type and recency), so ranking history items by raw attention names the same history item for nearly every
candidate, and once the weights saturate (all 1.0, as seen in trained models) the ties are broken by position.
An item's reasons are instead the history items whose removal lowers that item's pCTCVR the most (leave-one-out
through the same model): what in the history raises this item's score, item by item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedcvr.shared.data.contract import EVENT_TYPES
from fedcvr.shared.data.signals import N_PAIR, unseen_pair
from fedcvr.shared.model.esmm import ConversionModel, ScoreInputs

from .item_index import ItemIndex

MAX_CELLS = 65_536  # rows x history positions per forward pass: ~64 MB of attention inputs at D = 64
EVENT_RANK = {"impression": 0, "click": 1, "cart": 2, "purchase": 3}
VERB = {"impression": "saw", "click": "viewed", "cart": "added to your cart", "purchase": "bought"}


@dataclass
class History:
    """A shopper's recent events, oldest first: item ids, event types, ages in hours at scoring time."""

    item_ids: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    age_hours: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.item_ids)

    def last(self, n: int) -> History:
        """The `n` most recent events."""
        return self if len(self) <= n else History(self.item_ids[-n:], self.events[-n:], self.age_hours[-n:])


@dataclass
class Scores:
    """pCTR, pCVR, pCTCVR (B,) and the attention over the history (B, L) of B scored rows."""

    p_ctr: np.ndarray
    p_cvr: np.ndarray
    p_ctcvr: np.ndarray
    attention: np.ndarray


def _one_history(index: ItemIndex, rows: np.ndarray, history: History) -> tuple[torch.Tensor, ScoreInputs]:
    """The embeddings of index `rows` followed by the history's items (U, D), and the history as one shopper's
    inputs indexing into them (an empty history as one masked slot: scored as no history at all). Only the
    history's fields are set: `score_against` and `score_masked` read nothing else."""
    hist_rows = np.asarray([index.position[i] for i in history.item_ids], dtype=np.int64)
    table = torch.from_numpy(index.embeddings[np.concatenate([rows, hist_rows])])  # candidates, then the history
    seen = bool(len(hist_rows))
    positions = torch.arange(len(rows), len(rows) + len(hist_rows)) if seen else torch.zeros(1, dtype=torch.long)
    return table, ScoreInputs(
        target=torch.zeros(1, dtype=torch.long),
        history=positions[None],
        history_mask=torch.full((1, max(len(hist_rows), 1)), seen),
        events=torch.as_tensor(pd.Index(EVENT_TYPES).get_indexer(history.events) if seen else [0],
                               dtype=torch.long)[None],
        age_hours=torch.as_tensor(history.age_hours if seen else [0.0], dtype=torch.float32)[None],
        position=torch.zeros(1, dtype=torch.long),
        signals=torch.zeros(1, 0),
    )


@torch.no_grad()
def score_rows(model: ConversionModel, index: ItemIndex, rows: np.ndarray, history: History,
               signals: np.ndarray) -> Scores:
    """Scores of index `rows` (B,) for `history` (an empty one is scored as no history at all), each row with its
    signals (B, N_SIGNALS) for this shopper (`Recommender.signals`). The one history is read once for all rows
    (`ConversionModel.score_against`: the same scores as `score` of each (history, row) pair)."""
    table, shopper = _one_history(index, rows, history)
    length = shopper.history.shape[1]
    parts: list[tuple[np.ndarray, ...]] = []
    step = max(1, MAX_CELLS // length)
    for start in range(0, len(rows), step):
        b = len(rows[start:start + step])
        ctr, cvr, attention = model.score_against(table, shopper, torch.arange(start, start + b),
                                                  torch.from_numpy(signals[start:start + b])[None])
        parts.append((torch.sigmoid(ctr[0]).numpy(), torch.sigmoid(cvr[0]).numpy(), attention[0].numpy()))
    if not parts:
        return Scores(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros((0, length)))
    p_ctr, p_cvr, attention = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return Scores(p_ctr, p_cvr, p_ctr * p_cvr, attention)


@torch.no_grad()
def contributions(model: ConversionModel, index: ItemIndex, rows: np.ndarray, history: History,
                  full: np.ndarray, signals: np.ndarray) -> tuple[list[str], np.ndarray]:
    """How much each distinct history item raises each row's pCTCVR: `full` (B,) minus the pCTCVR with all of that
    item's events left out of the history the user tower reads (each row keeps its `signals` (B, N_SIGNALS)). The
    N histories-without-one are scored against the B rows in one pass of `ConversionModel.score_masked` (the
    attention of each (history item, row) pair computed once for all N).
    -> (distinct history items in first-seen order, (B, N) drops)."""
    distinct = list(dict.fromkeys(history.item_ids))
    if not distinct or not len(rows):
        return distinct, np.zeros((len(rows), len(distinct)))
    owner = np.asarray(history.item_ids, dtype=object)
    keep = torch.from_numpy(np.stack([owner != item for item in distinct]))  # (N, L): the history without item n
    table, shopper = _one_history(index, rows, history)
    n, length = keep.shape
    step = max(1, MAX_CELLS // (n * length))
    # without item n, the rows that ARE item n lose their candidate-in-history signals (never touched)
    per_variant = np.repeat(signals[None], n, 0)  # (N, B, N_SIGNALS)
    row_items = index.item_ids[rows].astype(str)
    for v, item in enumerate(distinct):
        per_variant[v, row_items == item, :N_PAIR] = unseen_pair()
    per_variant = torch.from_numpy(per_variant)
    without = torch.cat([model.score_masked(table, shopper, keep, torch.arange(s, min(s + step, len(rows))),
                                            per_variant[:, s:s + step])
                         for s in range(0, len(rows), step)], dim=1)  # (N, B)
    return distinct, full[:, None] - without.numpy().T


def explain(drops: np.ndarray, attention: np.ndarray, distinct: list[str], history: History,
            title_of: Any, limit: int = 2) -> list[dict[str, Any]]:
    """One item's reasons: the (up to `limit`) history items whose removal lowers its pCTCVR (positive drops),
    largest first; when none does (a one-item history scores lower than no history at all, which a model rarely
    saw in training), the one history item with the largest drop alone. Each with its strongest event with the
    item, the attention weight it got (its largest over its events), the drop (`contribution`) and its title
    (`title_of(item_id)`)."""
    order = np.argsort(-drops, kind="stable")
    chosen = [n for n in order[:limit] if drops[n] > 0] or list(order[:1])
    out: list[dict[str, Any]] = []
    for n in chosen:
        item = distinct[n]
        mine = [i for i, h in enumerate(history.item_ids) if h == item]
        event = max((history.events[i] for i in mine), key=lambda e: EVENT_RANK.get(e, 0))
        out.append({"item_id": item, "title": title_of(item), "event": event,
                    "weight": round(float(attention[mine].max()), 4), "contribution": float(drops[n])})
    return out


def reason(because: list[dict[str, Any]]) -> str:
    """The words of an item's reasons: "because you bought X and viewed Y" ("" without reasons)."""
    if not because:
        return ""
    return "because you " + " and ".join(f"{VERB.get(b['event'], 'saw')} {b['title']}" for b in because)
