"""Training examples: label attribution, strictly-earlier histories, implicit negatives, time split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import write_tables
from fedcvr.shared.data.contract import EVENT_TYPES
from fedcvr.shared.data.examples import ExampleConfig, build_examples, split_by_time
from fedcvr.shared.data.loader import load_merchant, merchant_folders

T0 = pd.Timestamp("2024-05-01T08:00:00")


def log(rows):
    """rows: (user, item, event, seconds after T0, session)."""
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event", "timestamp", "session_id"])
    frame["timestamp"] = (T0 + pd.to_timedelta(frame["timestamp"], unit="s")).dt.strftime("%Y-%m-%dT%H:%M:%S")
    return frame


def catalog(n=6):
    return pd.DataFrame({"item_id": [f"i{k}" for k in range(n)], "title": [f"item {k}" for k in range(n)]})


def examples_of(tmp_path, rows, **config):
    data = load_merchant(write_tables(tmp_path / "m", catalog(), log(rows)))
    return build_examples(data, ExampleConfig.defaults(**config))


def test_labels_follow_the_attribution_rules(tmp_path):
    day = 86_400
    ex = examples_of(tmp_path, [
        ("u1", "i0", "impression", 0, "s1"), ("u1", "i0", "click", 5, "s1"),            # clicked
        ("u1", "i1", "impression", 10, "s1"), ("u1", "i1", "click", 20, "s2"),          # other session: no
        ("u2", "i2", "impression", 0, "s3"), ("u2", "i2", "purchase", 60, "s3"),        # purchase => click
        ("u2", "i3", "impression", 0, "s4"), ("u2", "i3", "click", 2 * day, "s4"),      # outside 24 h window
        ("u3", "i4", "impression", 0, "s5"), ("u3", "i4", "impression", 30, "s5"),      # the click belongs
        ("u3", "i4", "click", 40, "s5"),                                                # to the 2nd impression
    ])
    got = {(ex.user_ids[u], ex.item_ids[i], int((t - T0.value) // 1e9)): (c, p)
           for u, i, t, c, p in zip(ex.user, ex.item, ex.timestamp, ex.clicked, ex.purchased)}
    assert got == {
        ("u1", "i0", 0): (1, 0), ("u1", "i1", 10): (0, 0), ("u2", "i2", 0): (1, 1), ("u2", "i3", 0): (0, 0),
        ("u3", "i4", 0): (0, 0), ("u3", "i4", 30): (1, 0),
    }
    assert not ex.implicit and len(ex) == 6


def test_history_is_strictly_before_and_most_recent_last(tmp_path):
    ex = examples_of(tmp_path, [
        ("u1", "i0", "click", 0, "s1"), ("u1", "i1", "cart", 10, "s1"), ("u1", "i2", "purchase", 20, "s1"),
        ("u1", "i3", "impression", 20, "s1"),   # same second as the purchase: not in its history
        ("u1", "i5", "impression", 30, "s1"), ("u1", "i4", "impression", 5, "s1"),
    ], history_length=2)
    by_item = {ex.item_ids[i]: k for k, i in enumerate(ex.item)}
    k = by_item["i3"]
    assert [ex.item_ids[i] for i in ex.history_item[k]] == ["i4", "i1"]
    assert [EVENT_TYPES[e] for e in ex.history_event[k]] == ["impression", "cart"]
    np.testing.assert_allclose(ex.history_age_hours[k], [15 / 3600, 10 / 3600], rtol=1e-5)
    k = by_item["i5"]
    assert [ex.item_ids[i] for i in ex.history_item[k]] == ["i2", "i3"]
    assert [EVENT_TYPES[e] for e in ex.history_event[k]] == ["purchase", "impression"]
    k = by_item["i4"]
    assert list(ex.history_item[k]) == [-1, 0] and list(ex.history_event[k]) == [-1, 1]
    assert ex.history_age_hours[k][0] == 0.0


def brute_force_history(events: pd.DataFrame, user: str, t: pd.Timestamp, length: int) -> list[str]:
    mine = events[(events.user_id == user) & (events.timestamp < t)]
    return list(mine.sort_values("timestamp", kind="stable").item_id.iloc[-length:])


def test_histories_match_a_brute_force_reading_of_the_log(tiny_market):
    data = load_merchant(merchant_folders(tiny_market)[0])
    ex = build_examples(data, ExampleConfig.defaults(history_length=5))
    rng = np.random.default_rng(0)
    with_history = np.flatnonzero(ex.history_item[:, -1] >= 0)
    picks = np.concatenate([rng.choice(len(ex), 40, replace=False), rng.choice(with_history, 40, replace=False)])
    for k in picks:
        expected = brute_force_history(data.events, ex.user_ids[ex.user[k]], pd.Timestamp(ex.timestamp[k]), 5)
        got = [ex.item_ids[i] for i in ex.history_item[k] if i >= 0]
        assert got == expected


def test_labels_match_the_synthetic_funnel(tiny_market):
    data = load_merchant(merchant_folders(tiny_market)[1])
    ex = build_examples(data)
    counts = data.events["event"].value_counts()
    assert len(ex) == counts["impression"]
    assert ex.clicked.sum() == counts["click"] and ex.purchased.sum() == counts["purchase"]
    assert np.all(ex.clicked >= ex.purchased)
    assert not np.isnan(ex.true_p_click).any() and np.all(ex.position >= 1)


def test_time_split_has_no_leakage(tiny_market):
    for folder in merchant_folders(tiny_market):
        ex = build_examples(load_merchant(folder))
        split = split_by_time(ex)
        assert len(split.train) + len(split.validation) + len(split.test) == len(ex)
        assert split.train.timestamp.max() < split.validation_start.value <= split.validation.timestamp.min()
        assert split.validation.timestamp.max() < split.test_start.value <= split.test.timestamp.min()
        hour_ns = 3_600e9
        for part in (split.train, split.validation, split.test):
            valid = part.history_item >= 0
            event_time = part.timestamp[:, None] - part.history_age_hours.astype(np.float64) * hour_ns
            assert np.all(part.history_age_hours[valid] > 0), "a history holds an event not strictly earlier"
            assert np.all(event_time[valid] < part.timestamp[:, None].repeat(valid.shape[1], 1)[valid])
        train_valid = split.train.history_item >= 0
        latest_train_history = (split.train.timestamp[:, None] - split.train.history_age_hours * 3_600e9)
        # float32 ages: allow a millisecond of rounding, far below the minutes between events
        assert np.all(latest_train_history[train_valid] < split.validation_start.value + 1e6)
        assert 0.75 < len(split.train) / len(ex) < 0.85


def test_implicit_examples_from_purchases_only(tmp_path):
    rows = [("u1", "i0", "purchase", 0, "o1"), ("u1", "i1", "purchase", 0, "o1"),
            ("u1", "i2", "purchase", 100, "o2"), ("u2", "i3", "purchase", 50, "o3")]
    ex = examples_of(tmp_path, rows, negatives=3, seed=5)
    assert ex.implicit
    positives = ex.clicked == 1
    assert positives.sum() == 4 and np.array_equal(ex.clicked, ex.purchased)
    assert len(ex) == 4 * (1 + 3)
    for u, i, t, label in zip(ex.user, ex.item, ex.timestamp, ex.clicked):
        if label == 0:
            same_basket = {(r[0], r[1]) for r in rows if r[3] == (t - T0.value) // 1e9 and r[0] == ex.user_ids[u]}
            assert (ex.user_ids[u], ex.item_ids[i]) not in same_basket
    # the order o1 (two items at t=0) is not in the history of the order o2, only strictly earlier events
    k = np.flatnonzero((ex.item_ids[ex.item] == "i2") & positives)[0]
    assert sorted(ex.item_ids[i] for i in ex.history_item[k] if i >= 0) == ["i0", "i1"]
    k = np.flatnonzero((ex.item_ids[ex.item] == "i0") & positives)[0]
    assert np.all(ex.history_item[k] == -1)


def test_implicit_examples_are_deterministic_for_a_seed(tmp_path):
    rows = [("u1", f"i{k % 6}", "purchase", 10 * k, f"o{k}") for k in range(12)]
    a = examples_of(tmp_path, rows, seed=1)
    b = build_examples(load_merchant(tmp_path / "m"), ExampleConfig.defaults(seed=1))
    c = build_examples(load_merchant(tmp_path / "m"), ExampleConfig.defaults(seed=2))
    assert np.array_equal(a.item, b.item) and not np.array_equal(a.item, c.item)


@pytest.mark.parametrize("kwargs, message", [
    ({"history_length": 0}, "examples.history-length must be >= 1"),
    ({"negatives": 0}, "examples.negatives must be >= 1"),
    ({"attribution_window_hours": 0}, "examples.attribution-window-hours must be > 0"),
    ({"validation_fraction": 0.6, "test_fraction": 0.5}, "must be < 1"),
    ({"test_fraction": 1.2}, "examples.test-fraction must be in"),
])
def test_example_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExampleConfig.defaults(**kwargs)
