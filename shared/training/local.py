"""One merchant's local training round (with or without Opacus DP-SGD) and local evaluation.

With DP (`dp.enabled = true`): Poisson sampling at rate batch-size / n, per-sample clipping to `dp.max-grad-norm`
and Gaussian noise planned so that all planned rounds together meet `dp.target-epsilon` at δ (see
`fedcvr.shared.privacy`). Opacus needs every input's first dimension to be the sample, so the private module
(`PerSampleModel`) encodes each example's own target item and, with frozen embeddings (`adapter.layers = 0`), its
own history items; with adapters inside BERT the history items are encoded once per step without gradients (the
target path carries the adapters' gradients). Without DP the round runs the same steps as central training.

FedProx's proximal term mu/2 ||w - w_global||^2 does not depend on any shopper's data, so it is applied as its own
step after each optimiser step (w <- w - lr mu (w - w_global)); it costs no privacy.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..dp_config import DPConfig, delta_refusal
from ..model.esmm import ConversionModel, esmm_loss
from ..model.user_tower import recency_bucket
from ..privacy import PrivacyLedger
from . import dp_samplers  # noqa: F401  (Opacus's functions for the model's small tables)
from .data import TrainingSet, subsample_negatives
from .learnable import label_problem
from .loop import ItemSide, train_epoch


class PerSampleModel(nn.Module):
    """The conversion model with sample-first inputs, for Opacus.

    forward(target_states (B, T, H), target_mask (B, T), target_numeric (B, 2),
            history (B, L, T', H) states (frozen embeddings) or (B, L, D) precomputed embeddings,
            history_tokens (B, L, T'), history_numeric (B, L, 2), history_mask (B, L), events (B, L),
            recency (B, L), position (B,), signals (B, N_SIGNALS)) -> ctr logit (B,), cvr logit (B,)
    """

    def __init__(self, model: ConversionModel):
        super().__init__()
        self.item_encoder = model.item_encoder
        self.user_tower = model.user_tower
        self.head = model.head

    def forward(self, target_states, target_mask, target_numeric, history, history_tokens, history_numeric,
                history_mask, events, recency, position, signals):
        if history.dim() == 4:  # one encoder call for target and history: Opacus sees each module used once
            encoded = self.item_encoder(torch.cat([target_states[:, None], history], 1),
                                        torch.cat([target_mask[:, None], history_tokens], 1),
                                        torch.cat([target_numeric[:, None], history_numeric], 1))  # (B, 1 + L, D)
            target, history = encoded[:, 0], encoded[:, 1:]
        else:
            target = self.item_encoder(target_states, target_mask, target_numeric)
        user, _ = self.user_tower(history, events, recency, history_mask, target)
        return self.head(user, target, position, signals)


@dataclass
class RoundResult:
    """What one local round did: examples seen, mean loss, steps, and whether it trained at all."""

    trained: bool
    examples: int
    loss: float
    steps: int
    reason: str = ""


def _private_inputs(model: ConversionModel, side: ItemSide, data: TrainingSet, rows: np.ndarray,
                    device: torch.device) -> tuple:
    target = torch.from_numpy(data.item[rows])
    t_states, t_mask = side.prefix.gather(target, device)
    history = data.history_item[rows]
    mask = torch.from_numpy(history >= 0)
    safe = torch.from_numpy(np.maximum(history, 0))
    if len(model.item_encoder.layers) == 0:
        h_states, h_tokens = side.prefix.gather(safe.reshape(-1), device)
        h_states = h_states.view(*safe.shape, *h_states.shape[1:])
        h_tokens = h_tokens.view(*safe.shape, -1)
    else:  # adapters inside BERT: encode the distinct history items once, without gradients
        with torch.no_grad():
            items, inverse = torch.unique(safe, return_inverse=True)
            h_states = side.encode(model, items, device)[inverse.to(device)]
        h_tokens = torch.ones(*safe.shape, 1, dtype=torch.bool, device=device)
    return (t_states, t_mask, side.numeric[target].to(device), h_states, h_tokens,
            side.numeric[safe].to(device), mask.to(device), torch.from_numpy(data.history_event[rows]).clamp(min=0)
            .to(device), recency_bucket(torch.from_numpy(data.history_age_hours[rows])).to(device),
            torch.from_numpy(data.slot[rows]).to(device), torch.from_numpy(data.signals[rows]).to(device))


class EsmmCriterion(nn.Module):
    """The ESMM loss as a criterion with a `reduction`, as Opacus's ghost clipping needs (it asks for the
    per-sample losses with reduction "none"). forward(ctr (B,), cvr (B,), clicked (B,), purchased (B,), log_q (B,))."""

    def __init__(self):
        super().__init__()
        self.reduction = "mean"

    def forward(self, ctr, cvr, clicked, purchased, log_q):
        return esmm_loss(ctr, cvr, clicked, purchased, reduction=self.reduction, log_q=log_q)


def make_private(engine, private: nn.Module, optimizer: torch.optim.Optimizer, loader, *, noise: float,
                 dp: DPConfig) -> tuple:
    """Opacus's wrappers for DP-SGD in the mode `dp.grad_sample_mode`: (module, optimizer, criterion, loader).

    "ghost": ghost clipping computes each example's gradient norm from the layer's activations and backprops and
    then takes a second backward pass of the loss re-weighted by each example's clipping factor, so per-sample
    gradients are never stored; "hooks": per-sample gradients are computed, clipped and summed. Both clip every
    example's gradient to `dp.max-grad-norm` and add the same Gaussian noise: the same mechanism and guarantee."""
    common = {"module": private, "optimizer": optimizer, "data_loader": loader, "noise_multiplier": noise,
              "max_grad_norm": dp.max_grad_norm, "poisson_sampling": True}
    if dp.grad_sample_mode == "ghost":  # Opacus returns the criterion that runs the two backward passes
        return engine.make_private(**common, criterion=EsmmCriterion(), grad_sample_mode="ghost")
    private, optimizer, loader = engine.make_private(**common)
    return private, optimizer, EsmmCriterion(), loader


def private_step(private: nn.Module, model: ConversionModel, side: ItemSide, data: TrainingSet, rows: np.ndarray,
                 optimizer: torch.optim.Optimizer, criterion, device: torch.device) -> float:
    """One DP-SGD step on the examples `rows` with the Opacus-wrapped `PerSampleModel`, its DP optimiser and
    criterion (from `make_private`: clipping per example, noise); returns the ESMM loss."""
    ctr, cvr = private(*_private_inputs(model, side, data, rows, device))
    loss = criterion(ctr, cvr, torch.from_numpy(data.clicked[rows]).to(device),
                     torch.from_numpy(data.purchased[rows]).to(device), torch.from_numpy(data.log_q[rows]).to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _proximal_step(params: list[nn.Parameter], anchor: list[torch.Tensor] | None, lr: float, mu: float) -> None:
    if anchor is None or mu <= 0:
        return
    with torch.no_grad():
        for p, a in zip(params, anchor):
            p.sub_(lr * mu * (p - a))


def steps_per_round(n_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """Poisson sample rate and optimiser steps of one DP round, exactly as Opacus's DPDataLoader will run them:
    b = ceil(n / batch size) batches an epoch, each example in a batch with probability 1 / b."""
    batches = max(1, math.ceil(n_examples / max(batch_size, 1)))
    return 1.0 / batches, local_epochs * batches


def train_round(model: ConversionModel, side: ItemSide, data: TrainingSet, *, lr: float, batch_size: int,
                local_epochs: int, dp: DPConfig, ledger: PrivacyLedger | None, rounds: int, seed: int,
                device: torch.device, proximal_mu: float = 0.0, negative_rate: float = 1.0,
                progress: Callable[[int, float], None] | None = None) -> RoundResult:
    """Train `model` in place for one federated round on one merchant's training set. Declines (trained False,
    with the reason) when the examples cannot be learned from (`learnable.label_problem`) or the budget is spent.
    `negative_rate` < 1 keeps each negative example with that probability (`data.subsample_negatives`): drawn
    anew each epoch without DP, once a round with DP (the accountant's sample rate is that of the examples kept,
    which over-states the chance of each example being used, so the ε reported stays an upper bound)."""
    problem = label_problem(data, len(side.numeric))
    if problem is not None:  # nothing to learn: decline before any privacy is spent
        return RoundResult(False, 0, float("nan"), 0, problem)
    params = model.trainable_parameters()
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if not dp.enabled:
        optimizer = torch.optim.Adam(params, lr=lr)
        optimizer.step = _with_after(optimizer.step, lambda: _proximal_step(params, anchor, lr, proximal_mu))
        losses, seen, steps = [], 0, 0
        for _ in range(local_epochs):
            epoch = subsample_negatives(data, negative_rate, rng)
            losses.append(train_epoch(model, side, epoch, optimizer, batch_size, rng, device, progress))
            seen += len(epoch)
            steps += math.ceil(len(epoch) / batch_size)
        return RoundResult(True, seen, float(np.mean(losses)), steps)
    return _train_private(model, side, data, subsample_negatives(data, negative_rate, rng), params, anchor, lr=lr,
                          batch_size=batch_size, local_epochs=local_epochs, dp=dp, ledger=ledger, rounds=rounds,
                          seed=seed, device=device, proximal_mu=proximal_mu, progress=progress)


def _with_after(step: Callable, after: Callable[[], None]) -> Callable:
    def wrapped(*args, **kwargs):
        out = step(*args, **kwargs)
        after()
        return out

    return wrapped


def _train_private(model, side, full, data, params, anchor, *, lr, batch_size, local_epochs, dp, ledger, rounds,
                   seed, device, proximal_mu, progress) -> RoundResult:
    """DP-SGD on `data` (the examples kept of the merchant's `full` training set, whose size sets δ)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    if ledger is None:
        raise ValueError("DP training needs the node's privacy ledger")
    refusal = delta_refusal(ledger.run_delta(dp, len(full)), len(full))
    if refusal:  # no guarantee at this δ: decline before any privacy is spent
        return RoundResult(False, 0, float("nan"), 0, refusal)
    sample_rate, steps = steps_per_round(len(data), batch_size, local_epochs)
    noise = ledger.plan(dp, sample_rate=sample_rate, steps_per_round=steps, rounds=rounds, n_examples=len(full))
    if not ledger.can_train(noise, sample_rate, steps, dp.target_epsilon):
        projected = ledger.projected_epsilon(noise, sample_rate, steps)
        return RoundResult(False, 0, float("nan"), 0,
                           f"privacy budget: another round would spend epsilon {projected:.3f} > dp.target-epsilon "
                           f"{dp.target_epsilon} (delta {ledger.delta:.2e}); already spent {ledger.epsilon():.3f}")
    private = PerSampleModel(model).to(device)
    model.train()
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9) if dp.optimizer == "sgd" else \
        torch.optim.Adam(params, lr=lr)
    loader = DataLoader(TensorDataset(torch.arange(len(data))), batch_size=batch_size,
                        generator=torch.Generator().manual_seed(seed))  # Opacus samples at 1 / len(loader)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    ledger.attach(engine)
    private, optimizer, criterion, loader = make_private(engine, private, optimizer, loader, noise=noise, dp=dp)
    total, seen, taken = 0.0, 0, 0
    for _ in range(local_epochs):
        for (rows,) in loader:
            if len(rows) == 0:  # an empty Poisson batch still releases a (pure-noise) step: account for it
                engine.accountant.step(noise_multiplier=noise, sample_rate=sample_rate)
                continue
            loss = private_step(private, model, side, data, rows.numpy(), optimizer, criterion, device)
            _proximal_step(params, anchor, lr, proximal_mu)
            total += loss * len(rows)
            seen += len(rows)
            taken += 1
            if progress:
                progress(len(rows), loss)
    ledger.sync_from(engine)
    private._close()  # drop Opacus hooks: the model is used again for evaluation and the next round
    del engine, private, optimizer, loader
    gc.collect()  # rebuilding Opacus state each round leaks memory without it
    return RoundResult(True, seen, total / max(seen, 1), taken)
