"""The ESMM conversion head and the whole conversion model.

pCTR = P(click | impression), pCVR = P(purchase | click), pCTCVR = pCTR x pCVR.
Trained on all impressions with  loss = BCE(pCTR, clicked) + BCE(pCTCVR, purchased),  so pCVR is learned over the
entire impression space, without the sample-selection bias of training it on clicked impressions only. Items are
ranked by pCTCVR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.signals import N_SIGNALS
from .config import ModelConfig
from .encoder import Backbone, ItemEncoder, load_backbone
from .memory import ItemMemory
from .table import TableEmbedding
from .user_tower import UserTower, recency_bucket


class ESMMHead(nn.Module):
    """forward(user (B, D), target (B, D), position (B,) slot, 0 = unknown, signals (B, N_SIGNALS)) -> ctr logit
    (B,), cvr logit (B,). Each tower reads the user and item vectors, their product, and the shop's signals of the
    pair (`data/signals.py`: the item in the shopper's whole history, its recent sales on this shop).

    A learned per-position bias (zero for unknown positions) is added to the click logit: it absorbs position
    bias in training, and serving scores with position 0 rank by relevance alone."""

    def __init__(self, dim: int, hidden: int, max_position: int, ctr_prior: float = 0.5, cvr_prior: float = 0.5):
        super().__init__()
        self.max_position = max_position

        def tower() -> nn.Module:
            return nn.Sequential(nn.Linear(3 * dim + N_SIGNALS, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1))

        self.ctr = tower()
        self.cvr = tower()
        # Start from typical rates, not 0.5: otherwise the first steps only learn that most impressions are not
        # clicked, and under DP-SGD those steps cost privacy budget and carry most of the clipped gradient.
        with torch.no_grad():
            self.ctr[-1].bias.fill_(math.log(ctr_prior / (1 - ctr_prior)))
            self.cvr[-1].bias.fill_(math.log(cvr_prior / (1 - cvr_prior)))
        self.position_bias = TableEmbedding(max_position + 1, 1)
        nn.init.zeros_(self.position_bias.weight)

    def forward(self, user: torch.Tensor, target: torch.Tensor, position: torch.Tensor, signals: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.cat([user, target, user * target, signals], -1)
        slot = position.clamp(0, self.max_position)
        return self.ctr(features)[..., 0] + self.position_bias(slot)[..., 0], self.cvr(features)[..., 0]


def esmm_loss(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor, clicked: torch.Tensor, purchased: torch.Tensor,
              reduction: str = "mean", log_q: torch.Tensor | None = None) -> torch.Tensor:
    """BCE(pCTR, clicked) + BCE(pCTCVR, purchased), computed in log space for stability. (B,) -> scalar or (B,).
    With `log_q` (B,), each example's negative-sampling correction (`data/negatives.py`), the click logit is
    ctr_logit - log_q in both terms: the model's own logit then ranks the whole catalog, not the sampled one."""
    if log_q is not None:
        ctr_logit = ctr_logit - log_q
    click_loss = F.binary_cross_entropy_with_logits(ctr_logit, clicked, reduction="none")
    log_ctcvr = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    log_not_ctcvr = torch.log1p(-torch.exp(log_ctcvr).clamp(max=1 - 1e-7))
    purchase_loss = -(purchased * log_ctcvr + (1 - purchased) * log_not_ctcvr)
    loss = click_loss + purchase_loss
    return loss.mean() if reduction == "mean" else loss


@dataclass
class ScoreInputs:
    """One batch in terms of the U item embeddings it needs (indices into those U rows).

    target (B,), history (B, L) (any value at padding), history_mask (B, L) bool, events (B, L) event codes,
    age_hours (B, L), position (B,) with 0 = unknown, signals (B, N_SIGNALS) of each (shopper, target) pair."""

    target: torch.Tensor
    history: torch.Tensor
    history_mask: torch.Tensor
    events: torch.Tensor
    age_hours: torch.Tensor
    position: torch.Tensor
    signals: torch.Tensor

    def paired_with(self, candidates: torch.Tensor, signals: torch.Tensor) -> ScoreInputs:
        """The n x k (shopper, candidate) pairs with their signals (n, k, N_SIGNALS) as n k examples at an unknown
        position, shopper-major: each shopper's history repeated once per candidate (what
        `ConversionModel.score_candidates` avoids)."""
        n, k = len(self.history), len(candidates)
        return ScoreInputs(target=candidates.repeat(n), history=self.history.repeat_interleave(k, 0),
                           history_mask=self.history_mask.repeat_interleave(k, 0),
                           events=self.events.repeat_interleave(k, 0),
                           age_hours=self.age_hours.repeat_interleave(k, 0),
                           position=torch.zeros(n * k, dtype=torch.long, device=candidates.device),
                           signals=signals.reshape(n * k, -1))


class ConversionModel(nn.Module):
    """Item encoder + user tower + ESMM head. Only adapter, projection, tower and head weights train."""

    def __init__(self, backbone: Backbone, config: ModelConfig):
        super().__init__()
        self.config = config
        self.item_encoder = ItemEncoder(backbone, config.adapter_layers, config.adapter_size, config.dim)
        self.user_tower = UserTower(config.dim, config.attention_hidden)
        self.head = ESMMHead(config.dim, config.head_hidden, config.max_position, config.ctr_prior,
                             config.cvr_prior)
        self.memory: ItemMemory | None = None  # local, never sent (`memory.py`); see `attach_memory`

    def attach_memory(self, item_ids) -> ItemMemory:
        """Give the model a local item memory over `item_ids` (rows at zero: it scores as before), or keep the one
        it has, aligned to these ids."""
        memory = ItemMemory(item_ids, self.config.dim) if self.memory is None else self.memory.aligned(item_ids)
        self.memory = memory.to(next(self.head.parameters()).device)
        return self.memory

    def encode_items(self, states: torch.Tensor, mask: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        """(U, T, H) prefix states, (U, T) mask, (U, 2) price features -> (U, D) item embeddings."""
        return self.item_encoder(states, mask, numeric)

    def score(self, items: torch.Tensor, batch: ScoreInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """items (U, D) -> ctr logit (B,), cvr logit (B,), attention over the history (B, L)."""
        target = items[batch.target]
        user, weights = self.user_tower(*self._behaviour_inputs(items, batch), target)
        ctr, cvr = self.head(user, target, batch.position, batch.signals)
        return ctr + self.local_blend(batch.signals), cvr, weights

    def local_blend(self, signals: torch.Tensor) -> torch.Tensor | float:
        """(..., N_SIGNALS) -> (...) what the node's local memory adds to the click logit: the score of the signals
        under its `blend` weights (`memory.py`); 0 without a memory."""
        if self.memory is None:
            return 0.0
        return signals @ self.memory.blend

    def score_candidates(self, items: torch.Tensor, batch: ScoreInputs, candidates: torch.Tensor,
                         signals: torch.Tensor) -> torch.Tensor:
        """items (U, D), n shoppers' `batch` (its target, position and signals unused), candidates (k,) rows of
        items, signals (n, k, N_SIGNALS) of each pair -> pCTCVR (n, k) of every candidate for every shopper at an
        unknown position: `score` of each (shopper, candidate) pair, computed without repeating a shopper's history
        k times."""
        ctr, cvr, _ = self.score_against(items, batch, candidates, signals)
        return torch.sigmoid(ctr) * torch.sigmoid(cvr)

    def score_against(self, items: torch.Tensor, batch: ScoreInputs, candidates: torch.Tensor,
                      signals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As `score_candidates`, but -> ctr logit (n, k), cvr logit (n, k) and the attention over each shopper's
        history (n, k, L): `score` of each (shopper, candidate) pair at an unknown position."""
        targets = items[candidates]  # (k, D)
        user, weights = self.user_tower.against(*self._behaviour_inputs(items, batch), targets)  # (n, k, D)
        ctr, cvr = self._head_pairs(user, targets, signals)
        return ctr, cvr, weights.permute(1, 0, 2)

    def score_masked(self, items: torch.Tensor, batch: ScoreInputs, masks: torch.Tensor, candidates: torch.Tensor,
                     signals: torch.Tensor) -> torch.Tensor:
        """One shopper's `batch` (n = 1) read through each of N history `masks` (N, L) -> pCTCVR (N, k) of every
        candidate: `score_candidates` of the history repeated N times with mask n each, with the attention
        computed once (`UserTower.against_masks`). signals (N, k, N_SIGNALS)."""
        history, events, recency, _ = self._behaviour_inputs(items, batch)
        targets = items[candidates]
        user = self.user_tower.against_masks(history, events, recency, masks, targets)  # (N, k, D)
        ctr, cvr = self._head_pairs(user, targets, signals)
        return torch.sigmoid(ctr) * torch.sigmoid(cvr)

    def _head_pairs(self, user: torch.Tensor, targets: torch.Tensor, signals: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """user (n, k, D), targets (k, D), signals (n, k, N_SIGNALS) -> ctr and cvr logits (n, k), position
        unknown."""
        n, k, dim = user.shape
        flat_targets = targets[None].expand(n, k, dim).reshape(n * k, dim)
        flat_signals = signals.reshape(n * k, -1)
        ctr, cvr = self.head(user.reshape(n * k, dim), flat_targets,
                             torch.zeros(n * k, dtype=torch.long, device=user.device), flat_signals)
        ctr = ctr + self.local_blend(flat_signals)
        return ctr.view(n, k), cvr.view(n, k)

    @staticmethod
    def _behaviour_inputs(items: torch.Tensor, batch: ScoreInputs
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The user tower's history (B, L, D), event codes, recency buckets and mask (B, L) of a batch."""
        return (items[batch.history.clamp(min=0)], batch.events.clamp(min=0), recency_bucket(batch.age_hours),
                batch.history_mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def initial_model(config: ModelConfig, seed: int) -> tuple[ConversionModel, Backbone]:
    """The model a federation starts from, with its backbone: the same settings and `seed` always give the same
    initial trainable weights (the coordinator's, and those of the each-merchant-alone baseline)."""
    torch.manual_seed(seed)
    backbone = load_backbone(config.encoder)
    return ConversionModel(backbone, config), backbone
