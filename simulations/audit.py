"""Privacy audit: a membership-inference attack on one merchant's local training.

DP-SGD promises that no single training example changes the model much; an attacker who sees the model and one
example should then not tell whether that example was trained on. The audit measures it:

1. The merchant's training split is shuffled (seeded) and cut in two halves: members (trained on, at most
   `max_members`) and as many non-members (held out, from the same split, so the two differ only in membership).
2. The model is trained on the members exactly as the merchant trains alone (`local_only.train_alone`: the
   run config's rounds, local epochs, learning rate and, with ε, DP-SGD with that budget), from the
   coordinator's initial weights.
3. Each example's loss is computed under the trained model and under the initial (reference) model:
   loss = BCE(pCTR, clicked) + BCE(pCTCVR, purchased), the ESMM training loss.
4. Two attacks score every example (higher = "member"):
   - loss threshold (Yeom et al., 2018): score = -loss_trained;
   - likelihood ratio against a reference model (shadow-model-free; difficulty calibration as in Watson et al.,
     2022): score = loss_reference - loss_trained = log p_trained(labels) - log p_reference(labels), which removes
     how hard an example is anyway.
   Each is reported as AUC (members vs non-members; 0.5 = guessing) and TPR at 1% FPR (the share of members
   caught when the threshold lets through 1% of non-members; 0.01 = guessing).
Expectation: close to 0.5 (and 0.01) with DP; above them without DP when the model memorises its examples.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ATTACKS = ("loss", "lr")
FPR = 0.01


@dataclass
class AuditResult:
    merchant: str
    members: int
    non_members: int
    epsilon: float | None  # ε spent (None without DP)
    delta: float | None
    attacks: dict[str, dict[str, float]]  # attack -> {"auc", "tpr@1%fpr"}
    seconds: float

    def metrics(self) -> dict[str, float | None]:
        """Flat metrics for the experiment table: mia.<attack>.auc, mia.<attack>.tpr@1%fpr, members, ..."""
        out: dict[str, float | None] = {"members": self.members, "non-members": self.non_members,
                                        "max-epsilon": self.epsilon, "delta": self.delta}
        for attack, values in self.attacks.items():
            for key, value in values.items():
                out[f"mia.{attack}.{key}"] = value
        return out


def split_members(n: int, seed: int, max_members: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint row sets (members, non-members) of equal size from n rows: a seeded shuffle cut in two halves,
    each at most `max_members` (0 = no cap)."""
    order = np.random.default_rng(seed).permutation(n)
    half = n // 2 if not max_members else min(n // 2, max_members)
    return np.sort(order[:half]), np.sort(order[half:2 * half])


def membership_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted half (Mann-Whitney U / n m)."""
    from fedcvr.shared.node_metrics import auc

    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    return float(auc(labels, np.concatenate([members, non_members])))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float = FPR) -> float:
    """Share of members scored above the threshold that at most `fpr` of the non-members exceed."""
    threshold = np.quantile(non_members, 1.0 - fpr, method="higher")
    return float(np.mean(members > threshold))


def example_losses(node: Any, weights: Mapping[str, Any], data: Any) -> np.ndarray:
    """The ESMM loss of every example of `data` under `weights` on the node's model."""
    from fedcvr.shared.training.loop import embed_catalog, predict

    node.load(weights)
    embeddings = embed_catalog(node.model, node.side, node.device)
    p_ctr, p_ctcvr = predict(node.model, embeddings, data, node.device)
    eps = 1e-7
    p_ctr = np.clip(p_ctr.astype(np.float64), eps, 1 - eps)
    p_ctcvr = np.clip(p_ctcvr.astype(np.float64), eps, 1 - eps)
    clicked, purchased = data.clicked.astype(np.float64), data.purchased.astype(np.float64)
    return -(clicked * np.log(p_ctr) + (1 - clicked) * np.log(1 - p_ctr)
             + purchased * np.log(p_ctcvr) + (1 - purchased) * np.log(1 - p_ctcvr))


def attack(members_trained: np.ndarray, others_trained: np.ndarray, members_reference: np.ndarray,
           others_reference: np.ndarray) -> dict[str, dict[str, float]]:
    """Both attacks' AUC and TPR at 1% FPR from the examples' losses under the trained and reference models."""
    scores = {"loss": (-members_trained, -others_trained),
              "lr": (members_reference - members_trained, others_reference - others_trained)}
    return {name: {"auc": membership_auc(m, o), "tpr@1%fpr": tpr_at_fpr(m, o)} for name, (m, o) in scores.items()}


def audit_merchant(folder: Path, run_config: Mapping[str, Any], seed: int = 0, max_members: int = 0) -> AuditResult:
    """Train on half of the merchant's training split and attack (see the module's description)."""
    from fedcvr.client.node import MerchantNode, NodeSettings
    from fedcvr.simulations.experiment import merchant_delta
    from fedcvr.simulations.local_only import initial_weights, train_alone

    started = time.perf_counter()
    settings = NodeSettings.from_run_config(run_config)
    node = MerchantNode(Path(folder), settings)
    train = node.prepared.splits["train"]
    member_rows, other_rows = split_members(len(train), seed, max_members)
    if len(member_rows) < 10:
        raise ValueError(f"{folder}: {len(train)} training examples leave {len(member_rows)} members for the "
                         "audit; pick a merchant with at least 20 training examples")
    members, others = train.subset(member_rows), train.subset(other_rows)
    node.prepared.splits["train"] = members  # the node trains on the members only
    start = initial_weights(run_config)
    trained, epsilon = train_alone(node, start)
    result = attack(example_losses(node, trained, members), example_losses(node, trained, others),
                    example_losses(node, start, members), example_losses(node, start, others))
    return AuditResult(Path(folder).name, len(member_rows), len(other_rows), epsilon,
                       merchant_delta(settings, len(member_rows)), result, time.perf_counter() - started)
