"""Personalisation after push-back: each node fine-tunes its local layers on its own data, so that the model it
serves is "global + local".

Run config keys:
  personalise          true (default): after the last round, each node trains its local item memory (`memory.py`)
                       on its own training split, with the global weights frozen, and serves and reports the result
                       beside the global model alone
  personalise-epochs   epochs of that fine-tuning
  personalise-lr       its Adam learning rate
  personalise-head     also fine-tune the scoring head (its copy on this node)

What is trained here never leaves the node: no update is sent after it, so it is not part of the federation's
DP-SGD (the ledger's epsilon covers every weight that leaves a node). The personalised model is what the node
serves to its own shoppers, from its own data, as any local recommender does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.errors import ModelConfigError
from ..model.esmm import ConversionModel
from ..settings import Section
from .data import TrainingSet
from .loop import ItemSide, train_epoch


@dataclass(frozen=True)
class PersonaliseConfig(Section):
    enabled: bool = True
    epochs: int = 2
    lr: float = 0.01
    head: bool = False

    ERROR = ModelConfigError
    KEYS = {"personalise": "enabled", "personalise-epochs": "epochs", "personalise-lr": "lr",
            "personalise-head": "head"}

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ModelConfigError(f"personalise-epochs = {self.epochs!r}: must be at least 1 (or set "
                                   "personalise = false to serve the global model alone)")
        if not self.lr > 0:
            raise ModelConfigError(f"personalise-lr = {self.lr!r}: must be > 0, e.g. 0.01")


def personalise(model: ConversionModel, side: ItemSide, data: TrainingSet, config: PersonaliseConfig,
                batch_size: int, seed: int, device: torch.device) -> float:
    """Attach a local item memory over the side's items (or keep the one there) and train it (and with
    `config.head` the head) for `config.epochs` epochs on `data`, every other weight frozen; returns the last
    epoch's mean loss (nan when `data` is empty: the model is left as it was)."""
    if len(data) == 0:
        return float("nan")
    memory = model.attach_memory(side.item_ids)
    local = list(memory.parameters()) + (list(model.head.parameters()) if config.head else [])
    keep = {p: p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in local}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        optimizer = torch.optim.Adam(local, lr=config.lr)
        rng = np.random.default_rng([seed, 11])
        loss = float("nan")
        for _ in range(config.epochs):
            loss = train_epoch(model, side, data, optimizer, batch_size, rng, device)
    finally:
        for p, flag in keep.items():
            p.requires_grad_(flag)
    model.eval()
    return loss
