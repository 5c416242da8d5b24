"""A merchant's local round: DP-SGD with a ledger across rounds, the budget refusal, FedProx, no-DP."""

from __future__ import annotations

import pytest
import torch

from fedcvr.shared.data.examples import ExampleConfig
from fedcvr.shared.data.loader import load_merchant, merchant_folders
from fedcvr.shared.dp_config import DPConfig
from fedcvr.shared.model.config import ModelConfig
from fedcvr.shared.model.encoder import load_backbone
from fedcvr.shared.model.esmm import ConversionModel
from fedcvr.shared.model.prefix_cache import PrefixCache
from fedcvr.shared.model.weights import trainable_state
from fedcvr.shared.privacy import PrivacyLedger
from fedcvr.shared.training.local import PerSampleModel, _private_inputs, train_round
from fedcvr.shared.training.loop import ItemSide
from fedcvr.shared.training.prepare import prepare


@pytest.fixture(scope="module")
def merchant(tiny_market):
    return prepare([load_merchant(merchant_folders(tiny_market)[2])], ExampleConfig.defaults(history_length=8))


def setup(tiny_bert, merchant, layers):
    backbone = load_backbone(str(tiny_bert))
    config = ModelConfig.defaults(encoder=str(tiny_bert), adapter_layers=layers, dim=8, attention_hidden=8,
                                  head_hidden=8)
    side = ItemSide(PrefixCache(backbone, layers, 32).states(merchant.catalog.texts),
                    torch.from_numpy(merchant.catalog.numeric))
    torch.manual_seed(0)
    return ConversionModel(backbone, config), side


@pytest.mark.parametrize(("layers", "optimizer"), [(0, "adam"), (1, "adam"), (0, "sgd")])
def test_dp_rounds_accumulate_epsilon_until_the_budget_refuses(tiny_bert, merchant, layers, optimizer):
    model, side = setup(tiny_bert, merchant, layers)
    train = merchant.splits["train"]
    dp = DPConfig.defaults(target_epsilon=4.0, optimizer=optimizer)
    lr = 0.5 if optimizer == "sgd" else 0.01
    ledger = PrivacyLedger()
    spent = []
    for round_number in range(2):
        before = trainable_state(model)
        result = train_round(model, side, train, lr=lr, batch_size=64, local_epochs=1, dp=dp, ledger=ledger,
                             rounds=2, seed=round_number, device=torch.device("cpu"))
        assert result.trained and result.steps > 0 and result.examples > 0
        assert any(not torch.equal(a, b) for a, b in zip(before.values(), trainable_state(model).values()))
        spent.append(ledger.epsilon())
    assert 0 < spent[0] < spent[1] <= dp.target_epsilon * 1.0001
    assert ledger.rounds_trained == 2 and ledger.delta < 1 / len(train)
    declined = train_round(model, side, train, lr=0.01, batch_size=64, local_epochs=1, dp=dp, ledger=ledger,
                           rounds=2, seed=9, device=torch.device("cpu"))
    assert not declined.trained and "privacy budget" in declined.reason and ledger.epsilon() == spent[1]


def test_private_inputs_are_sample_first(tiny_bert, merchant):
    model, side = setup(tiny_bert, merchant, 0)
    rows = torch.arange(5).numpy()
    inputs = _private_inputs(model, side, merchant.splits["train"], rows, torch.device("cpu"))
    assert all(t.shape[0] == 5 for t in inputs)
    ctr, cvr = PerSampleModel(model)(*inputs)
    assert ctr.shape == cvr.shape == (5,)


def test_without_dp_and_with_fedprox_pull(tiny_bert, merchant):
    model, side = setup(tiny_bert, merchant, 0)
    start = trainable_state(model)
    result = train_round(model, side, merchant.splits["train"], lr=0.01, batch_size=64, local_epochs=1,
                         dp=DPConfig.defaults(enabled=False), ledger=None, rounds=1, seed=0, device=torch.device("cpu"))
    free = sum(float((a - b).norm()) for a, b in zip(trainable_state(model).values(), start.values()))
    assert result.trained and free > 0
    model2, _ = setup(tiny_bert, merchant, 0)
    train_round(model2, side, merchant.splits["train"], lr=0.01, batch_size=64, local_epochs=1,
                dp=DPConfig.defaults(enabled=False), ledger=None, rounds=1, seed=0, device=torch.device("cpu"),
                proximal_mu=5.0)
    pulled = sum(float((a - b).norm()) for a, b in zip(trainable_state(model2).values(), start.values()))
    assert pulled < free, "the proximal term keeps the local model nearer the global one"


def test_dp_rounds_use_dp_lr():
    from fedcvr.client.node import NodeSettings

    assert NodeSettings.from_run_config({"train.lr": 0.01, "dp.lr": 0.8}).lr == 0.8
    assert NodeSettings.from_run_config({"train.lr": 0.01, "dp.lr": 0.0}).lr == 0.01
    assert NodeSettings.from_run_config({"train.lr": 0.01, "dp.enabled": False, "dp.lr": 0.8}).lr == 0.01


@pytest.mark.parametrize("layers", [0, 1])
def test_ghost_clipping_trains_as_per_sample_gradients_do(tiny_bert, merchant, layers):
    """dp.grad-sample-mode: ghost clipping and stored per-sample gradients clip every example to the same norm
    and draw the same noise, so a DP round from the same weights and seed ends at the same weights."""
    ends = []
    for mode in ("hooks", "ghost"):
        model, side = setup(tiny_bert, merchant, layers)
        result = train_round(model, side, merchant.splits["train"], lr=0.5, batch_size=64, local_epochs=1,
                             dp=DPConfig.defaults(target_epsilon=4.0, grad_sample_mode=mode), ledger=PrivacyLedger(),
                             rounds=2, seed=3, device=torch.device("cpu"))
        assert result.trained and result.steps > 1
        ends.append(trainable_state(model))
    start = trainable_state(setup(tiny_bert, merchant, layers)[0])
    moved = max(float((ends[0][k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-2  # the round did train
    for key in ends[0]:
        torch.testing.assert_close(ends[1][key], ends[0][key], atol=1e-4, rtol=1e-4)


def test_grad_sample_mode_is_checked():
    from fedcvr.shared.dp_config import PrivacyConfigError

    with pytest.raises(PrivacyConfigError, match="dp.grad-sample-mode = 'functorch': must be one of ghost, hooks"):
        DPConfig.from_run_config({"dp.grad-sample-mode": "functorch"})


@pytest.mark.parametrize("dp_on", [False, True])
def test_a_round_with_negative_subsampling_trains_on_every_positive_and_fewer_examples(tiny_bert, merchant, dp_on):
    model, side = setup(tiny_bert, merchant, 0)
    train = merchant.splits["train"]
    dp = DPConfig.defaults(target_epsilon=4.0) if dp_on else DPConfig.defaults(enabled=False)
    ledger = PrivacyLedger() if dp_on else None
    result = train_round(model, side, train, lr=0.01, batch_size=64, local_epochs=1, dp=dp, ledger=ledger, rounds=2,
                         seed=0, device=torch.device("cpu"), negative_rate=0.3)
    positives, negatives = int((train.clicked > 0).sum()), int((train.clicked == 0).sum())
    assert result.trained
    if not dp_on:  # every kept example once
        assert positives < result.examples < positives + 0.5 * negatives
    else:  # Poisson batches over the kept examples; δ still counts every training example
        assert 0 < result.examples < positives + 0.5 * negatives and ledger.delta < 1 / len(train)
