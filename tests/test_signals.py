"""The shop's signals of a (shopper, item) pair (`data/signals.py`): exact counts, and no example sees its future."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import purchase_log
from fedcvr.shared.data.contract import EVENT_TYPES
from fedcvr.shared.data.examples import ExampleConfig, build_examples, event_codes
from fedcvr.shared.data.loader import load_merchant
from fedcvr.shared.data.signals import N_PAIR, N_SIGNALS, NO_AGE, WINDOWS_DAYS, EventLog, repeat_prior, unseen_pair

HOUR = 3_600 * 1_000_000_000
DAY = 24 * HOUR


def brute_force(u, i, e, t, qu, qi, qt) -> np.ndarray:
    """The module doc's definition, one query at a time."""
    out = []
    for e_type in range(len(EVENT_TYPES)):
        mine = (u == qu) & (i == qi) & (e == e_type) & (t < qt)
        count = int(mine.sum())
        out += [float(count > 0), np.log1p(count) / 4,
                np.log1p((qt - t[mine].max()) / HOUR) / 10 if count else NO_AGE]
    for name in ("click", "purchase"):
        for days in WINDOWS_DAYS:
            out.append(np.log1p(((i == qi) & (e == EVENT_TYPES.index(name)) & (t < qt) & (t >= qt - days * DAY)).sum())
                       / 4)
    out.append(np.log1p(((e == EVENT_TYPES.index("purchase")) & (t < qt) & (t >= qt - 30 * DAY)).sum()) / 4)
    return np.asarray(out, np.float32)


def test_signals_equal_their_definition_query_by_query():
    rng = np.random.default_rng(0)
    n = 2_000
    u, i, e = rng.integers(0, 20, n), rng.integers(0, 30, n), rng.integers(0, 4, n)
    t = rng.integers(0, 500, n) * DAY // 3  # many events share a time: "before" must be strict
    log = EventLog.build(u, i, e, t)
    qu, qi = rng.integers(0, 22, 300), rng.integers(-1, 33, 300)  # unknown shoppers and items too
    qt = np.concatenate([rng.integers(0, 520, 299) * DAY // 3, [t[0]]])
    got = log.signals(qu, qi, qt)
    assert got.shape == (300, N_SIGNALS)
    for q in range(300):
        np.testing.assert_allclose(got[q], brute_force(u, i, e, t, qu[q], qi[q], qt[q]), atol=1e-5)
    grid = log.grid(qu[:3], qi[:4], qt[:3])  # every (shopper, item) pair: shopper s at its own time
    assert grid.shape == (3, 4, N_SIGNALS)
    np.testing.assert_array_equal(grid[1, 2], log.signals(qu[1:2], qi[2:3], qt[1:2])[0])


def test_an_item_never_touched_has_the_unseen_pair_signals():
    log = EventLog.build(np.array([0]), np.array([1]), np.array([3]), np.array([10 * DAY]))
    np.testing.assert_array_equal(log.pair_signals(np.array([0]), np.array([2]), np.array([11 * DAY]))[0],
                                  unseen_pair())
    bought = log.pair_signals(np.array([0]), np.array([1]), np.array([11 * DAY]))[0]
    assert bought[9] == 1 and bought[10] == pytest.approx(np.log1p(1) / 4)  # purchase: seen, count 1


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    return load_merchant(purchase_log(tmp_path_factory.mktemp("signals"), seed=3))


def test_no_example_sees_its_own_future(shop):
    """Each example's signals equal those from a log cut at the example's own time: events at or after it,
    later purchases included, change nothing."""
    examples = build_examples(shop, ExampleConfig.defaults(negatives=3))
    codes, _ = event_codes(shop)
    rows = np.random.default_rng(1).choice(len(examples), 60, replace=False)
    for row in rows:
        t = examples.timestamp[row]
        past = codes["t"] < t
        log = EventLog.build(codes["user"][past], codes["item"][past], codes["event"][past], codes["t"][past])
        expected = log.signals(examples.user[row:row + 1], examples.item[row:row + 1], examples.timestamp[row:row + 1])
        np.testing.assert_allclose(examples.signals[row], expected[0], atol=1e-6)


def test_a_positive_does_not_count_its_own_purchase(shop):
    examples = build_examples(shop, ExampleConfig.defaults(negatives=1))
    positives = examples.purchased == 1
    purchase_seen = examples.signals[:, 9]
    first = pd.DataFrame({"u": examples.user, "i": examples.item, "t": examples.timestamp})[positives]
    earliest = first.groupby(["u", "i"])["t"].transform("min").to_numpy() == first["t"].to_numpy()
    assert (purchase_seen[positives][earliest] == 0).all()  # a first purchase of the item: not seen before


def test_popular_negatives_come_from_earlier_purchases(shop):
    """With examples.popular-negatives = 1, a negative of a purchase at t is an item sold before t (a first
    purchase in the log, with nothing before it, draws uniformly)."""
    examples = build_examples(shop, ExampleConfig.defaults(negatives=4, popular_negatives=1.0, history_negatives=0.0))
    codes, _ = event_codes(shop)
    buy = codes["event"] == EVENT_TYPES.index("purchase")
    first_sale = pd.Series(codes["t"][buy]).groupby(codes["item"][buy]).min()
    negatives = examples.purchased == 0
    sold_before = first_sale.reindex(examples.item[negatives]).to_numpy() < examples.timestamp[negatives]
    has_past = examples.timestamp[negatives] > codes["t"][buy].min()
    assert sold_before[has_past].all()
    uniform = build_examples(shop, ExampleConfig.defaults(negatives=4, popular_negatives=0.0, history_negatives=0.0))
    # drawn by past sales, negatives are items that sell: more of them were bought before than uniform ones
    never = ~np.isin(np.arange(len(shop.items)), codes["item"][buy])
    assert never[uniform.item[uniform.purchased == 0]].mean() > never[examples.item[negatives]].mean()


def test_history_negatives_come_from_the_shoppers_own_past(shop):
    """With examples.history-negatives = 1, a negative of u's purchase at t is an item u bought before t and not in
    this basket (a shopper's first purchase, with nothing before it, draws uniformly)."""
    examples = build_examples(shop, ExampleConfig.defaults(negatives=4, popular_negatives=0.0, history_negatives=1.0))
    codes, _ = event_codes(shop)
    buy = codes["event"] == EVENT_TYPES.index("purchase")
    bought = pd.DataFrame({"user": codes["user"][buy], "item": codes["item"][buy], "t": codes["t"][buy]})
    first = bought.groupby(["user", "item"])["t"].min()
    neg = pd.DataFrame({"user": examples.user, "item": examples.item, "t": examples.timestamp})[examples.purchased == 0]
    has_past = neg["t"].to_numpy() > bought.groupby("user")["t"].min().reindex(neg["user"]).to_numpy()
    own_first = first.reindex(pd.MultiIndex.from_frame(neg[["user", "item"]])).to_numpy()
    assert has_past.any()
    assert (own_first[has_past] < neg["t"].to_numpy()[has_past]).all()  # bought by u strictly before t
    basket = set(zip(bought["user"], bought["t"], bought["item"]))
    assert not any((u, t, i) in basket for u, i, t in neg[["user", "item", "t"]].itertuples(index=False))


def test_negative_shares_are_validated():
    with pytest.raises(ValueError, match="history-negatives"):
        ExampleConfig.defaults(popular_negatives=0.8, history_negatives=0.3)


def test_signal_columns_are_bounded():
    rng = np.random.default_rng(2)
    n = 5_000
    log = EventLog.build(rng.integers(0, 5, n), rng.integers(0, 3, n), rng.integers(0, 4, n),
                         np.sort(rng.integers(0, 30, n)) * HOUR)
    got = log.signals(rng.integers(0, 5, 100), rng.integers(0, 3, 100), np.full(100, 40 * HOUR))
    assert np.isfinite(got).all() and got.min() >= 0 and got.max() < 4
    assert got[:, :N_PAIR].max() <= max(NO_AGE, np.log1p(n) / 4)


def test_log_q_is_the_samplers_own_probability(shop):
    """log_q = log(I Q(i | u, t)) with Q the mixture of `data/negatives.py`, checked example by example; 0 for
    uniform negatives. The draws follow it: history negatives are own past items, at the rate Q gives."""
    config = ExampleConfig.defaults(negatives=4, popular_negatives=0.3, history_negatives=0.4)
    examples = build_examples(shop, config)
    codes, _ = event_codes(shop)
    buy = codes["event"] == EVENT_TYPES.index("purchase")
    bought = pd.DataFrame({"user": codes["user"][buy], "item": codes["item"][buy], "t": codes["t"][buy]}
                          ).drop_duplicates()
    n_items = len(examples.item_ids)
    rng = np.random.default_rng(0)
    for row in rng.choice(len(examples), 200, replace=False):
        u, i, t = examples.user[row], examples.item[row], examples.timestamp[row]
        mine, shop_before = bought[(bought.user == u) & (bought.t < t)], bought[bought.t < t]
        h = 0.4 if len(mine) else 0.0
        p = 0.3 if len(shop_before) else 0.0
        q = (h * (mine.item == i).mean() if len(mine) else 0.0) + (
            p * (shop_before.item == i).mean() if len(shop_before) else 0.0) + (1 - h - p) / n_items
        assert np.isclose(examples.log_q[row], np.log(max(n_items * q, 0.01)), atol=1e-4)
    assert examples.log_q.max() > 1  # a shopper's favourite is drawn far more often than uniformly
    uniform = build_examples(shop, ExampleConfig.defaults(negatives=4, popular_negatives=0.0, history_negatives=0.0))
    assert (uniform.log_q == 0).all()


def test_repeat_prior_ranks_own_purchases_by_count_then_carts_then_best_sellers():
    """The head's signal path starts from `repeat_prior`: on one shopper's candidates it orders what the shopper
    bought (most often first), then what they carted, then the shop's 30-day best sellers."""
    buy, cart = EVENT_TYPES.index("purchase"), EVENT_TYPES.index("cart")
    events = [(0, 1, buy)] * 3 + [(0, 2, buy), (0, 3, cart)] + [(s, 4, buy) for s in range(1, 21)] + \
        [(1, 5, buy), (2, 5, buy)]
    u, i, e = (np.array(col) for col in zip(*events))
    log = EventLog.build(u, i, e, np.arange(len(events)) * HOUR + 100 * DAY)
    candidates = np.array([6, 5, 4, 3, 2, 1])
    scores = log.grid(np.array([0]), candidates, np.array([102 * DAY]))[0] @ repeat_prior()
    assert list(candidates[np.argsort(-scores, kind="stable")]) == [1, 2, 3, 4, 5, 6]
