"""The user-interest tower: target-aware attention (DIN-style) over the shopper's recent behaviour, plus a pooled
long-term interest. Built only from Linear, Embedding (`TableEmbedding`) and LayerNorm, for which
Opacus computes per-sample gradients."""

from __future__ import annotations

import torch
from torch import nn

from ..data.contract import EVENT_TYPES
from .table import TableEmbedding

RECENCY_BUCKETS = 16  # bucket = floor(log2(1 + age in hours)), capped: 0 = under an hour ... 15 = years


def recency_bucket(age_hours: torch.Tensor) -> torch.Tensor:
    """(B, L) ages in hours -> (B, L) bucket ids in [0, RECENCY_BUCKETS)."""
    return torch.log2(1.0 + age_hours.clamp(min=0)).floor().long().clamp(0, RECENCY_BUCKETS - 1)


class UserTower(nn.Module):
    """forward(history (B, L, D), events (B, L) event codes, recency (B, L) buckets, mask (B, L) bool,
    target (B, D)) -> user vector (B, D), attention weights (B, L) in [0, 1] (0 at padding)."""

    def __init__(self, dim: int, attention_hidden: int):
        super().__init__()
        self.event = TableEmbedding(len(EVENT_TYPES), dim)
        self.recency = TableEmbedding(RECENCY_BUCKETS, dim)
        self.attention = nn.Sequential(nn.Linear(4 * dim, attention_hidden), nn.ReLU(),
                                       nn.Linear(attention_hidden, 1))
        self.long_term = nn.Linear(dim, dim)
        self.out = nn.Sequential(nn.Linear(2 * dim, dim), nn.LayerNorm(dim))

    def forward(self, history: torch.Tensor, events: torch.Tensor, recency: torch.Tensor, mask: torch.Tensor,
                target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        behaviour = history + self.event(events) + self.recency(recency)  # (B, L, D)
        query = target[:, None, :].expand_as(behaviour)
        scores = self.attention(torch.cat([behaviour, query, behaviour - query, behaviour * query], -1))[..., 0]
        # DIN keeps the weights unnormalised (no softmax), so that how much of the history matches the target
        # stays visible in the interest vector's size
        weights = torch.sigmoid(scores) * mask  # (B, L), 0 at padding
        count = mask.sum(1, keepdim=True).clamp(min=1)
        interest = (weights[..., None] * behaviour).sum(1) / count  # (B, D)
        long_term = self.long_term((behaviour * mask[..., None]).sum(1) / count)  # (B, D)
        return self.out(torch.cat([interest, long_term], -1)), weights
