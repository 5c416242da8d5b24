"""Examples of one or many merchants over one item catalog, and the batches the model trains on.

Item codes of each merchant's examples are mapped to rows of a shared `Catalog` (an item sold by several
merchants is one row, so its text is encoded once). A batch names the U distinct items it needs (targets and
history items together), so each is encoded once per step: a history item and a target item share one encoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch

from ..data.examples import ExampleColumns, Examples
from ..model.encoder import item_text
from ..model.esmm import ScoreInputs


@dataclass
class Catalog:
    """N items: ids, encoder texts and price features (N, 2) = (log1p(price), price missing)."""

    item_ids: np.ndarray
    texts: list[str]
    numeric: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_items(cls, frames: list[pd.DataFrame]) -> Catalog:
        items = pd.concat(frames, ignore_index=True).drop_duplicates("item_id", keep="first")
        for column in ("description", "brand", "category"):
            if column not in items:
                items[column] = ""
        texts = [item_text(*row) for row in items[["title", "description", "brand", "category"]].itertuples(
            index=False)]
        price = pd.to_numeric(items.get("price", pd.Series(np.nan, index=items.index)), errors="coerce")
        numeric = np.stack([np.log1p(price.fillna(0.0).clip(lower=0.0)), price.isna().astype(float)], 1)
        return cls(items["item_id"].to_numpy(dtype=object), texts, numeric.astype(np.float32))

    def codes(self, item_ids: np.ndarray) -> np.ndarray:
        codes = pd.Index(self.item_ids).get_indexer(item_ids)
        if (codes < 0).any():
            raise KeyError(f"items not in the catalog: {list(np.asarray(item_ids)[codes < 0][:5])}")
        return codes.astype(np.int64)


@dataclass(kw_only=True)
class TrainingSet(ExampleColumns):
    """N examples in catalog codes. merchant (N,) index of the merchant; user (N,) shopper, unique over merchants;
    timestamp (N,) ns; slot (N,) position + 1, 0 = unknown; other fields as in `Examples`."""

    merchant: np.ndarray
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    slot: np.ndarray

    def __len__(self) -> int:
        return len(self.item)

    def subset(self, rows: np.ndarray) -> TrainingSet:
        return TrainingSet(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @classmethod
    def build(cls, parts: list[Examples], catalog: Catalog) -> TrainingSet:
        """Concatenate the examples of several merchants (part k = merchant k) in catalog codes."""
        columns: dict[str, list[np.ndarray]] = {f.name: [] for f in fields(cls)}
        user_offset = 0
        for k, ex in enumerate(parts):
            to_catalog = catalog.codes(ex.item_ids) if len(ex.item_ids) else np.zeros(0, np.int64)
            hist = np.where(ex.history_item >= 0, to_catalog[np.maximum(ex.history_item, 0)], -1)
            columns["merchant"].append(np.full(len(ex), k, np.int32))
            columns["user"].append(ex.user.astype(np.int64) + user_offset)
            columns["item"].append(to_catalog[ex.item])
            columns["timestamp"].append(ex.timestamp.astype(np.int64))
            columns["slot"].append(np.where(ex.position >= 0, ex.position + 1, 0).astype(np.int64))
            columns["clicked"].append(ex.clicked.astype(np.float32))
            columns["purchased"].append(ex.purchased.astype(np.float32))
            columns["history_item"].append(hist.astype(np.int64))
            columns["history_event"].append(ex.history_event.astype(np.int64))
            columns["history_age_hours"].append(ex.history_age_hours.astype(np.float32))
            columns["true_p_click"].append(ex.true_p_click.astype(np.float32))
            columns["true_p_purchase"].append(ex.true_p_purchase.astype(np.float32))
            columns["signals"].append(ex.signals.astype(np.float32))
            columns["log_q"].append(ex.log_q.astype(np.float32))
            user_offset += len(ex.user_ids)
        return cls(**{name: np.concatenate(values) for name, values in columns.items()})


def subsample_negatives(data: TrainingSet, rate: float, rng: np.random.Generator) -> TrainingSet:
    """Every positive example (clicked: a click of an impression, a purchase of a purchase log) and each negative
    with probability `rate`, for a faster epoch; `rate` >= 1 returns `data` itself.

    Correction: in the kept examples the odds of a click are those of the data divided by `rate`, so a model
    trained on them as they are would learn click logits raised by -log(rate). Each kept example's log_q (which
    training subtracts from the click logit, `model/esmm.py` `esmm_loss`) is raised by log(rate): the model's
    own click logit then learns the logit of the full data, calibrated, and pCTCVR = pCTR x pCVR with it (clicked
    examples are all kept, so pCVR sees the same examples as without sub-sampling)."""
    if rate >= 1.0:
        return data
    if not 0.0 < rate:
        raise ValueError(f"negative sub-sampling rate must be in (0, 1], got {rate}")
    keep = np.flatnonzero((data.clicked > 0) | (rng.random(len(data)) < rate))
    out = data.subset(keep)
    out.log_q = (out.log_q + np.float32(np.log(rate))).astype(np.float32)
    return out


@dataclass
class Batch:
    """items (U,) catalog rows to encode; inputs index into those U rows; labels and sampling corrections
    log_q (B,) (`data/negatives.py`)."""

    items: torch.Tensor
    inputs: ScoreInputs
    clicked: torch.Tensor
    purchased: torch.Tensor
    log_q: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        inputs = ScoreInputs(**{f.name: getattr(self.inputs, f.name).to(device) for f in fields(ScoreInputs)})
        return Batch(self.items, inputs, self.clicked.to(device), self.purchased.to(device), self.log_q.to(device))


def make_batch(data: TrainingSet, rows: np.ndarray) -> Batch:
    target = data.item[rows]
    history = data.history_item[rows]
    mask = history >= 0
    items, inverse = np.unique(np.concatenate([target, history[mask]]), return_inverse=True)
    local_history = np.zeros_like(history)
    local_history[mask] = inverse[len(target):]
    inputs = ScoreInputs(
        target=torch.from_numpy(inverse[: len(target)].astype(np.int64)),
        history=torch.from_numpy(local_history),
        history_mask=torch.from_numpy(mask),
        events=torch.from_numpy(data.history_event[rows]),
        age_hours=torch.from_numpy(data.history_age_hours[rows]),
        position=torch.from_numpy(data.slot[rows]),
        signals=torch.from_numpy(data.signals[rows]),
    )
    return Batch(torch.from_numpy(items), inputs, torch.from_numpy(data.clicked[rows]),
                 torch.from_numpy(data.purchased[rows]), torch.from_numpy(data.log_q[rows]))


def batch_rows(data: TrainingSet, batch_size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    """Row indices of each batch. With `rng`: shuffled within each merchant, cut into batches, batches shuffled
    (a batch holds one merchant's examples, so it needs at most that merchant's catalog). Without: in order."""
    if rng is None:
        for start in range(0, len(data), batch_size):
            yield np.arange(start, min(start + batch_size, len(data)))
        return
    chunks = []
    for merchant in np.unique(data.merchant):
        rows = rng.permutation(np.flatnonzero(data.merchant == merchant))
        chunks.extend(rows[start:start + batch_size] for start in range(0, len(rows), batch_size))
    for k in rng.permutation(len(chunks)):
        yield chunks[k]
