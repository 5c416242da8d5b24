"""The local item memory: a merchant's own table of item vectors, a personalised layer that never leaves its node.

Each of the merchant's items gets a learned offset (D,) added to its text embedding wherever items are encoded
(targets and history alike, `ItemSide.encode`), so that the model can learn what this shop's shoppers do with an
item beyond what its text says. Items without a row (new items, another shop's items) get no offset: their text
embedding alone, so cold start stays. The rows start at zero, so a model with a fresh memory scores exactly as
the global model does.

The memory also holds the node's `blend`: weights (N_SIGNALS,) of a linear score of the shop's signals added to the
click logit, w x one of the classic rankers of `data/signals.py: PRIORS` ("own past purchases, then best sellers";
"best sellers"), chosen after training on the node's own validation split (`training/personalise.py`); zero = none.
A blend of the model with the strongest classic baseline of this shop, local like the table.

The memory is keyed by item id, not by row: a node's catalog order and the serving catalog's can differ. Its
parameters are named `memory.*`; `weights.trainable_state` (what federated messages carry and aggregation sees)
leaves them out, and a model folder keeps them in their own file (`folder.LOCAL`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..data.signals import N_SIGNALS

PREFIX = "memory."
MAX_BLEND = 50.0  # largest weight a blend may hold (BLENDS x the priors' weights stay far below)


class ItemMemory(nn.Module):
    """forward(rows (...,) rows of `item_ids`, -1 = none) -> offsets (..., D), zero for -1."""

    def __init__(self, item_ids: Sequence[str], dim: int):
        super().__init__()
        self.item_ids = pd.Index([str(i) for i in item_ids])
        self.table = nn.Embedding(len(self.item_ids) + 1, dim)  # the last row is "no row", kept at zero
        nn.init.zeros_(self.table.weight)
        self.blend = nn.Parameter(torch.zeros(N_SIGNALS), requires_grad=False)  # chosen on validation, not trained

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """Row of each item id, -1 where the memory has none."""
        return self.item_ids.get_indexer([str(i) for i in item_ids]).astype(np.int64)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        none = len(self.item_ids)
        offsets = self.table(torch.where(rows < 0, torch.full_like(rows, none), rows))
        return offsets * (rows >= 0).unsqueeze(-1).to(offsets.dtype)

    def aligned(self, item_ids: Sequence[str]) -> ItemMemory:
        """A memory over `item_ids` (e.g. the serving catalog), with this one's rows where the ids match."""
        out = ItemMemory(item_ids, self.table.embedding_dim)
        rows = self.rows(out.item_ids)
        known = np.flatnonzero(rows >= 0)
        with torch.no_grad():
            out.table.weight[torch.from_numpy(known)] = self.table.weight[torch.from_numpy(rows[known])]
            out.blend.copy_(self.blend)
        return out.to(self.table.weight.device)


def save_memory(memory: ItemMemory, path) -> None:
    """Write the memory's table with its item ids (JSON, in the file's metadata)."""
    save_file({"table": memory.table.weight.detach().contiguous().cpu(), "blend": memory.blend.detach().cpu()},
              str(path),
              metadata={"item_ids": json.dumps(list(memory.item_ids))})


def load_memory(path, dim: int) -> ItemMemory:
    """The memory saved by `save_memory`; ValueError naming the file when it does not fit a model of `dim`."""
    with safe_open(str(path), framework="pt") as handle:
        item_ids = json.loads((handle.metadata() or {}).get("item_ids", "[]"))
        table = handle.get_tensor("table")
        blend = handle.get_tensor("blend") if "blend" in handle.keys() else torch.zeros(N_SIGNALS)
    if tuple(table.shape) != (len(item_ids) + 1, dim):
        raise ValueError(f"{path}: the local item memory holds a table of shape {tuple(table.shape)}, but "
                         f"{len(item_ids)} item ids and model.dim = {dim} need ({len(item_ids) + 1}, {dim}); the file "
                         "belongs to another model: delete it to serve the global model alone")
    if tuple(blend.shape) != (N_SIGNALS,) or not bool(torch.isfinite(blend).all()) or \
            float(blend.abs().max()) > MAX_BLEND:
        raise ValueError(f"{path}: the local blend holds {tuple(blend.shape)} weights, largest "
                         f"{float(blend.abs().max()) if blend.numel() else 0.0!r}, but the model needs {N_SIGNALS} "
                         f"finite weights of at most {MAX_BLEND}; the file is damaged or belongs to another version: "
                         "delete it to serve the global model alone")
    memory = ItemMemory(item_ids, dim)
    with torch.no_grad():
        memory.table.weight.copy_(table)
        memory.blend.copy_(blend)
    return memory
