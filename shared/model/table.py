"""`TableEmbedding`: an `nn.Embedding` for the model's small lookup tables (event types, recency buckets, slot
positions), a subclass only so that DP-SGD can use per-sample gradient norms that suit small tables
(`fedcvr.shared.training.dp_samplers`); its weights, state-dict keys and forward are nn.Embedding's."""

from __future__ import annotations

from torch import nn


class TableEmbedding(nn.Embedding):
    """A small lookup table (a few dozen rows): forward(ids (...)) -> (..., embedding_dim)."""
