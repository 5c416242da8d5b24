"""Each merchant alone: the baseline a federation must beat, above all for its small merchants.

`train_alone` gives one merchant exactly what it would do in the federation — the same initial weights (the
coordinator's, from `seed`), the same rounds of local training (`train_round`, with DP-SGD and the same privacy
budget when `dp.enabled`), the same seeds — but never averages with anyone. `compare` puts each merchant's test
metrics of its lone model next to those of a federated run's global model (`<run>/model`), evaluated on the same
test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import RecordDict

from fedcvr.client.node import MerchantNode, NodeSettings
from fedcvr.shared import metrics
from fedcvr.shared.evaluation import basket_metrics
from fedcvr.shared.evaluation.baselines import BaselineConfig
from fedcvr.shared.evaluation.next_basket import BaselineResult, baseline_record, run_baselines
from fedcvr.shared.metrics import merge_evaluations
from fedcvr.shared.model.esmm import initial_model
from fedcvr.shared.model.folder import load_model_folder
from fedcvr.shared.model.weights import trainable_state

COMPARED = ("ctcvr.auc", "ctcvr.gauc", "click.auc", "ndcg@10", "nb.all.ndcg@10")
"""The per-merchant columns of the comparison (ndcg@10 ranks each purchase; nb.all.ndcg@10 each next basket)."""


@dataclass
class MerchantComparison:
    """One merchant: its size and the test metrics of its lone model and of the federated model."""

    merchant: str
    train_examples: int
    test_purchases: int
    alone: dict[str, float]
    federated: dict[str, float]
    epsilon: float | None
    seconds: float
    alone_sums: dict = field(default_factory=dict)
    federated_sums: dict = field(default_factory=dict)
    baselines: list[BaselineResult] = field(default_factory=list)
    """Purchase logs: the merchant's own classic baselines (fitted on its purchases alone) on its next-basket test."""

    def to_json(self) -> dict[str, Any]:
        return {"merchant": self.merchant, "train_examples": self.train_examples,
                "test_purchases": self.test_purchases, "alone": self.alone, "federated": self.federated,
                "alone_epsilon": self.epsilon, "seconds": round(self.seconds, 1),
                "baselines": [baseline_record(b) for b in self.baselines]}


def initial_weights(run_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The coordinator's initial global weights for this run config (same seed, same model)."""
    model, _ = initial_model(NodeSettings.from_run_config(run_config).model, int(run_config.get("seed", 0)))
    return trainable_state(model)


def train_alone(node: MerchantNode, start: Mapping[str, torch.Tensor],
                on_round: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], float | None]:
    """All rounds of local training on the node's own data; returns the weights and ε spent (None without DP)."""
    weights, state, epsilon = dict(start), RecordDict(), None
    for server_round in range(1, node.settings.rounds + 1):
        new, report, _reason = node.train(weights, state, server_round)
        if new is None:  # declined (privacy budget): keep the last weights
            break
        weights = new
        epsilon = float(report["epsilon"]) if "epsilon" in report else None
        if on_round:
            on_round(server_round)
    return weights, epsilon


def test_metrics(node: MerchantNode, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Finalised test metrics of `weights` on the node's test split."""
    return merge_evaluations([node.evaluate(weights, "test")])


def local_baselines(node: MerchantNode, names: list[str], config: BaselineConfig) -> list[BaselineResult]:
    """The classic baselines a merchant could run alone: fitted on its own purchases, tuned on its validation."""
    s = node.settings
    return run_baselines(names, node.prepared, config, "local", node.backbone, s.model.max_text_tokens,
                         seed=s.train.seed)


def compare(folders: list[Path], run_config: Mapping[str, Any], federated_model: Path,
            on_merchant: Callable[[str], None] | None = None,
            on_round: Callable[[int], None] | None = None,
            baselines: list[str] | tuple[str, ...] = ()) -> list[MerchantComparison]:
    """Train each merchant alone and evaluate both its lone model and the federated model on its test split (and,
    on purchase logs, the merchant's own `baselines` on the same next-basket test)."""
    start = initial_weights(run_config)
    model, _, _ = load_model_folder(federated_model)
    federated = trainable_state(model)
    settings = NodeSettings.from_run_config(run_config)
    baseline_config = BaselineConfig.from_run_config(run_config)
    out = []
    for folder in folders:
        if on_merchant:
            on_merchant(folder.name)
        began = time.perf_counter()
        node = MerchantNode(folder, settings)
        alone, epsilon = train_alone(node, start, on_round)
        test = node.prepared.splits["test"]
        alone_sums, federated_sums = node.evaluate(alone, "test"), node.evaluate(federated, "test")
        out.append(MerchantComparison(folder.name, len(node.prepared.splits["train"]), int(test.purchased.sum()),
                                      merge_evaluations([alone_sums]), merge_evaluations([federated_sums]), epsilon,
                                      time.perf_counter() - began, alone_sums, federated_sums,
                                      local_baselines(node, list(baselines), baseline_config)))
    return out


def pooled_next_basket(results: list[MerchantComparison]) -> list[tuple[str, dict]]:
    """The next-basket metrics over every merchant's shoppers (sums added, then finalised): each merchant's lone
    model, the federated model and each baseline fitted by each merchant alone; [] for impression logs."""
    if not results or not any(k.startswith(f"{basket_metrics.PREFIX}.") for k in results[0].alone_sums):
        return []
    rows = [("model, each merchant alone", _merged([r.alone_sums for r in results])),
            ("federated model", _merged([r.federated_sums for r in results]))]
    for index, result in enumerate(results[0].baselines):
        sums: dict = {}
        for r in results:
            sums = basket_metrics.add(sums, r.baselines[index].sums)
        rows.append((f"{result.name} (each merchant alone)", basket_metrics.finalise(sums)))
    return rows


def _merged(records: list[dict]) -> dict:
    keep = [{k: v for k, v in r.items() if k.startswith(f"{basket_metrics.PREFIX}.")} for r in records]
    return basket_metrics.finalise(metrics.merge_all([metrics.MetricSums.from_record(r) for r in keep]).values)
