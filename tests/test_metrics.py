"""The mergeable metrics: checked against scikit-learn, against hand values, and merged over random partitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from fedcvr.shared.metrics import (
    AUC_BINS,
    METRIC_FORMULAS,
    MetricSums,
    combine,
    finalise,
    formula_for,
    merge,
    merge_all,
)
from fedcvr.shared.node_metrics import prediction_sums, rank_of, ranking_sums

AUC_TOLERANCE = 2e-3


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _esmm_like(n: int, seed: int, users: int = 500) -> dict[str, np.ndarray]:
    """Impressions with a ~6% click rate and ~1% purchase rate, scored by a decent but noisy model."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    ctr_logit = -3.0 + 0.8 * signal
    cvr_logit = -2.2 + 0.5 * signal + 0.6 * rng.normal(size=n)
    click = rng.random(n) < _sigmoid(ctr_logit)
    purchase = click & (rng.random(n) < _sigmoid(cvr_logit))
    p_ctr = _sigmoid(ctr_logit + 0.3 * rng.normal(size=n))
    p_cvr = _sigmoid(cvr_logit + 0.3 * rng.normal(size=n))
    return {
        "labels_click": click.astype(int),
        "labels_purchase": purchase.astype(int),
        "p_ctr": p_ctr,
        "p_ctcvr": p_ctr * p_cvr,
        "users": rng.integers(0, users, n),
    }


def _single_task(y, p, users=None) -> dict[str, float | None]:
    """Sums for one (label, score) pair, read back under click.*."""
    y, p = np.asarray(y), np.asarray(p)
    users = np.zeros(len(y), dtype=int) if users is None else users
    return finalise(prediction_sums(y, y, p, p, users))


# ---------------------------------------------------------------- against scikit-learn

@pytest.mark.parametrize("seed", range(3))
def test_auc_matches_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 2000)
    p = np.clip(rng.random(2000) * 0.6 + 0.4 * y * rng.random(2000), 0, 1)
    assert abs(_single_task(y, p)["click.auc"] - roc_auc_score(y, p)) < AUC_TOLERANCE


@pytest.mark.parametrize("round_to", [None, 4])
def test_metrics_match_sklearn_on_realistic_skewed_data(round_to):
    data = _esmm_like(50_000, seed=7)
    if round_to is not None:  # scores served at 4 decimals: many exact ties
        data["p_ctcvr"] = np.round(data["p_ctcvr"], round_to)
    metrics = finalise(prediction_sums(**data))
    for task, label, score in (("click", "labels_click", "p_ctr"), ("ctcvr", "labels_purchase", "p_ctcvr")):
        y, p = data[label], data[score]
        assert abs(metrics[f"{task}.auc"] - roc_auc_score(y, p)) < AUC_TOLERANCE
        assert metrics[f"{task}.logloss"] == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), rel=1e-9)
        assert metrics[f"{task}.calibration"] == pytest.approx(p.sum() / y.sum(), rel=1e-12)
        assert metrics[f"{task}.n"] == len(y) and metrics[f"{task}.positives"] == int(y.sum())
    assert 0 < metrics["ctcvr.positives"] < metrics["click.positives"]


def test_gauc_matches_a_direct_per_user_sklearn_computation():
    data = _esmm_like(6000, seed=3, users=300)
    data["p_ctr"] = np.round(data["p_ctr"], 2)  # ties inside users, averaged by both sides
    metrics = finalise(prediction_sums(**data))
    y, p, users = data["labels_click"], data["p_ctr"], data["users"]
    weighted = weight = counted = 0
    for user in np.unique(users):
        mine = users == user
        if 0 < y[mine].sum() < mine.sum():
            weighted += mine.sum() * roc_auc_score(y[mine], p[mine])
            weight += mine.sum()
            counted += 1
    assert counted > 50
    assert metrics["click.gauc"] == pytest.approx(weighted / weight, rel=1e-12)
    assert metrics["click.gauc_users"] == counted


def test_gauc_accepts_string_ids_and_skips_users_with_one_class():
    y = [1, 0, 0, 1, 1, 0, 0]
    p = [0.9, 0.2, 0.95, 0.1, 0.3, 0.3, 0.5]
    users = ["ann", "ann", "ann", "bob", "cid", "cid", "dan"]
    metrics = _single_task(y, p, np.array(users))
    # ann: AUC 1/2 over 3 impressions; bob only positives, dan only negatives; cid: a tie, AUC 1/2 over 2.
    assert metrics["click.gauc"] == pytest.approx((3 * 0.5 + 2 * 0.5) / 5)
    assert metrics["click.gauc_users"] == 2


# ---------------------------------------------------------------- by hand

def test_ece_calibration_and_logloss_by_hand():
    y = [0, 0, 1, 1, 1, 0]
    p = [0.05, 0.15, 0.12, 0.55, 0.95, 1.0]
    metrics = _single_task(y, p)
    # ECE bins: [0, .1): {.05 | 0}; [.1, .2): {.15, .12 | 0, 1}; [.5, .6): {.55 | 1}; [.9, 1]: {.95, 1.0 | 1, 0}
    expected_ece = (1 / 6) * 0.05 + (2 / 6) * abs(0.135 - 0.5) + (1 / 6) * 0.45 + (2 / 6) * abs(0.975 - 0.5)
    assert metrics["click.ece"] == pytest.approx(expected_ece)
    assert metrics["click.ece"] == pytest.approx(2.18 / 6)
    assert metrics["click.calibration"] == pytest.approx(2.82 / 3)
    losses = [-math.log(0.95), -math.log(0.85), -math.log(0.12), -math.log(0.55), -math.log(0.95), -math.log(1e-7)]
    assert metrics["click.logloss"] == pytest.approx(sum(losses) / 6)
    assert metrics["click.auc"] == pytest.approx(roc_auc_score(y, p))


def test_hit_rate_and_ndcg_by_hand():
    metrics = finalise(ranking_sums([1, 3, 12, 60]))
    assert metrics["hr@10"] == 0.5
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / 2) / 4)
    assert metrics["hr@50"] == 0.75
    assert metrics["ndcg@50"] == pytest.approx((1 + 1 / 2 + 1 / math.log2(13)) / 4)
    assert metrics["rank.n"] == 4
    assert not any(key.startswith("click.") for key in metrics)


def test_rank_of_counts_only_strictly_higher_scores():
    catalog = np.array([[0.9, 0.5, 0.5, 0.1]] * 4 + [[0.3, 0.3, 0.3, 0.3]])
    targets = [0.5, 0.9, 0.05, 0.1, 0.3]
    assert rank_of(targets, catalog).tolist() == [2, 1, 5, 4, 1]


def test_rank_of_feeds_ranking_sums():
    rng = np.random.default_rng(0)
    scores = rng.random((30, 200))
    bought = rng.integers(0, 200, 30)
    ranks = rank_of(scores[np.arange(30), bought], scores)
    expected = [1 + int(np.sum(row > row[i])) for row, i in zip(scores, bought)]
    assert ranks.tolist() == expected
    assert finalise(ranking_sums(ranks, ks=(20,)))["hr@20"] == pytest.approx(np.mean(ranks <= 20))


# ---------------------------------------------------------------- merging

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), parts=st.integers(1, 5), n=st.integers(0, 300))
def test_merged_partition_equals_the_whole(seed, parts, n):
    """Users are local to a merchant, so partition by user; merging the parts' sums gives the whole's metrics."""
    data = _esmm_like(n, seed=seed, users=40)
    node_of_user = np.random.default_rng(seed).integers(0, parts, 40)
    nodes = node_of_user[data["users"]]
    pieces = [prediction_sums(**{k: v[nodes == i] for k, v in data.items()}) for i in range(parts)]
    via_records = [MetricSums.from_record(piece.to_record()) for piece in pieces]
    whole = finalise(prediction_sums(**data))
    for merged in (finalise(merge_all(pieces)), finalise(merge_all(via_records))):
        assert merged.keys() == whole.keys()
        for key, value in whole.items():
            if key.endswith((".n", ".positives", ".gauc_users")):
                assert merged[key] == value, key
            elif value is None:
                assert merged[key] is None, key
            else:
                assert merged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@settings(max_examples=30, deadline=None)
@given(ranks=st.lists(st.integers(1, 100), max_size=50), cut=st.integers(0, 50))
def test_merged_ranking_sums_equal_the_whole(ranks, cut):
    merged = finalise(merge(ranking_sums(ranks[:cut]), ranking_sums(ranks[cut:])))
    whole = finalise(ranking_sums(ranks))
    assert merged["rank.n"] == whole["rank.n"] == len(ranks)
    for key in ("hr@10", "ndcg@10", "hr@50", "ndcg@50"):
        assert merged[key] == pytest.approx(whole[key]) if ranks else merged[key] is None


def test_record_round_trip_through_a_flower_metric_record():
    from flwr.app import MetricRecord

    sums = combine(prediction_sums(**_esmm_like(300, seed=1)), ranking_sums([1, 7, 80]))
    received = MetricRecord.inflate(MetricRecord(sums.to_record()).deflate())
    restored = MetricSums.from_record(received)
    assert isinstance(restored["click.auc_pos"], np.ndarray) and restored["click.auc_pos"].dtype == np.int64
    assert len(restored["click.auc_pos"]) == AUC_BINS
    assert finalise(restored) == finalise(sums)


def test_merge_names_the_key_whose_shapes_differ():
    data = _esmm_like(100, seed=2)
    with pytest.raises(ValueError, match=r"'click\.auc_pos' has shape \(4096,\) .* \(8192,\)"):
        merge(prediction_sums(**data, bins=4096), prediction_sums(**data, bins=8192))


def test_merge_names_the_keys_one_side_lacks():
    with pytest.raises(ValueError, match=r"only in the first: \['rank\.hr@20', 'rank\.ndcg@20'\]"):
        merge(ranking_sums([1], ks=(10, 20)), ranking_sums([1], ks=(10,)))
    with pytest.raises(ValueError, match="different keys"):
        merge_all([ranking_sums([1]), prediction_sums([1], [0], [0.5], [0.1], [0])])
    assert len(merge_all([])) == 0


def test_combine_refuses_shared_keys():
    with pytest.raises(ValueError, match=r"share keys \['rank\.hr@10'"):
        combine(ranking_sums([1]), ranking_sums([2]))


def test_from_record_rejects_non_numbers():
    with pytest.raises(TypeError, match="'click.n' is 'many'"):
        MetricSums.from_record({"click.n": "many"})


def test_finalise_names_a_missing_key():
    values = dict(prediction_sums([1, 0], [0, 0], [0.6, 0.2], [0.1, 0.1], [0, 0]).values)
    del values["ctcvr.p_sum"]
    with pytest.raises(ValueError, match="lack 'ctcvr.p_sum'"):
        finalise(MetricSums(values))


# ---------------------------------------------------------------- edge cases and input checks

def test_without_positives_auc_gauc_and_calibration_are_none():
    metrics = finalise(prediction_sums([0, 0, 0], [0, 0, 0], [0.1, 0.2, 0.3], [0.01, 0.02, 0.03], [1, 1, 2]))
    for task in ("click", "ctcvr"):
        assert metrics[f"{task}.auc"] is None
        assert metrics[f"{task}.gauc"] is None
        assert metrics[f"{task}.calibration"] is None
        assert metrics[f"{task}.logloss"] > 0 and metrics[f"{task}.ece"] > 0
    assert metrics["ctcvr.ece"] == pytest.approx(0.02)


def test_empty_input_gives_zero_counts_and_no_ratios():
    metrics = finalise(prediction_sums([], [], [], [], []))
    assert metrics["click.n"] == 0 and metrics["ctcvr.positives"] == 0
    assert all(metrics[f"{t}.{m}"] is None for t in ("click", "ctcvr")
               for m in ("auc", "gauc", "logloss", "calibration", "ece"))
    ranking = finalise(ranking_sums([]))
    assert ranking["rank.n"] == 0 and ranking["hr@10"] is None and ranking["ndcg@50"] is None


def test_extreme_scores_land_in_the_end_bins():
    y = [0, 1, 0, 1]
    p = [0.0, 1.0, 1e-12, 1 - 1e-12]
    assert _single_task(y, p)["click.auc"] == pytest.approx(roc_auc_score(y, p))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels_click": [0, 2, 1]}, "labels_click must hold 0/1 labels, found 2"),
        ({"p_ctr": [0.1, 1.5, 0.2]}, "p_ctr must hold probabilities in \\[0, 1\\], found 1.5"),
        ({"p_ctcvr": [0.1, float("nan"), 0.2]}, "p_ctcvr must hold probabilities"),
        ({"users": [1, 2]}, "users has 2 entries but the other inputs have 3"),
        ({"labels_purchase": [[0, 1, 0]]}, r"labels_purchase must be 1-D"),
    ],
)
def test_bad_inputs_are_named(change, message):
    good = {"labels_click": [0, 1, 1], "labels_purchase": [0, 0, 1], "p_ctr": [0.1, 0.5, 0.6],
            "p_ctcvr": [0.01, 0.05, 0.1], "users": [1, 1, 2]}
    with pytest.raises(ValueError, match=message):
        prediction_sums(**{**good, **change})


@pytest.mark.parametrize(("ranks", "ks"), [([0, 3], (10,)), ([1.5], (10,)), ([1], (0,)), ([1], (10, 10))])
def test_bad_ranks_or_cutoffs_are_refused(ranks, ks):
    with pytest.raises(ValueError):
        ranking_sums(ranks, ks=ks)


def test_rank_of_refuses_mismatched_shapes_and_nan():
    with pytest.raises(ValueError, match=r"shape \(P, I\) = \(2, I\)"):
        rank_of([0.1, 0.2], np.zeros((3, 5)))
    with pytest.raises(ValueError, match="finite"):
        rank_of([float("nan")], np.zeros((1, 5)))


def test_every_finalised_metric_has_a_formula():
    sums = combine(prediction_sums(**_esmm_like(200, seed=5)), ranking_sums([2, 30]))
    for name in finalise(sums):
        assert formula_for(name)
    assert "10" in formula_for("hr@10") and formula_for("ctcvr.auc") == METRIC_FORMULAS["auc"]
    with pytest.raises(KeyError):
        formula_for("click.mystery")
