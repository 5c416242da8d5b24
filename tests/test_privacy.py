"""The per-node privacy ledger, checked against Opacus's own RDP accountant and PrivacyEngine."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from fedcvr.shared.dp_config import DPConfig, PrivacyConfigError, delta_for
from fedcvr.shared.privacy import PrivacyLedger, PrivacyLedgerError, dp_report, plan_noise

DELTA = 1e-5
RATE = 0.125  # batch 8 of 64 examples
STEPS = 16  # two epochs a round
NOISE = 2.0  # noise >= 2 keeps Opacus's RDP sums fast


def opacus_accountant(rounds: list[tuple[float, float, int]]) -> RDPAccountant:
    """An accountant that took every step one by one, as the DPOptimizer's hook makes it."""
    accountant = RDPAccountant()
    for noise, rate, steps in rounds:
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
    return accountant


# ---------------------------------------------------------------- ε against Opacus


def test_epsilon_matches_opacus_step_by_step_and_in_one_go():
    ledger = PrivacyLedger(delta=DELTA)
    assert ledger.epsilon() == 0.0
    rounds = [(NOISE, RATE, STEPS)] * 3
    for noise, rate, steps in rounds:
        ledger.record(noise, rate, steps)
    reference = opacus_accountant(rounds)
    # Same merged history as Opacus's step(): one entry when noise and rate stay the same.
    assert ledger.history == reference.history == [(NOISE, RATE, 3 * STEPS)]
    assert ledger.epsilon() == reference.get_epsilon(DELTA)
    one_go = RDPAccountant()
    one_go.history = [(NOISE, RATE, 3 * STEPS)]
    assert ledger.epsilon() == one_go.get_epsilon(DELTA)
    assert ledger.rounds_trained == 3


def test_epsilon_with_changing_noise_composes_like_opacus():
    rounds = [(NOISE, RATE, STEPS), (3.0, RATE, STEPS), (3.0, 0.25, 4), (NOISE, RATE, STEPS)]
    ledger = PrivacyLedger(delta=DELTA)
    for entry in rounds:
        ledger.record(*entry)
    reference = opacus_accountant(rounds)
    assert ledger.history == reference.history
    assert len(ledger.history) == 4
    assert ledger.epsilon() == pytest.approx(reference.get_epsilon(DELTA), rel=1e-12)
    # Accumulation is exact: the same steps with the same noise give the same ε however they are grouped.
    split = PrivacyLedger(delta=DELTA)
    for _ in range(3):
        split.record(NOISE, RATE, STEPS)
    whole = PrivacyLedger(delta=DELTA)
    whole.record(NOISE, RATE, 3 * STEPS)
    assert split.epsilon() == whole.epsilon()


def test_projected_epsilon_is_epsilon_after_recording():
    ledger = PrivacyLedger(delta=DELTA)
    ledger.record(NOISE, RATE, STEPS)
    projected = ledger.projected_epsilon(NOISE, RATE, STEPS)
    assert ledger.history == [(NOISE, RATE, STEPS)]  # projecting books nothing
    ledger.record(NOISE, RATE, STEPS)
    assert ledger.epsilon() == projected


# ---------------------------------------------------------------- planning


@pytest.mark.parametrize("target", [1.0, 2.0])
def test_plan_noise_meets_the_target_over_all_rounds(target):
    config = DPConfig.defaults(target_epsilon=target)
    rounds = 5
    noise = plan_noise(config, RATE, STEPS, rounds, DELTA)
    ledger = PrivacyLedger(noise_multiplier=noise, delta=DELTA)
    spent = [ledger.epsilon()]
    for _ in range(rounds):
        assert ledger.can_train(noise, RATE, STEPS, target)
        ledger.record(noise, RATE, STEPS)
        spent.append(ledger.epsilon())
    assert all(a < b for a, b in zip(spent, spent[1:]))
    assert spent[-1] <= target
    assert spent[-1] >= 0.99 * target
    assert spent[-1] == pytest.approx(opacus_accountant([(noise, RATE, rounds * STEPS)]).get_epsilon(DELTA))


def test_ledger_plan_fixes_noise_and_delta_for_the_run():
    ledger = PrivacyLedger()
    config = DPConfig.defaults(target_epsilon=1.0)
    noise = ledger.plan(config, sample_rate=RATE, steps_per_round=STEPS, rounds=3, n_examples=64)
    assert ledger.delta == delta_for(64)
    assert noise == plan_noise(config, RATE, STEPS, 3, delta_for(64))
    # A later round keeps the plan even if asked with other numbers.
    assert ledger.plan(config, sample_rate=0.5, steps_per_round=1, rounds=1, n_examples=10) == noise
    assert ledger.delta == delta_for(64)


def test_plan_noise_rejects_bad_inputs_and_unreachable_targets():
    config = DPConfig.defaults(target_epsilon=1.0)
    for rate in (0.0, 1.5, -0.1):
        with pytest.raises(PrivacyConfigError, match="sample rate"):
            plan_noise(config, rate, STEPS, 3, DELTA)
    with pytest.raises(PrivacyConfigError, match="steps = 0"):
        plan_noise(config, RATE, 0, 3, DELTA)
    with pytest.raises(PrivacyConfigError, match="rounds = 0"):
        plan_noise(config, RATE, STEPS, 0, DELTA)
    with pytest.raises(PrivacyConfigError, match="delta"):
        plan_noise(config, RATE, STEPS, 3, 0.0)
    with pytest.raises(PrivacyConfigError, match="dp.enabled"):
        plan_noise(DPConfig.defaults(enabled=False), RATE, STEPS, 3, DELTA)
    with pytest.raises(PrivacyConfigError, match="cannot be met.*raise dp.target-epsilon"):
        plan_noise(DPConfig.defaults(target_epsilon=1e-9), 1.0, 10**9, 10**3, DELTA)


# ---------------------------------------------------------------- the budget


def test_can_train_refuses_the_round_past_the_budget():
    config = DPConfig.defaults(target_epsilon=1.0)
    noise = plan_noise(config, RATE, STEPS, 3, DELTA)
    ledger = PrivacyLedger(noise_multiplier=noise, delta=DELTA)
    for _ in range(3):
        assert ledger.can_train(noise, RATE, STEPS, config.target_epsilon)
        ledger.record(noise, RATE, STEPS)
    assert not ledger.can_train(noise, RATE, STEPS, config.target_epsilon)
    assert ledger.can_train(noise, RATE, STEPS, 2 * config.target_epsilon)
    assert ledger.projected_epsilon(noise, RATE, STEPS) > config.target_epsilon


# ---------------------------------------------------------------- records and node state


def test_record_round_trip():
    ledger = PrivacyLedger(history=[(NOISE, RATE, 32), (3.0, 0.25, 4)], noise_multiplier=NOISE, delta=DELTA,
                           rounds_trained=3)
    record = ledger.to_record()
    assert isinstance(record, ConfigRecord)
    back = PrivacyLedger.from_record(record)
    assert back == ledger
    assert back.epsilon() == ledger.epsilon()
    # Through flwr's wire format too, as a deployed node's state travels.
    state = RecordDict()
    ledger.save(state)
    wire = recorddict_from_proto(recorddict_to_proto(state))
    assert PrivacyLedger.load(wire) == ledger


def test_fresh_state_gives_a_fresh_ledger_and_save_load_keeps_it():
    state = RecordDict()
    ledger = PrivacyLedger.load(state)
    assert ledger == PrivacyLedger()
    assert ledger.epsilon() == 0.0
    ledger.save(state, key="dp")
    assert PrivacyLedger.load(state, key="dp") == PrivacyLedger()
    ledger.delta = DELTA
    ledger.record(NOISE, RATE, STEPS)
    ledger.save(state, key="dp")
    again = PrivacyLedger.load(state, key="dp")
    again.record(NOISE, RATE, STEPS)
    again.save(state, key="dp")
    final = PrivacyLedger.load(state, key="dp")
    assert final.history == [(NOISE, RATE, 2 * STEPS)]
    assert final.rounds_trained == 2


@pytest.mark.parametrize(("change", "message"), [
    ({"steps": None}, "lacks steps"),
    ({"noise-multipliers": "2.0"}, "noise-multipliers = '2.0'"),
    ({"steps": [1.5, 2.0]}, "steps = \\[1.5, 2.0\\]"),
    ({"sample-rates": [0.1]}, "lengths 2, 1, 2"),
    ({"delta": -1.0}, "delta = -1.0"),
    ({"delta": 0.0}, "delta = 0.0 but the history is not empty"),
    ({"rounds-trained": -1}, "rounds-trained = -1"),
    ({"mechanism": "prv"}, "mechanism = 'prv'"),
    ({"sample-rates": [0.1, 2.0]}, "sample rate = 2.0"),
])
def test_malformed_record_names_the_key(change, message):
    record = dict(PrivacyLedger(history=[(NOISE, 0.1, 4), (3.0, 0.1, 4)], noise_multiplier=NOISE, delta=DELTA,
                                rounds_trained=2).to_record())
    for key, value in change.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    with pytest.raises(PrivacyLedgerError, match=message):
        PrivacyLedger.from_record(record)


def test_state_key_holding_something_else_is_an_error():
    state = RecordDict()
    state["privacy"] = MetricRecord({"x": 1.0})
    with pytest.raises(PrivacyLedgerError, match="context.state\\['privacy'\\] is a MetricRecord"):
        PrivacyLedger.load(state)


def test_recording_without_delta_is_an_error():
    with pytest.raises(PrivacyLedgerError, match="no δ"):
        PrivacyLedger().record(NOISE, RATE, STEPS)
    with pytest.raises(PrivacyLedgerError, match="sample rate = 0"):
        PrivacyLedger(delta=DELTA).record(NOISE, 0, STEPS)


# ---------------------------------------------------------------- a real PrivacyEngine

# Opacus's reminder about secure_mode, and torch's note that the inputs need no gradient: expected here.
secure_rng_off = pytest.mark.filterwarnings("ignore:Secure RNG turned off")
inputs_without_grad = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _private_training(engine: PrivacyEngine, noise: float, steps: int) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=noise, max_grad_norm=1.0, poisson_sampling=True)
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


@secure_rng_off
@inputs_without_grad
def test_attach_and_sync_with_a_real_privacy_engine():
    ledger = PrivacyLedger(noise_multiplier=NOISE, delta=DELTA)
    ledger.record(NOISE, RATE, STEPS)
    ledger.record(NOISE, RATE, STEPS)
    before = ledger.epsilon()
    engine = PrivacyEngine(accountant="rdp")
    ledger.attach(engine)
    assert engine.get_epsilon(DELTA) == before
    _private_training(engine, noise=NOISE, steps=4)
    assert ledger.sync_from(engine) == 4
    assert ledger.history == [(NOISE, RATE, 2 * STEPS + 4)]  # Opacus merged its steps into the attached entry
    assert ledger.epsilon() == engine.get_epsilon(DELTA)
    assert ledger.epsilon() > before
    assert ledger.rounds_trained == 3

    # Forgetting attach would drop the earlier rounds' spending: refused.
    forgotten = PrivacyEngine(accountant="rdp")
    _private_training(forgotten, noise=NOISE, steps=2)
    with pytest.raises(PrivacyLedgerError, match="call ledger.attach"):
        ledger.sync_from(forgotten)
    with pytest.raises(PrivacyLedgerError, match="already holds history"):
        ledger.attach(forgotten)


@secure_rng_off
def test_attach_refuses_a_non_rdp_engine():
    with pytest.raises(PrivacyLedgerError, match="accountant='rdp'"):
        PrivacyLedger(delta=DELTA).attach(PrivacyEngine(accountant="prv"))


# ---------------------------------------------------------------- config and report


def test_config_from_run_config_and_defaults():
    config = DPConfig.from_run_config({"dp.enabled": True, "dp.target-epsilon": 4, "dp.target-delta": 0,
                                       "dp.max-grad-norm": 0.5})
    assert config == DPConfig.defaults(target_epsilon=4.0, target_delta=None, max_grad_norm=0.5)
    assert DPConfig.from_run_config({}) == DPConfig.defaults()
    assert DPConfig.from_run_config({"dp.target-delta": 1e-6}).target_delta == 1e-6
    for n in (1, 64, 10_000):
        assert 0 < delta_for(n) < 1 / n
    with pytest.raises(PrivacyConfigError, match="n_examples = 0"):
        delta_for(0)


@pytest.mark.parametrize(("run_config", "message"), [
    ({"dp.target-epsilon": 0}, "dp.target-epsilon = 0.0: must be a number > 0"),
    ({"dp.target-epsilon": -2.5}, "dp.target-epsilon = -2.5"),
    ({"dp.target-epsilon": "eight"}, "dp.target-epsilon = 'eight': expected a number"),
    ({"dp.target-delta": 1.5}, "dp.target-delta = 1.5: must be between 0 and 1"),
    ({"dp.target-delta": -1e-5}, "dp.target-delta = -1e-05"),
    ({"dp.target-delta": "small"}, "dp.target-delta = 'small': expected a number"),
    ({"dp.max-grad-norm": 0.0}, "dp.max-grad-norm = 0.0: must be a number > 0"),
    ({"dp.enabled": "yes"}, "dp.enabled = 'yes': expected true or false"),
    ({"dp.optimizer": "rmsprop"}, "dp.optimizer = 'rmsprop': must be one of sgd, adam"),
    ({"dp.lr": -0.1}, "dp.lr = -0.1: must be a number >= 0"),
])
def test_config_errors_name_the_key_and_value(run_config, message):
    with pytest.raises(PrivacyConfigError, match=message):
        DPConfig.from_run_config(run_config)


def test_config_collects_every_problem():
    with pytest.raises(PrivacyConfigError) as info:
        DPConfig.defaults(target_epsilon=0.0, max_grad_norm=-1.0, accountant="prv")
    assert all(key in str(info.value) for key in ("dp.target-epsilon", "dp.max-grad-norm", "accountant"))


def test_dp_report_is_numbers_only():
    ledger = PrivacyLedger(noise_multiplier=NOISE, delta=DELTA)
    ledger.record(NOISE, RATE, STEPS)
    report = dp_report(ledger, DPConfig.defaults(target_epsilon=8.0))
    assert report == {"epsilon": ledger.epsilon(), "delta": DELTA, "target_epsilon": 8.0, "noise_multiplier": NOISE,
                      "rounds_trained": 1}
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in report.values())
    MetricRecord(report)  # accepted as metrics
    assert math.isinf(dp_report(ledger, DPConfig.defaults(enabled=False))["epsilon"])
    fresh = dp_report(PrivacyLedger(), DPConfig.defaults(target_delta=1e-6))
    assert fresh["epsilon"] == 0.0 and fresh["delta"] == 1e-6 and fresh["rounds_trained"] == 0
