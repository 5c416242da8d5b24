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
        behaviour = self._behaviour(history, events, recency)  # (B, L, D)
        query = target[:, None, :].expand_as(behaviour)
        scores = self.attention(torch.cat([behaviour, query, behaviour - query, behaviour * query], -1))[..., 0]
        # DIN keeps the weights unnormalised (no softmax), so that how much of the history matches the target
        # stays visible in the interest vector's size
        weights = torch.sigmoid(scores) * mask  # (B, L), 0 at padding
        count = mask.sum(1, keepdim=True).clamp(min=1)
        interest = (weights[..., None] * behaviour).sum(1) / count  # (B, D)
        return self.out(torch.cat([interest, self._long_term(behaviour, mask, count)], -1)), weights

    def _behaviour(self, history: torch.Tensor, events: torch.Tensor, recency: torch.Tensor) -> torch.Tensor:
        """Each behaviour's item with its event type and recency, (B, L, D)."""
        return history + self.event(events) + self.recency(recency)

    def _long_term(self, behaviour: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The pooled long-term interest, (B, D): the mean behaviour over the real history, projected."""
        return self.long_term((behaviour * mask[..., None]).sum(1) / count)

    def against(self, history: torch.Tensor, events: torch.Tensor, recency: torch.Tensor, mask: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The user vectors of n shoppers against each of k candidate targets, (n, k, D), and the attention
        weights (k, n, L): what `forward` gives for every (shopper, candidate) pair, but with the candidate-free
        parts (behaviour, the long-term interest, the attention's terms in the behaviour alone) computed once per
        shopper and the attention's behaviour x target term as one matrix product. history (n, L, D), events /
        recency / mask (n, L), targets (k, D)."""
        behaviour = self._behaviour(history, events, recency)  # (n, L, D)
        weights = self._pair_weights(behaviour, targets) * mask[None]  # (k, n, L)
        return self._users(weights, behaviour, mask), weights

    def against_masks(self, history: torch.Tensor, events: torch.Tensor, recency: torch.Tensor,
                      masks: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The user vectors of one history read through each of N masks, against each of k targets, (N, k, D):
        what `against` gives for the history repeated N times with mask n each, with the attention computed once
        (a behaviour's attention weight depends on the behaviour and the target, never on the mask).
        history (1, L, D), events / recency (1, L), masks (N, L) bool, targets (k, D)."""
        behaviour = self._behaviour(history, events, recency)  # (1, L, D)
        weights = self._pair_weights(behaviour, targets) * masks[None]  # (k, 1, L) x (1, N, L) -> (k, N, L)
        return self._users(weights, behaviour.expand(len(masks), -1, -1), masks)

    def _pair_weights(self, behaviour: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The attention weight of each behaviour of n histories (n, L, D) for each of k targets (k, D), before
        any mask: (k, n, L) in [0, 1]."""
        first, second = self.attention[0], self.attention[2]
        w_b, w_q, w_diff, w_prod = first.weight.split(behaviour.shape[-1], dim=1)  # each (H, D)
        # W [b, q, b - q, b * q] + c = (W_b + W_diff) b + (W_q - W_diff) q + W_prod (b * q) + c
        per_shopper = behaviour @ (w_b + w_diff).T + first.bias  # (n, L, H)
        per_target = targets @ (w_q - w_diff).T  # (k, H)
        n, length, dim = behaviour.shape
        hidden = w_prod.shape[0]
        # (b * q) W_prod^T summed over d, as one (k, D) @ (D, n L H) product with columns b[n, l, :] * W_prod[h, :];
        # laid out (k, n, L, H) so that the sums and the ReLU below run in place
        crossed = targets @ (behaviour[:, :, None, :] * w_prod[None, None]).reshape(n * length * hidden, dim).T
        pre = crossed.view(-1, n, length, hidden).add_(per_shopper[None]).add_(per_target[:, None, None, :]).relu_()
        return torch.sigmoid(pre @ second.weight[0] + second.bias[0])  # (k, n, L)

    def _users(self, weights: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The user vectors (n, k, D) from masked attention weights (k, n, L) over behaviours (n, L, D), mask (n, L):
        the interest and the long-term interest, combined as `forward` combines them."""
        count = mask.sum(1, keepdim=True).clamp(min=1)  # (n, 1)
        interest = torch.einsum("knl,nld->nkd", weights, behaviour) / count[:, :, None]  # (n, k, D)
        long_term = self._long_term(behaviour, mask, count)  # (n, D)
        linear, norm = self.out[0], self.out[1]
        w_interest, w_long = linear.weight.split(behaviour.shape[-1], dim=1)
        return norm(interest @ w_interest.T + (long_term @ w_long.T + linear.bias)[:, None, :])
