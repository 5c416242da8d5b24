"""Personalisation after push-back (`shared/training/personalise.py`): a node's local layers replace the global
model alone only where its own validation split rates them higher."""

from __future__ import annotations

import pytest
import torch

from fedcvr.client.node import MerchantNode, NodeSettings
from fedcvr.shared.data.loader import merchant_folders
from fedcvr.shared.data.signals import N_SIGNALS, PRIORS
from fedcvr.shared.metrics import merge_evaluations
from fedcvr.shared.model.weights import trainable_state
from fedcvr.shared.training import personalise as module
from fedcvr.shared.training.personalise import BLENDS, PersonaliseConfig, personalise
from fedcvr.shared.training.selection import (
    AUC_METRIC,
    BASKET_METRIC,
    Validation,
    selection_metric,
    validation_score,
)


def settings(tiny_bert, **overrides) -> NodeSettings:
    return NodeSettings.from_run_config({
        "model.encoder": str(tiny_bert), "model.dim": 8, "model.attention-hidden": 8, "model.head-hidden": 8,
        "model.max-text-tokens": 32, "examples.history-length": 8, "train.batch-size": 128, "dp.enabled": False,
        "personalise-head": True, **overrides})


@pytest.fixture
def node(tiny_market, tiny_bert):
    return MerchantNode(merchant_folders(tiny_market)[0], settings(tiny_bert))


def head_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.head.state_dict().items()}


@pytest.mark.parametrize("scores, units, kept", [((0.60, 0.55), 40, False), ((0.60, 0.60), 40, False),
                                                 ((0.55, 0.60), 40, True), ((None, 0.60), 40, False),
                                                 ((0.55, 0.60), 29, False)])  # fewer than min-validation (30)
def test_local_layers_are_kept_only_where_validation_rates_them_higher(node, monkeypatch, scores, units, kept):
    calls = iter(scores)
    monkeypatch.setattr(module, "validation_score", lambda *args: Validation(next(calls), units, {}))
    before = head_state(node.model)
    config = PersonaliseConfig.defaults(head=True, min_validation=30, blend=False)
    outcome = personalise(node.model, node.side, node.prepared, config, 128, 0, node.device)
    assert outcome.kept is kept and outcome.global_score == scores[0]
    assert outcome.local_score == (max(scores) if None not in scores else scores[1])
    assert (node.model.memory is not None) is kept
    same_head = all(torch.equal(before[k], v) for k, v in node.model.head.state_dict().items())
    assert same_head is not kept  # personalise-head: a dropped head is the global one again, exactly
    assert ("kept" if kept else "dropped") in outcome.describe() and f"over {units} units" in outcome.describe()
    assert ("too few" in outcome.describe()) is (units < 30)


@pytest.mark.parametrize("memory_helps, best_blend", [(False, "repeat x 1"), (True, "popular x 2"),
                                                      (True, ""), (False, "")])
def test_the_blend_is_chosen_on_validation(node, monkeypatch, memory_helps, best_blend):
    """personalise-blend: each prior of PRIORS at each weight of BLENDS is tried on top of the better of global and
    global + memory; the best strictly higher one is kept in the local memory and adds its score of the signals to
    the click logit."""
    def trials():
        return {f"{name} x {w:g}": w * torch.from_numpy(prior()) for name, prior in PRIORS.items() for w in BLENDS}

    def score(model, *args):
        if model.memory is None:
            return Validation(0.5, 100, {})
        memory_gain = 0.01 if memory_helps and bool(model.memory.table.weight.abs().sum() > 0) else 0.0
        hit = any(name == best_blend and torch.equal(model.memory.blend, w) for name, w in trials().items())
        return Validation(0.5 + memory_gain + (0.02 if hit else 0.0), 100, {})

    monkeypatch.setattr(module, "validation_score", score)
    before = head_state(node.model)
    config = PersonaliseConfig.defaults(head=True)
    outcome = personalise(node.model, node.side, node.prepared, config, 128, 0, node.device)
    assert BLENDS == (0.5, 1.0, 2.0) and set(PRIORS) == {"repeat", "popular"}
    assert outcome.kept is (memory_helps or best_blend != "") and outcome.blend == best_blend
    assert outcome.memory is memory_helps
    if not outcome.kept:
        assert node.model.memory is None and "dropped" in outcome.describe()
        return
    assert ("item memory" in outcome.describe()) is memory_helps
    assert (f"blend {best_blend}" in outcome.describe()) is (best_blend != "")
    same_head = all(torch.equal(before[k], v) for k, v in node.model.head.state_dict().items())
    assert same_head is not memory_helps  # without the memory, the global head and a zero table (= global)
    if not memory_helps:
        assert float(node.model.memory.table.weight.abs().sum()) == 0.0
    blend = trials().get(best_blend, torch.zeros(N_SIGNALS))
    signals = torch.rand(3, N_SIGNALS)
    torch.testing.assert_close(node.model.local_blend(signals), signals @ blend)


def test_without_select_the_local_layers_are_always_kept(node, monkeypatch):
    monkeypatch.setattr(module, "validation_score", lambda *args: pytest.fail("select = false reads no validation"))
    config = PersonaliseConfig.defaults(select=False)
    outcome = personalise(node.model, node.side, node.prepared, config, 128, 0, node.device)
    assert outcome.kept and node.model.memory is not None
    assert outcome.describe() == "local layers kept (personalise-select = false: validation not read)"


def test_the_node_serves_global_alone_where_local_does_not_help(node, monkeypatch):
    """A node whose validation rates global + local lower evaluates and saves the global model alone."""
    weights = trainable_state(node.model)
    monkeypatch.setattr(module, "validation_score",
                        lambda model, *args: Validation(0.5 if model.memory is None else 0.4, 100, {}))
    personal = node.evaluate(weights, "test", personalised=True)
    alone = node.evaluate(weights, "test")
    assert node.outcome is not None and not node.outcome.kept
    assert merge_evaluations([personal]) == pytest.approx(merge_evaluations([alone]))


def test_selection_metric_and_a_real_validation_score(node, tiny_purchase_market, tiny_bert):
    assert selection_metric(node.prepared) == AUC_METRIC  # impressions
    score = validation_score(node.model, node.side, node.prepared, node.device)
    assert score.value is not None and 0.0 <= score.value <= 1.0
    assert score.units == int(node.prepared.splits["validation"].purchased.sum()) > 0  # validation purchases
    shop = MerchantNode(merchant_folders(tiny_purchase_market)[0],
                        settings(tiny_bert, **{"examples.test-from": "2024-03-01"}))
    assert selection_metric(shop.prepared) == BASKET_METRIC  # purchase logs: the next basket
    score = validation_score(shop.model, shop.side, shop.prepared, shop.device)
    assert score.value is not None and 0.0 <= score.value <= 1.0
    assert score.units == len(shop.prepared.baskets["validation"]) > 0  # shoppers asked for a next basket


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="personalise-select = 'yes': expected true or false"):
        PersonaliseConfig.from_run_config({"personalise-select": "yes"})
    with pytest.raises(ValueError, match="personalise-min-validation = -1: must be 0 or more"):
        PersonaliseConfig.from_run_config({"personalise-min-validation": -1})
