"""`train.negative-rate`: each epoch keeps every positive and a share of the negatives, and the sampling rate is
corrected in the click logit (log_q), so the model's own click probability stays calibrated to the full data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedcvr.shared.model.config import TrainConfig
from fedcvr.shared.model.errors import ModelConfigError
from fedcvr.shared.model.esmm import esmm_loss
from fedcvr.shared.training.data import TrainingSet, subsample_negatives


def training_set(n: int, click_rate: float, purchase_given_click: float, seed: int = 0) -> TrainingSet:
    rng = np.random.default_rng(seed)
    clicked = (rng.random(n) < click_rate).astype(np.float32)
    purchased = clicked * (rng.random(n) < purchase_given_click).astype(np.float32)
    length = 3
    return TrainingSet(
        merchant=np.zeros(n, np.int32), user=np.arange(n, dtype=np.int64), item=rng.integers(0, 50, n),
        timestamp=np.arange(n, dtype=np.int64), slot=np.zeros(n, np.int64), clicked=clicked, purchased=purchased,
        history_item=np.full((n, length), -1, np.int64), history_event=np.full((n, length), -1, np.int64),
        history_age_hours=np.zeros((n, length), np.float32), true_p_click=np.full(n, np.nan, np.float32),
        true_p_purchase=np.full(n, np.nan, np.float32), signals=np.zeros((n, 2), np.float32),
        log_q=rng.normal(0, 0.1, n).astype(np.float32))


def test_every_positive_is_kept_a_share_of_negatives_and_log_q_carries_the_rate():
    data = training_set(40_000, 0.1, 0.3)
    kept = subsample_negatives(data, 0.25, np.random.default_rng(1))
    positives = data.clicked > 0
    assert kept.clicked.sum() == data.clicked.sum() and kept.purchased.sum() == data.purchased.sum()
    negatives = int((kept.clicked == 0).sum())
    assert abs(negatives / int((~positives).sum()) - 0.25) < 0.01
    rows = np.flatnonzero(positives | np.isin(data.user, kept.user))
    np.testing.assert_allclose(kept.log_q, data.log_q[rows] + math.log(0.25), rtol=0, atol=1e-6)
    assert subsample_negatives(data, 1.0, np.random.default_rng(1)) is data  # rate 1: nothing drawn, nothing changed


def _fit_bias(data: TrainingSet, correct: bool) -> tuple[float, float]:
    """The click and conversion biases a model with no features learns on `data` (ESMM loss, full batch)."""
    ctr, cvr = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([ctr, cvr], lr=0.5, max_iter=200)
    clicked, purchased = torch.from_numpy(data.clicked), torch.from_numpy(data.purchased)
    log_q = torch.from_numpy(data.log_q) if correct else None
    n = len(data)

    def closure():
        optimizer.zero_grad()
        loss = esmm_loss(ctr.expand(n), cvr.expand(n), clicked, purchased, log_q=log_q)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(torch.sigmoid(ctr.detach())), float(torch.sigmoid(cvr.detach()))


def test_the_correction_keeps_the_learned_click_and_conversion_rates_those_of_the_full_data():
    data = training_set(200_000, 0.05, 0.3, seed=2)
    data.log_q = np.zeros(len(data), np.float32)  # a data set without a sampler of its own
    full_ctr, full_cvr = _fit_bias(data, correct=True)
    kept = subsample_negatives(data, 0.2, np.random.default_rng(3))
    ctr, cvr = _fit_bias(kept, correct=True)
    raw_ctr, _ = _fit_bias(kept, correct=False)
    assert full_ctr == pytest.approx(data.clicked.mean(), rel=0.01)
    assert ctr == pytest.approx(full_ctr, rel=0.05) and cvr == pytest.approx(full_cvr, rel=0.05)
    assert raw_ctr > 3 * full_ctr  # without the correction: about 1 / 0.2 times the click rate


@pytest.mark.parametrize("rate", [0.0, -0.5, 1.5, float("nan")])
def test_a_bad_negative_rate_is_refused_with_the_key(rate):
    with pytest.raises(ModelConfigError, match="train.negative-rate"):
        TrainConfig.defaults(negative_rate=rate)
