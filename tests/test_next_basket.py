"""Next-basket evaluation: the tasks at a date cut, the per-shopper metrics against hand values, the tie order,
the mergeable sums and their bootstrap intervals, and the `examples.test-from` cut that places them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from conftest import write_tables
from fedcvr.shared import metrics
from fedcvr.shared.data.contract import EVENT_TYPES
from fedcvr.shared.data.examples import ExampleConfig, build_examples, parse_test_from, split_by_time
from fedcvr.shared.data.loader import load_merchant
from fedcvr.shared.data.signals import EventLog
from fedcvr.shared.evaluation import basket_metrics as bm
from fedcvr.shared.evaluation.baselines import BaselineConfig
from fedcvr.shared.evaluation.baskets import build_task
from fedcvr.shared.evaluation.next_basket import baseline_sums, ranking_sums
from fedcvr.shared.training.data import Catalog
from fedcvr.shared.training.prepare import prepare

T0 = pd.Timestamp("2024-05-01T08:00:00")
DAY_NS = 86_400 * 1_000_000_000
CUT = (T0 + pd.Timedelta(days=10)).value
END = (T0 + pd.Timedelta(days=20)).value
CLICK, CART, PURCHASE = (EVENT_TYPES.index(e) for e in ("click", "cart", "purchase"))

# (user, item, event, days after T0, session)
LOG = [
    ("u1", "i0", "purchase", 1, "s1"), ("u1", "i1", "click", 2, "s2"), ("u1", "i2", "purchase", 9.5, "s3"),
    # u1's first basket after the cut is the session s4: i3 and i4 at day 11, i0 an hour later in the same session
    ("u1", "i3", "purchase", 11, "s4"), ("u1", "i4", "purchase", 11, "s4"),
    ("u1", "i0", "purchase", 11 + 1 / 24, "s4"), ("u1", "i5", "purchase", 12, "s5"),
    ("u2", "i1", "purchase", 11, "s6"),                                          # nothing before the cut
    ("u3", "i2", "click", 3, "s7"), ("u3", "i3", "cart", 11, "s7"),              # no purchase after the cut
    ("u4", "i1", "purchase", 5, "s8"), ("u4", "i2", "purchase", 25, "s9"),       # next purchase after the end
    ("u5", "i4", "click", 9, "s10"), ("u5", "i4", "purchase", 10, "s11"),        # a purchase AT the cut counts
    ("u6", "i5", "purchase", 4, "s12"), ("u6", "i1", "purchase", 12, "a1"), ("u6", "i2", "purchase", 11, "z1"),
    ("u7", "i0", "click", 10, "s13"), ("u7", "i1", "purchase", 11, "s13"),       # its first event is AT the cut
]


def log_frame(rows, sessions: bool = True) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event", "days", "session_id"])
    frame["timestamp"] = (T0 + pd.to_timedelta(frame.pop("days"), unit="D")).dt.strftime("%Y-%m-%dT%H:%M:%S")
    return frame if sessions else frame.drop(columns="session_id")


def items(ids) -> pd.DataFrame:
    return pd.DataFrame({"item_id": list(ids), "title": [f"item {i}" for i in ids]})


def merchant(tmp_path, rows=LOG, sessions: bool = True, name: str = "m"):
    return load_merchant(write_tables(tmp_path / name, items([f"i{k}" for k in range(6)]),
                                      log_frame(rows, sessions)))


def catalog_with_others() -> Catalog:
    """A catalog whose rows differ from the merchant's own item order: x0 0, i3 1, x1 2, i0 3, i1 4, i2 5, i4 6,
    i5 7."""
    return Catalog.from_items([items(["x0", "i3", "x1"]), items([f"i{k}" for k in range(6)])])


ROW = {"i0": 3, "i1": 4, "i2": 5, "i3": 1, "i4": 6, "i5": 7}


def rows_of(*names) -> list[int]:
    return sorted(ROW[n] for n in names)


# ---------------------------------------------------------------- tasks

def test_task_shoppers_relevant_basket_and_bought_before(tmp_path):
    task = build_task(merchant(tmp_path), catalog_with_others(), 2, 100, CUT, END, history_length=2)
    # shoppers: sorted user ids u1..u7 are 0..6, offset by 100; u2 and u7 (no event strictly before the cut),
    # u3 (no purchase after) and u4 (next purchase after the end) are not asked
    assert task.shopper.tolist() == [100, 104, 105]
    assert task.merchant.tolist() == [2, 2, 2] and task.cut.tolist() == [CUT] * 3
    assert [r.tolist() for r in task.relevant] == [rows_of("i0", "i3", "i4"), rows_of("i4"), rows_of("i2")]
    assert [b.tolist() for b in task.bought] == [rows_of("i0", "i2"), [], rows_of("i5")]
    # every purchase of every shopper, tested or not, is kept; those strictly before the cut (u5's at the cut is
    # not) are what a baseline's fit at this cut sees
    p = task.purchases
    assert len(p) == int((merchant(tmp_path).events["event"] == "purchase").sum())
    p = p.subset(p.t < CUT)
    got = sorted(zip(p.user.tolist(), p.item.tolist(), ((p.t - T0.value) / DAY_NS).tolist(), p.merchant.tolist()))
    assert got == sorted([(100, ROW["i0"], 1.0, 2), (100, ROW["i2"], 9.5, 2), (103, ROW["i1"], 5.0, 2),
                          (105, ROW["i5"], 4.0, 2)])

    # without an end (the test task), u4's purchase at day 25 makes it a shopper
    open_ended = build_task(merchant(tmp_path), catalog_with_others(), 0, 0, CUT, None, history_length=2)
    assert open_ended.shopper.tolist() == [0, 3, 4, 5]
    assert open_ended.relevant[1].tolist() == rows_of("i2") and open_ended.bought[1].tolist() == rows_of("i1")


def test_without_session_ids_a_basket_is_one_timestamp(tmp_path):
    task = build_task(merchant(tmp_path, sessions=False), catalog_with_others(), 0, 0, CUT, END, 2)
    # u1's i0 an hour after i3 and i4 is another basket now
    assert task.shopper.tolist() == [0, 4, 5]
    assert task.relevant[0].tolist() == rows_of("i3", "i4")
    # a session id missing on one purchase: the whole log falls back to timestamps
    rows = [r if r[:2] != ("u1", "i0") or r[3] < 10 else (*r[:4], None) for r in LOG]
    partial = build_task(merchant(tmp_path, rows, name="partial"), catalog_with_others(), 0, 0, CUT, END, 2)
    assert partial.relevant[0].tolist() == rows_of("i3", "i4")


def test_first_basket_is_the_earliest_not_the_first_session_seen(tmp_path):
    # u6's session q began before the cut (day 4) and goes on at day 12; its session r at day 11 is the first
    # basket after the cut
    rows = [r for r in LOG if r[0] != "u6"] + [("u6", "i5", "purchase", 4, "q"), ("u6", "i1", "purchase", 12, "q"),
                                               ("u6", "i2", "purchase", 11, "r"), ("u6", "i3", "purchase", 11, "r")]
    task = build_task(merchant(tmp_path, rows), catalog_with_others(), 0, 0, CUT, END, 2)
    assert task.relevant[list(task.shopper).index(5)].tolist() == rows_of("i2", "i3")


def test_history_at_the_cut_is_the_last_events_strictly_before_it(tmp_path):
    data = merchant(tmp_path)
    task = build_task(data, catalog_with_others(), 0, 0, CUT, END, history_length=2)
    # u1: the click on i1 (day 2) and the purchase of i2 (day 9.5), oldest first, in catalog rows
    assert task.history_item[0].tolist() == [ROW["i1"], ROW["i2"]]
    assert task.history_event[0].tolist() == [CLICK, PURCHASE]
    np.testing.assert_allclose(task.history_age_hours[0], [8 * 24, 12], rtol=1e-6)
    # u5: one click before the cut; its purchase AT the cut is not history
    assert task.history_item[1].tolist() == [-1, ROW["i4"]] and task.history_event[1].tolist() == [-1, CLICK]
    assert task.history_age_hours[1].tolist() == [0.0, 24.0]
    # against a brute-force reading of the log, for a longer history
    long = build_task(data, catalog_with_others(), 0, 0, CUT, END, history_length=4)
    users = np.array(sorted(data.events["user_id"].unique()), dtype=object)
    for s, shopper in enumerate(long.shopper):
        mine = data.events[(data.events.user_id == users[shopper]) & (data.events.timestamp < pd.Timestamp(CUT))]
        last = mine.sort_values("timestamp", kind="stable").tail(4)
        want = [ROW[i] for i in last.item_id]
        assert long.history_item[s].tolist() == [-1] * (4 - len(want)) + want
        assert long.history_event[s].tolist()[4 - len(want):] == [EVENT_TYPES.index(e) for e in last.event]


def random_log(seed: int, users: int = 40, sessions: int = 6) -> list[tuple]:
    """Each user's sessions follow one another (session k spans days 5k .. 5k + 2); a session holds clicks and
    purchases at distinct times."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for k in range(rng.integers(1, sessions + 1)):
            start = 5 * k + rng.random()
            for j in range(rng.integers(1, 5)):
                event = "purchase" if rng.random() < 0.7 else "click"
                rows.append((f"u{u:02d}", f"i{rng.integers(0, 6)}", event, start + j / 10 + rng.random() / 100,
                             f"s{u}-{k}"))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_task_matches_a_brute_force_reading_of_a_random_log(tmp_path, seed):
    data = merchant(tmp_path, random_log(seed))
    cut, end = (T0 + pd.Timedelta(days=12)).value, (T0 + pd.Timedelta(days=22)).value
    task = build_task(data, catalog_with_others(), 0, 0, cut, end, history_length=3)
    events = data.events
    users = np.array(sorted(events["user_id"].unique()), dtype=object)
    expected = {}
    for code, user in enumerate(users):
        mine = events[events.user_id == user]
        buys = mine[mine.event == "purchase"]
        after = buys[(buys.timestamp >= pd.Timestamp(cut)) & (buys.timestamp < pd.Timestamp(end))]
        if not (mine.timestamp < pd.Timestamp(cut)).any() or after.empty:
            continue
        first_session = after.sort_values("timestamp").session_id.iloc[0]
        expected[code] = (rows_of(*set(after[after.session_id == first_session].item_id)),
                          rows_of(*set(buys[buys.timestamp < pd.Timestamp(cut)].item_id)))
    assert len(expected) > 10
    assert task.shopper.tolist() == sorted(expected)
    assert [(r.tolist(), b.tolist()) for r, b in zip(task.relevant, task.bought)] == \
        [expected[int(u)] for u in task.shopper]


def test_a_cut_without_shoppers_gives_an_empty_task(tmp_path):
    late = (T0 + pd.Timedelta(days=400)).value
    task = build_task(merchant(tmp_path), catalog_with_others(), 0, 0, late, None, 3)
    assert len(task) == 0 and task.history_item.shape == (0, 3)
    assert len(task.purchases) == sum(r[2] == "purchase" for r in LOG)  # every purchase of the log is before it
    sums = ranking_sums(task, {0: np.arange(8)}, lambda t, pool: np.zeros((len(t), len(pool))))
    assert sums["nb.all.n"] == 0 and bm.finalise(sums)["nb.all.ndcg@10"] is None


# ---------------------------------------------------------------- metrics

def ranked(top_rows: list[list[int]], width: int = bm.TOP) -> np.ndarray:
    """Ranked lists from their first items, padded with items 1000, 1001, ... that are never relevant."""
    return np.array([row + list(range(1000, 1000 + width - len(row))) for row in top_rows])


def test_metric_values_by_hand():
    top = ranked([[7, 1, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3], list(range(20, 32))])
    relevant = [np.array([7, 8]), np.array([11]), np.array([2, 50, 60]), np.arange(20, 32)]
    got = bm.shopper_metrics(top, relevant)
    # relevant at ranks 1 and 3 of 2 relevant
    assert got["ndcg@10"][0] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    assert got["ndcg@50"][0] == pytest.approx(got["ndcg@10"][0])
    # the one relevant item at rank 11: nothing in the top 10, 1/log2(12) in the top 50
    assert (got["ndcg@10"][1], got["hr@10"][1], got["recall@10"][1]) == (0.0, 0.0, 0.0)
    assert got["ndcg@50"][1] == pytest.approx(1 / math.log2(12))
    # 1 of 3 relevant at rank 2
    assert got["ndcg@10"][2] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3) + 1 / math.log2(4)))
    assert (got["hr@10"][2], got["recall@10"][2]) == (1.0, pytest.approx(1 / 3))
    # 12 relevant filling ranks 1-12: the ideal holds 10 of them at K = 10 and all 12 at K = 50
    assert got["ndcg@10"][3] == pytest.approx(1.0) and got["ndcg@50"][3] == pytest.approx(1.0)
    assert got["recall@10"][3] == pytest.approx(10 / 12) and got["hr@10"][3] == 1.0
    assert list(got) == list(bm.METRICS)


def test_new_items_variant_drops_bought_items_and_empty_shoppers():
    pool = np.arange(10)
    scores = np.tile(-np.arange(10.0), (3, 1))                  # every shopper ranks 0, 1, 2, ... in order
    relevant = [np.array([0, 2]), np.array([1]), np.array([5])]
    bought = [np.array([0, 1]), np.array([1]), np.array([], np.int64)]
    sums = bm.ranked_sums(scores, pool, relevant, bought)
    result = bm.finalise(sums, bootstrap=0)
    assert result["nb.all.n"] == 3 and result["nb.new.n"] == 2   # shopper 1 has nothing new to find
    # all: shopper 0 finds 0 (rank 1) and 2 (rank 3); shopper 1 finds 1 at rank 2; shopper 2 finds 5 at rank 6
    all_ndcg = [(1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), 1 / math.log2(3), 1 / math.log2(7)]
    assert result["nb.all.ndcg@10"] == pytest.approx(np.mean(all_ndcg))
    # new: shopper 0's bought 0 and 1 leave the ranking and R = {2}, now at rank 1; shopper 2 unchanged
    assert result["nb.new.ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(7)) / 2)
    top = bm.top_items(scores[:1], pool, exclude=[bought[0]], k=12)
    assert top[0].tolist() == [2, 3, 4, 5, 6, 7, 8, 9, -1, -1, -1, -1]


def test_ties_follow_the_fixed_tie_order_not_the_catalog_order():
    pool = np.array([3, 7, 8, 20, 21, 40, 41, 42, 50, 60, 61, 62])
    order = bm.tie_order(len(pool))
    assert sorted(order) == list(range(len(pool))) and order.tolist() != list(range(len(pool)))
    # every constant ranker ranks the pool in the tie order
    for constant in (0.0, 5.0, -2.0):
        top = bm.top_items(np.full((2, len(pool)), constant), pool, k=len(pool))
        assert top[0].tolist() == top[1].tolist() == pool[order].tolist()
    # higher scores first; within each tied group the tie order again
    scores = np.where(np.isin(pool, [20, 42, 61]), 1.0, 0.0)[None, :]
    top = bm.top_items(scores, pool, k=len(pool))[0].tolist()
    assert top == [p for p in pool[order] if p in (20, 42, 61)] + [p for p in pool[order] if p not in (20, 42, 61)]
    # a baseline scoring everything alike (popularity without purchases) ranks exactly as a constant
    empty = build_empty_task(pool)
    assert bm.finalise(baseline_sums("popularity", {"days": 7.0}, empty, {0: pool}, 100, BaselineConfig.defaults(),
                                     "local"), 0) == \
        bm.finalise(ranking_sums(empty, {0: pool}, lambda t, p: np.zeros((len(t), len(p)))), 0)


def build_empty_task(pool: np.ndarray):
    """Three shoppers without any purchase before the cut, each next buying one item of `pool`."""
    from fedcvr.shared.evaluation.baskets import BasketTask, Purchases

    none = np.zeros(0, np.int64)
    return BasketTask(np.zeros(3, np.int32), np.arange(3), np.full(3, CUT), [pool[[1]], pool[[4]], pool[[9]]],
                      [none] * 3, np.full((3, 1), -1), np.full((3, 1), -1), np.zeros((3, 1), np.float32),
                      Purchases(none, none, none, np.zeros(0, np.int32)), {0: EventLog.empty()})


def test_nan_scores_raise():
    scores = np.zeros((2, 4))
    scores[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bm.top_items(scores, np.arange(4))
    with pytest.raises(ValueError, match=r"shape \(shoppers, 4\)"):
        bm.top_items(np.zeros((2, 3)), np.arange(4))


def random_shoppers(n: int, seed: int, catalog: int = 60):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n, catalog))
    relevant = [np.unique(rng.integers(0, catalog, rng.integers(1, 6))) for _ in range(n)]
    bought = [np.unique(rng.integers(0, catalog, rng.integers(0, 8))) for _ in range(n)]
    return scores, np.arange(catalog), relevant, bought


def test_sums_merge_and_finalise_to_exact_means():
    scores, pool, relevant, bought = random_shoppers(200, seed=1)
    whole = bm.ranked_sums(scores, pool, relevant, bought)
    halves = bm.add(bm.ranked_sums(scores[:77], pool, relevant[:77], bought[:77]),
                    bm.ranked_sums(scores[77:], pool, relevant[77:], bought[77:]))
    assert whole.keys() == halves.keys()
    for key in whole:
        np.testing.assert_allclose(halves[key], whole[key], rtol=1e-12, err_msg=key)
    assert bm.add({}, whole) == whole
    values = bm.shopper_metrics(bm.top_items(scores, pool), relevant)
    result = bm.finalise(whole)
    for name in bm.METRICS:
        mean = result[f"nb.all.{name}"]
        assert mean == pytest.approx(values[name].mean(), abs=1e-12)
        assert result[f"nb.all.{name}.lo"] <= mean <= result[f"nb.all.{name}.hi"]
    assert set(bm.finalise(whole, bootstrap=0)) == {k for k in result if not k.endswith((".lo", ".hi"))}


def test_interval_narrows_with_more_shoppers_and_matches_a_direct_bootstrap():
    scores, pool, relevant, bought = random_shoppers(400, seed=2)
    few = bm.finalise(bm.ranked_sums(scores[:100], pool, relevant[:100], bought[:100]), seed=0)
    many = bm.finalise(bm.ranked_sums(scores, pool, relevant, bought), seed=0)
    for name in bm.METRICS:
        width = lambda r, n=name: r[f"nb.all.{n}.hi"] - r[f"nb.all.{n}.lo"]  # noqa: E731
        assert 0 < width(many) < width(few)
    # the binned bootstrap against resampling the 400 per-shopper values themselves
    values = bm.shopper_metrics(bm.top_items(scores, pool), relevant)
    rng = np.random.default_rng(5)
    for name in bm.METRICS:
        v = values[name]
        means = v[rng.integers(0, len(v), (4000, len(v)))].mean(1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        half = (hi - lo) / 2
        assert many[f"nb.all.{name}.lo"] == pytest.approx(lo, abs=0.15 * half + 2e-3)
        assert many[f"nb.all.{name}.hi"] == pytest.approx(hi, abs=0.15 * half + 2e-3)
    # a fixed seed gives a fixed interval
    assert bm.finalise(bm.ranked_sums(scores, pool, relevant, bought), seed=0) == many


def test_shared_metrics_finalise_and_explain_next_basket_keys():
    scores, pool, relevant, bought = random_shoppers(50, seed=3)
    a = metrics.MetricSums(bm.ranked_sums(scores[:20], pool, relevant[:20], bought[:20]))
    b = metrics.MetricSums(bm.ranked_sums(scores[20:], pool, relevant[20:], bought[20:]))
    # as a Flower record and back, merged like two nodes' replies
    merged = metrics.merge(metrics.MetricSums.from_record(a.to_record()), metrics.MetricSums.from_record(
        b.to_record()))
    out = metrics.finalise(merged)
    direct = bm.finalise(bm.ranked_sums(scores, pool, relevant, bought))
    assert out.keys() == direct.keys()
    for key, value in direct.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    for key in out:
        assert metrics.formula_for(key)
    assert metrics.formula_for("nb.all.ndcg@10").startswith("next basket: mean over shoppers of sum_{r <= 10}")
    assert "min(|R|, 50)" in metrics.formula_for("nb.all.ndcg@50")
    assert "items bought before the cut left out" in metrics.formula_for("nb.new.recall@10")
    assert metrics.formula_for("nb.new.hr@10.lo").startswith("lower end of the bootstrap 95% interval")
    assert metrics.formula_for("nb.all.n").startswith("next basket: shoppers ranked")
    assert metrics.formula_for("ndcg@10") == metrics.METRIC_FORMULAS["ndcg@K"].replace("K", "10")
    assert bm.formula_for("ndcg@10") is None and bm.formula_for("nb.some.ndcg@10") is None


# ---------------------------------------------------------------- examples.test-from

def test_test_from_must_be_a_date():
    for bad in ("next tuesday", "2011-13-45", "NaT"):
        with pytest.raises(ValueError, match="examples.test-from = .* is not a date"):
            ExampleConfig.defaults(test_from=bad)
    assert parse_test_from("2024-05-11T02:00:00+02:00") == pd.Timestamp("2024-05-11T00:00:00")
    assert ExampleConfig.from_run_config({"examples.test-from": "2024-05-11"}).test_from == "2024-05-11"


def test_split_cuts_the_test_at_test_from(tmp_path):
    rows = [(f"u{k % 5}", f"i{k % 6}", "purchase", k / 2, f"o{k}") for k in range(60)]   # days 0 .. 29.5
    data = merchant(tmp_path, rows)
    examples = build_examples(data, ExampleConfig.defaults())
    config = ExampleConfig.defaults(test_from="2024-05-21T08:00:00", validation_fraction=0.25)
    split = split_by_time(examples, config)
    t_test = pd.Timestamp("2024-05-21T08:00:00").value
    assert split.test_start == pd.Timestamp(t_test)
    assert (split.test.timestamp >= t_test).all() and len(split.test) == 20 * 5      # days 20 .. 29.5
    before = examples.timestamp[examples.timestamp < t_test]
    assert split.validation_start.value == int(np.quantile(before, 0.75, method="lower"))
    assert (split.validation.timestamp >= split.validation_start.value).all()
    assert (split.validation.timestamp < t_test).all() and (split.train.timestamp < split.validation_start.value).all()
    assert len(split.train) + len(split.validation) + len(split.test) == len(examples)


def test_prepare_builds_the_validation_and_test_tasks_of_purchase_logs(tmp_path):
    rows = [(f"u{k % 5}", f"i{k % 6}", "purchase", k / 2, f"o{k}") for k in range(60)]
    first = merchant(tmp_path, rows, name="a")
    second = merchant(tmp_path, [(u, i, e, d + 0.25, s) for u, i, e, d, s in rows], name="b")
    config = ExampleConfig.defaults(test_from="2024-05-21T08:00:00", history_length=3)
    prepared = prepare([first, second], config)
    assert prepared.implicit and set(prepared.baskets) == {"validation", "test"}
    test, validation = prepared.baskets["test"], prepared.baskets["validation"]
    t_test = pd.Timestamp("2024-05-21T08:00:00").value
    assert set(test.cut.tolist()) == {t_test} and set(test.merchant.tolist()) == {0, 1}
    # shoppers are numbered as in the training set: merchant 1's after merchant 0's 5 shoppers
    assert sorted(test.shopper.tolist()) == list(range(10))
    assert set(prepared.splits["train"].user.tolist()) == set(range(10))
    # merchants prepared together share one validation cut: the quantile of their pooled example times
    pooled = np.concatenate([build_examples(m, config).timestamp for m in (first, second)])
    t_val = int(np.quantile(pooled[pooled < t_test], 0.9, method="lower"))
    assert set(validation.cut.tolist()) == {t_val}
    for k, m in enumerate((first, second)):
        expected = build_task(m, prepared.catalog, k, 5 * k, t_val, t_test, 3)
        mine = validation.merchant == k
        assert validation.shopper[mine].tolist() == expected.shopper.tolist()
        assert [r.tolist() for r, keep in zip(validation.relevant, mine) if keep] == \
            [r.tolist() for r in expected.relevant]
        # the validation baskets end where the test begins
        assert (validation.cut < t_test).all()
