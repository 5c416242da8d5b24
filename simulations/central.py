"""Centralised training: the non-private upper bound that federated results are compared with.

Trains one conversion model on the union of the merchants' training splits, stops early on the validation
figure of `shared/training/selection.py` (CTCVR AUC, or next-basket NDCG@10 on purchase logs), then personalises
as nodes do (`shared/training/personalise.py`: a local item memory, kept where validation rates it higher), and
evaluates every split with the model ("model"), the model with its local layers ("model + local"), a popularity
baseline and (on synthetic data) the ground-truth oracle. On purchase logs the held-out splits are also ranked by
next basket (`shared/evaluation`), with the classic baselines fitted on the pooled purchases beside the model.

Popularity baseline: each item's click and purchase rates over the training impressions, smoothed towards the
overall rates with 10 pseudo-impressions: score_i = (events_i + 10 x overall rate) / (impressions_i + 10).
Oracle: the synthetic marketplace's `true_p_click` and `true_p_purchase` of each impression (no ranking metrics:
the oracle scores only shown items).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedcvr.shared import metrics, node_metrics
from fedcvr.shared.data.examples import ExampleConfig
from fedcvr.shared.data.loader import load_merchant
from fedcvr.shared.evaluation.baselines import BaselineConfig
from fedcvr.shared.evaluation.next_basket import BaselineResult, baseline_record, run_baselines
from fedcvr.shared.model.config import ModelConfig, TrainConfig
from fedcvr.shared.model.encoder import load_backbone
from fedcvr.shared.model.esmm import ConversionModel
from fedcvr.shared.model.folder import save_model_folder
from fedcvr.shared.model.prefix_cache import PrefixCache
from fedcvr.shared.model.weights import full_state, load_full_state
from fedcvr.shared.training.data import TrainingSet, subsample_negatives
from fedcvr.shared.training.learnable import refuse_unlearnable
from fedcvr.shared.training.loop import (
    ItemSide,
    embed_catalog,
    evaluation_sums,
    model_sums,
    resolve_device,
    train_epoch,
)
from fedcvr.shared.training.personalise import Outcome, PersonaliseConfig, personalise
from fedcvr.shared.training.prepare import SPLITS, Prepared, prepare, select_merchants
from fedcvr.shared.training.selection import AUC_METRIC, selection_metric, validation_score

SMOOTHING = 10.0
LOCAL = "model + local"
# Ranking every purchase against its merchant's whole catalog costs (purchases x catalog) scorings: on the training
# split that is most of an evaluation's time (48.6M of 60.9M pairs in Online Retail's six countries), for a figure
# nobody reads, so the final evaluation ranks the held-out splits only.
RANKED_SPLITS = ("validation", "test")


def popularity(train: TrainingSet, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed per-item click and click-and-purchase rates over the training impressions."""
    shown = np.bincount(train.item, minlength=n_items).astype(float)
    clicks = np.bincount(train.item, weights=train.clicked, minlength=n_items)
    buys = np.bincount(train.item, weights=train.purchased, minlength=n_items)
    ctr, ctcvr = clicks.sum() / max(shown.sum(), 1), buys.sum() / max(shown.sum(), 1)
    return (clicks + SMOOTHING * ctr) / (shown + SMOOTHING), (buys + SMOOTHING * ctcvr) / (shown + SMOOTHING)


def popularity_ranks(data: TrainingSet, ctcvr: np.ndarray, candidates: dict[int, np.ndarray]) -> np.ndarray:
    ranks = []
    for merchant in np.unique(data.merchant):
        pool = candidates[int(merchant)]
        rows = np.flatnonzero((data.merchant == merchant) & (data.purchased > 0))
        scores = np.broadcast_to(ctcvr[pool], (len(rows), len(pool)))
        ranks.append(node_metrics.rank_of(ctcvr[data.item[rows]], scores))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Learning rate of epoch 1..epochs: base x (1 + cos(pi (epoch - 1) / epochs)) / 2."""
    return base * 0.5 * (1.0 + np.cos(np.pi * (epoch - 1) / epochs))


@dataclass
class CentralResult:
    metrics: dict[str, dict[str, dict[str, float | None]]]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    baselines: list[BaselineResult] = field(default_factory=list)
    """Purchase logs: the classic baselines on the same next-basket test, fitted on the pooled data."""
    personalised: Outcome | None = None
    """What personalising did (None with personalise = false)."""


def evaluate_all(model: ConversionModel, side: ItemSide, prepared: Prepared, device: torch.device
                 ) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per split: finalised metrics of the model, the popularity baseline and (where known) the oracle; the
    full-catalog ranking metrics (NDCG@K, HR@K) only for the RANKED_SPLITS."""
    embeddings = embed_catalog(model, side, device)
    pop_ctr, pop_ctcvr = popularity(prepared.splits["train"], len(prepared.catalog))
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for name in SPLITS:
        data = prepared.splits[name]
        if len(data) == 0:
            continue
        rank = name in RANKED_SPLITS
        basket = prepared.baskets.get(name)
        out[name] = {"model": metrics.finalise(model_sums(model, side, data, prepared.candidates, prepared.logs, device,
                                                         embeddings, rank=rank, basket=basket))}
        # purchase logs rank by next basket, where the classic baselines (`run_baselines`) stand beside the model
        out[name]["popularity"] = metrics.finalise(evaluation_sums(
            data, pop_ctr[data.item], pop_ctcvr[data.item],
            popularity_ranks(data, pop_ctcvr, prepared.candidates) if rank and not prepared.implicit else None))
        if not np.isnan(data.true_p_click).any():
            out[name]["oracle"] = metrics.finalise(evaluation_sums(data, data.true_p_click, data.true_p_purchase,
                                                                   None))
    return out


def train_central(data_root: Path, out: Path, model_config: ModelConfig, train_config: TrainConfig,
                  example_config: ExampleConfig, merchants: list[str] | None = None, cache_root: Path | None = None,
                  baselines: tuple[str, ...] | list[str] = (), baseline_config: BaselineConfig | None = None,
                  personalise_config: PersonaliseConfig | None = None,
                  on_stage: Callable[[str], None] | None = None,
                  on_epoch_start: Callable[[int, int], Callable[[int, float], None] | None] | None = None,
                  on_epoch_end: Callable[[dict[str, float]], None] | None = None) -> CentralResult:
    """Train on the union of the merchants, save the model folder `out`, and return the evaluation.

    Callbacks report progress: `on_stage(text)`, `on_epoch_start(epoch, examples)` returning a per-step
    `progress(examples_done, loss)`, and `on_epoch_end(record)`."""
    started = time.perf_counter()
    say = on_stage or (lambda _text: None)
    torch.manual_seed(train_config.seed)
    rng = np.random.default_rng(train_config.seed)
    device = resolve_device(train_config.device, train_config.threads)
    say("loading the encoder")
    backbone = load_backbone(model_config.encoder)
    cache = PrefixCache(backbone, model_config.adapter_layers, model_config.max_text_tokens, cache_root)
    say("reading and validating merchant data")
    data = [load_merchant(folder) for folder in select_merchants(data_root, merchants)]
    prepared = prepare(data, example_config)
    refuse_unlearnable(prepared)
    say(f"encoding the frozen prefix of {len(prepared.catalog):,} items (cached in {cache.folder})")
    side = ItemSide(cache.states(prepared.catalog.texts), torch.from_numpy(prepared.catalog.numeric),
                    prepared.catalog.item_ids)
    model = ConversionModel(backbone, model_config).to(device)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=train_config.lr,
                                 weight_decay=train_config.weight_decay)
    result = CentralResult(metrics={})
    best, best_state, waited = -np.inf, full_state(model), 0
    for epoch in range(1, train_config.epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(train_config.lr, epoch, train_config.epochs)
        train = subsample_negatives(prepared.splits["train"], train_config.negative_rate, rng)
        progress = on_epoch_start(epoch, len(train)) if on_epoch_start else None
        loss = train_epoch(model, side, train, optimizer, train_config.batch_size, rng, device, progress)
        # early stopping: no full-catalog ranking each epoch, except the validation next baskets of purchase logs
        metric = selection_metric(prepared)
        validation = validation_score(model, side, prepared, device)
        score = validation.value
        record = {"epoch": epoch, "train_loss": loss, f"validation_{AUC_METRIC}": validation.metrics.get(AUC_METRIC),
                  "early_stop_metric": metric, f"validation_{metric}": score}
        result.history.append(record)
        if on_epoch_end:
            on_epoch_end(record)
        if score is None or score > best:
            best, best_state, waited, result.best_epoch = (score if score is not None else best), \
                full_state(model), 0, epoch
        else:
            waited += 1
            if waited > train_config.patience:
                say(f"early stop: validation {metric} has not improved for {waited} epoch(s)")
                break
    load_full_state(model, best_state)
    say("evaluating train, validation and test splits")
    result.metrics = evaluate_all(model, side, prepared, device)
    personalise_config = personalise_config or PersonaliseConfig.defaults()
    if personalise_config.enabled:
        say("personalising: a local item memory, kept where validation rates it higher")
        result.personalised = personalise(model, side, prepared, personalise_config, train_config.batch_size,
                                          train_config.seed, device)
        say(result.personalised.describe())
        # dropped: the model is exactly as it came, so are its figures
        local = evaluate_all(model, side, prepared, device) if result.personalised.kept else result.metrics
        for split, found in local.items():
            result.metrics[split][LOCAL] = dict(found["model"])
    if baselines and prepared.implicit:
        say(f"fitting the baselines on the pooled purchases before each cut: {', '.join(baselines)}")
        baseline_config = baseline_config or BaselineConfig.defaults()
        result.baselines = run_baselines(list(baselines), prepared, baseline_config, "pooled",
                                         backbone, model_config.max_text_tokens, cache_root, train_config.seed,
                                         say)
    result.seconds = time.perf_counter() - started
    settings = {"train": train_config.to_dict(), "examples": example_config.to_dict(), "merchants": prepared.names,
                "best_epoch": result.best_epoch,
                "personalised": None if result.personalised is None else result.personalised.describe()}
    save_model_folder(out, model, backbone, settings, {"splits": result.metrics, "history": result.history,
                                                       "seconds": result.seconds,
                                                       "baselines": [baseline_record(b) for b in result.baselines]})
    return result
