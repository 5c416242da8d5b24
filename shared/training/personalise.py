"""Personalisation after push-back: each node fine-tunes its local layers on its own data, so that the model it
serves is "global + local".

Run config keys:
  personalise          true (default): after the last round, each node trains its local item memory (`memory.py`)
                       on its own training split, with the global weights frozen, and serves and reports the result
                       beside the global model alone
  personalise-epochs   epochs of that fine-tuning
  personalise-lr       its Adam learning rate
  personalise-head     also fine-tune the scoring head (its copy on this node)
  personalise-select   true (default): keep the local layers only where they beat the global model alone on the
                       node's own validation split (`selection.py`: next-basket NDCG@10 on purchase logs, CTCVR AUC
                       otherwise), so that personalising never serves a node a model its own data rates worse;
                       false: always keep them
  personalise-blend    true (default): with select, also try adding w x a classic ranker's score of the signals to
                       the click logit, for each ranker of `data/signals.py: PRIORS` ("own past purchases, then best
                       sellers"; "best sellers") and w in BLENDS, and keep the one the validation split rates highest
                       (none where none is higher)
  personalise-min-validation
                       with select: keep them only where that validation figure rests on at least this many
                       units (validation purchases for the AUC, shoppers asked for a next basket for NDCG@10); 0 (the
                       default) keeps any strict gain: on Amazon Magazine a 30-unit floor dropped every node's
                       layers (4 to 13 validation shoppers each) and with them the test gain they bring under DP

What is trained here never leaves the node: no update is sent after it, so it is not part of the federation's
DP-SGD (the ledger's epsilon covers every weight that leaves a node). The personalised model is what the node
serves to its own shoppers, from its own data, as any local recommender does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.signals import PRIORS
from ..model.errors import ModelConfigError
from ..model.esmm import ConversionModel
from ..settings import Section
from .data import TrainingSet
from .loop import ItemSide, train_epoch
from .prepare import Prepared
from .selection import selection_metric, validation_score


@dataclass(frozen=True)
class PersonaliseConfig(Section):
    enabled: bool
    epochs: int
    lr: float
    head: bool
    select: bool
    blend: bool
    min_validation: int

    ERROR = ModelConfigError
    KEYS = {"personalise": "enabled", "personalise-epochs": "epochs", "personalise-lr": "lr",
            "personalise-head": "head", "personalise-select": "select", "personalise-blend": "blend",
            "personalise-min-validation": "min_validation"}

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ModelConfigError(f"personalise-epochs = {self.epochs!r}: must be at least 1 (or set "
                                   "personalise = false to serve the global model alone)")
        if self.min_validation < 0:
            raise ModelConfigError(f"personalise-min-validation = {self.min_validation!r}: must be 0 or more, e.g. 30")
        if not self.lr > 0:
            raise ModelConfigError(f"personalise-lr = {self.lr!r}: must be > 0, e.g. 0.01")


@dataclass(frozen=True)
class Outcome:
    """What personalising did: `kept` the local layers or not (the item memory's table: `memory`; a classic
    ranker blended in: `blend`, e.g. "repeat x 0.5", "" for none), the validation `metric` of the global model alone
    (`global_score`) and of global + local (`local_score`, the best of those tried) over `units` validation units
    (purchases or next-basket shoppers); scores are None where the split has no value or was not read."""

    kept: bool
    metric: str
    global_score: float | None
    local_score: float | None
    units: int = 0
    too_few: bool = False
    memory: bool = False
    blend: str = ""

    def describe(self) -> str:
        def text(score: float | None) -> str:
            return "none" if score is None else f"{score:.4f}"
        if self.kept and self.global_score is None:
            return "local layers kept (personalise-select = false: validation not read)"
        parts = (["item memory"] if self.memory else []) + ([f"blend {self.blend}"] if self.blend else [])
        verdict = f"kept ({', '.join(parts)})" if self.kept else "dropped (global alone serves)"
        few = " (too few to choose on: personalise-min-validation)" if self.too_few else ""
        return (f"local layers {verdict}: validation {self.metric} {text(self.global_score)} global, "
                f"{text(self.local_score)} global + local, over {self.units} units{few}")


BLENDS = (0.5, 1.0, 2.0)  # weights of each prior tried on validation (personalise-blend)


def personalise(model: ConversionModel, side: ItemSide, prepared: Prepared, config: PersonaliseConfig,
                batch_size: int, seed: int, device: torch.device) -> Outcome:
    """Attach a local item memory over the side's items and train it (and with `config.head` the head) for
    `config.epochs` epochs on the training split of `prepared`, every other weight frozen. With `config.select`,
    keep it only where global + local scores strictly higher than the global model alone on the validation split;
    with `config.blend` too, try each prior of PRIORS at each weight of BLENDS as the memory's blend, on top of the
    better of the two, and keep the best. The local layers stay only where the best scores strictly higher than the
    global model alone, over at least `config.min_validation` units (no value there, or fewer units: the global
    model stays, and the model is left exactly as it came)."""
    train = prepared.splits["train"]
    metric = selection_metric(prepared)
    model.memory = None
    if len(train) == 0:
        return Outcome(False, metric, None, None)
    before = validation_score(model, side, prepared, device) if config.select else None
    head = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
    _fit_local(model, side, train, config, batch_size, seed, device)
    if not config.select:
        return Outcome(True, metric, None, None, memory=True)
    fitted = validation_score(model, side, prepared, device)
    if before.value is None or fitted.value is None:
        return _drop(model, head, Outcome(False, metric, before.value, fitted.value, fitted.units))
    best, with_memory = max(before.value, fitted.value), fitted.value > before.value
    if not with_memory:  # a zero table scores exactly as the global model: the blend is tried on that alone
        with torch.no_grad():
            model.memory.table.weight.zero_()
        model.head.load_state_dict(head)
    too_few = fitted.units < config.min_validation
    blend, chosen = "", torch.zeros_like(model.memory.blend)
    # too few units: the layers are dropped whatever a blend scores, so none is tried (each try ranks validation)
    for name, prior in PRIORS.items() if config.blend and not too_few else ():
        for weight in BLENDS:
            trial = weight * torch.from_numpy(prior()).to(chosen.device)
            with torch.no_grad():
                model.memory.blend.copy_(trial)
            found = validation_score(model, side, prepared, device).value
            if found is not None and found > best:
                best, blend, chosen = found, f"{name} x {weight:g}", trial
    with torch.no_grad():
        model.memory.blend.copy_(chosen)
    outcome = Outcome(best > before.value and not too_few, metric, before.value, best, fitted.units, too_few,
                      with_memory, blend)
    return outcome if outcome.kept else _drop(model, head, outcome)


def _drop(model: ConversionModel, head: dict[str, torch.Tensor], outcome: Outcome) -> Outcome:
    model.memory = None
    model.head.load_state_dict(head)
    return outcome


def _fit_local(model: ConversionModel, side: ItemSide, train: TrainingSet, config: PersonaliseConfig, batch_size: int,
               seed: int, device: torch.device) -> float:
    memory = model.attach_memory(side.item_ids)
    local = [memory.table.weight] + (list(model.head.parameters()) if config.head else [])
    keep = {p: p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in local}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        optimizer = torch.optim.Adam(local, lr=config.lr)
        rng = np.random.default_rng([seed, 11])
        loss = float("nan")
        for _ in range(config.epochs):
            loss = train_epoch(model, side, train, optimizer, batch_size, rng, device)
    finally:
        for p, flag in keep.items():
            p.requires_grad_(flag)
    model.eval()
    return loss
