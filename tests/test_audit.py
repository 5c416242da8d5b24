"""The privacy audit: membership-inference attacks and a small audit of one merchant's training."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedcvr.simulations.audit import attack, audit_merchant, membership_auc, split_members, tpr_at_fpr


def test_membership_auc_is_the_roc_auc_with_ties_counted_half():
    rng = np.random.default_rng(0)
    members, others = rng.normal(0.3, 1, 500).round(1), rng.normal(0, 1, 700).round(1)  # rounding makes ties
    labels = np.r_[np.ones(500), np.zeros(700)]
    assert membership_auc(members, others) == pytest.approx(roc_auc_score(labels, np.r_[members, others]))
    assert membership_auc(np.ones(5), np.ones(5)) == 0.5


def test_tpr_at_1_percent_fpr():
    others = np.arange(1000, dtype=float)  # the threshold lets through 10 of them (990..999 > 989)
    members = np.array([995.0, 989.5, 10.0, 1e6])
    assert tpr_at_fpr(members, others) == 0.5
    assert tpr_at_fpr(others, others) <= 0.01


def test_members_and_non_members_are_disjoint_equal_halves():
    members, others = split_members(101, seed=3)
    assert len(members) == len(others) == 50 and not set(members) & set(others)
    assert set(split_members(101, seed=3)[0]) == set(members)  # seeded
    capped, rest = split_members(101, seed=3, max_members=20)
    assert len(capped) == len(rest) == 20


def test_attacks_find_members_whose_loss_dropped_and_not_otherwise():
    rng = np.random.default_rng(1)
    hardness = rng.exponential(1.0, 2000)  # how hard each example is, before any training
    reference_m, reference_o = hardness[:1000], hardness[1000:]
    leaky = attack(reference_m * 0.5, reference_o, reference_m, reference_o)  # trained examples: half the loss
    assert leaky["lr"]["auc"] > 0.99 and leaky["lr"]["tpr@1%fpr"] > 0.9
    assert 0.6 < leaky["loss"]["auc"] < leaky["lr"]["auc"]  # hardness hides members from the plain loss attack
    private = attack(reference_m, reference_o, reference_m, reference_o)  # training changed nothing
    assert private["lr"]["auc"] == 0.5 and abs(private["loss"]["auc"] - 0.5) < 0.05


def test_a_small_audit_of_one_merchant(tiny_market, tiny_bert):
    from test_flower_app import pyproject_run_config

    run_config = {**pyproject_run_config(), "model.encoder": str(tiny_bert), "model.dim": 8,
                  "model.attention-hidden": 8, "model.head-hidden": 8, "model.max-text-tokens": 32,
                  "examples.history-length": 8, "train.batch-size": 64, "num-server-rounds": 1,
                  "dp.target-epsilon": 1.0}
    result = audit_merchant(tiny_market / "merchant-01", run_config, seed=0, max_members=100)
    assert result.members == result.non_members == 100 and result.merchant == "merchant-01"
    assert 0 < result.epsilon <= 1.0 * 1.0001 and result.delta == 1e-5  # min(1 / (10 n), 1e-5)
    metrics = result.metrics()
    for name in ("loss", "lr"):
        assert 0 <= metrics[f"mia.{name}.auc"] <= 1 and 0 <= metrics[f"mia.{name}.tpr@1%fpr"] <= 1
        assert abs(metrics[f"mia.{name}.auc"] - 0.5) < 0.15  # 100 vs 100 examples: guessing, give or take noise


def test_the_report_section_reads_the_audit_against_the_noise_of_guessing():
    import pandas as pd

    from fedcvr.simulations.report_audit import audit_lines, audit_table, null_auc_std

    rows = []
    for eps, auc in ((None, 0.58), (8.0, 0.51), (1.0, 0.49)):
        for seed in (0, 1):
            values = {"mia.loss.auc": auc, "mia.loss.tpr@1%fpr": 0.02, "mia.lr.auc": auc + seed / 100,
                      "mia.lr.tpr@1%fpr": 0.03, "members": 400, "max-epsilon": eps}
            rows += [{"run_id": f"audit-{eps}-{seed}", "setting": "audit", "epsilon": eps, "seed": seed,
                      "split": "train", "merchant": "m1", "metric": k, "value": v} for k, v in values.items()
                     if v is not None]
            rows.append({"run_id": f"audit-{eps}-{seed}", "setting": "audit", "epsilon": eps, "seed": seed,
                         "split": "test", "merchant": "all", "metric": "wall-seconds", "value": 60.0})
    audits = audit_table(pd.DataFrame(rows))
    assert list(audits["ε"]) == ["no DP", "ε 8", "ε 1"] and set(audits["merchant"]) == {"m1"}
    assert list(audits["LR attack AUC"]) == pytest.approx([0.585, 0.515, 0.495])
    text = "\n".join(audit_lines(audits))
    assert "| ε 8 | m1 | 2 | 8.00 | 400 |" in text
    noise = 2 * null_auc_std(400, 400)
    assert noise == pytest.approx(2 * ((801 / (12 * 400 * 400)) ** 0.5)) and 0.04 < noise < 0.041
    assert "- no DP: the attack AUC farthest from 0.5 is 0.5850" in text and "above guessing, as expected" in text
    assert "- ε 1: the attack AUC farthest from 0.5 is 0.4900" in text and "within the noise of guessing, as DP" in text
