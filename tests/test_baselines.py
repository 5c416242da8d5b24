"""The classic next-basket baselines against rankings worked out by hand on a tiny purchase log, their fitting
window (strictly before the cut), the local and pooled scopes, and tuning on the validation task only."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedcvr.shared.evaluation import basket_metrics, next_basket
from fedcvr.shared.evaluation.baselines import NAMES, BaselineConfig, BaselineError, check_names, fit
from fedcvr.shared.evaluation.baskets import BasketTask, Purchases
from fedcvr.shared.evaluation.next_basket import baseline_sums, evaluate_baselines

DAY = 86_400 * 1_000_000_000
CUT = 100 * DAY
ITEMS = 6
POOL = np.arange(ITEMS)
SQ2, SQ3 = math.sqrt(2.0), math.sqrt(3.0)

# (shopper, item, day) of the tiny log, every purchase before the cut at day 100. Shoppers are numbered from 10
# (global numbers need not start at 0). Distinct buyers, all time: i0 2, i1 4, i2 3, i3 2, i4 1, i5 2.
# In the last 7 days (t >= day 93, the boundary included): i0 2 (u10, u11), i4 1 (u13), i5 1 (u13 at day 93);
# u11's i3 at day 92.5 falls just outside.
LOG = [
    (10, 0, 99), (10, 0, 98), (10, 1, 60), (10, 1, 50), (10, 1, 40),
    (11, 0, 97), (11, 2, 40), (11, 3, 92.5),
    (12, 1, 10), (12, 3, 20), (12, 2, 30),
    (13, 1, 20), (13, 2, 45), (13, 5, 93), (13, 4, 96),
    (14, 5, 5), (14, 1, 70),
]


def purchases(rows, merchant: int | list[int] = 0) -> Purchases:
    user = np.array([r[0] for r in rows], np.int64)
    merchants = np.broadcast_to(np.asarray(merchant, np.int32), (len(rows),)).copy()
    return Purchases(user, np.array([r[1] for r in rows], np.int64),
                     np.array([round(r[2] * DAY) for r in rows], np.int64), merchants)


def scores_of(name, params, data=None, config=None, shoppers=(10, 11, 12, 13, 14), embeddings=None, seed=0,
              n_items=ITEMS, cut=CUT, pool=POOL):
    scorer = fit(name, params, purchases(LOG) if data is None else data, n_items, cut,
                 config or BaselineConfig.defaults(), embeddings, seed)
    return np.asarray(scorer(np.array(shoppers, np.int64), pool), dtype=np.float64)


def ranking(scores_row: np.ndarray, pool=POOL) -> list[int]:
    return [int(i) for i in basket_metrics.top_items(scores_row[None, :], pool)[0] if i >= 0]


# ---------------------------------------------------------------- popularity

def test_popularity_counts_distinct_buyers_in_the_window_with_all_time_buyers_as_ties():
    # B_W + B / (1 + max B), with max B = 4 (i1's buyers)
    s = scores_of("popularity", {"days": 7.0}, shoppers=(10, 99))
    expected = [2 + 2 / 5, 0 + 4 / 5, 0 + 3 / 5, 0 + 2 / 5, 1 + 1 / 5, 1 + 2 / 5]
    np.testing.assert_allclose(s, [expected, expected])  # the same for every shopper, known or not
    assert ranking(s[0]) == [0, 5, 4, 1, 2, 3]
    # a window covering everything: 1.25 x distinct buyers (u10's three i1 purchases count once)
    np.testing.assert_allclose(scores_of("popularity", {"days": 365.0})[0],
                               [2 * 1.2, 4 * 1.2, 3 * 1.2, 2 * 1.2, 1 * 1.2, 2 * 1.2])
    # 30 days (t >= day 70): i0 2, i1 1 (u14 at day 70, the boundary), i3 1, i4 1, i5 1
    np.testing.assert_allclose(scores_of("popularity", {"days": 30.0})[0],
                               [2.4, 1 + 0.8, 0.6, 1 + 0.4, 1 + 0.2, 1 + 0.4])


# ---------------------------------------------------------------- repeat

def pop7_ties() -> np.ndarray:
    """1e-6 x the 7-day popularity scaled into [0, 1): the tie-break of every baseline but popularity."""
    pop = np.array([2.4, 0.8, 0.6, 0.4, 1.2, 1.4])
    return 1e-6 * pop / (1 + pop.max())


def test_repeat_ranks_own_items_by_recency_weighted_frequency_then_popularity():
    config = BaselineConfig.defaults(popularity_days=7.0)
    s = scores_of("repeat", {"half_life_days": 10.0}, config=config, shoppers=(10, 99))
    # u10: i0 at ages 1 and 2 days, i1 at 40, 50, 60 days; F = sum 0.5 ^ (age / 10)
    f0 = 0.5 ** 0.1 + 0.5 ** 0.2
    f1 = 0.5 ** 4 + 0.5 ** 5 + 0.5 ** 6
    own = np.array([1 + f0 / f0, 1 + f1 / f0, 0, 0, 0, 0])
    np.testing.assert_allclose(s[0], own + pop7_ties(), rtol=1e-12, atol=1e-15)
    assert ranking(s[0]) == [0, 1, 5, 4, 2, 3]
    # a shopper without purchases: popularity alone
    np.testing.assert_allclose(s[1], pop7_ties(), rtol=1e-12, atol=1e-15)
    assert ranking(s[1]) == [0, 5, 4, 1, 2, 3]


def test_repeat_with_infinite_half_life_counts_purchases():
    s = scores_of("repeat", {"half_life_days": math.inf}, config=BaselineConfig.defaults(popularity_days=7.0),
                  shoppers=(10,))
    # plain counts: i0 2, i1 3 -> 1 + 2/3 and 1 + 3/3: the older but more frequent i1 now comes first
    np.testing.assert_allclose(s[0], np.array([1 + 2 / 3, 2.0, 0, 0, 0, 0]) + pop7_ties(), rtol=1e-12, atol=1e-15)
    assert ranking(s[0]) == [1, 0, 5, 4, 2, 3]


# ---------------------------------------------------------------- item-knn

# distinct items per shopper: u10 {0,1}, u11 {0,2,3}, u12 {1,2,3}, u13 {1,2,4,5}, u14 {1,5}; buyers b = (2,4,3,2,1,2)
# co-buyers c(i, j) and cosine S = c / sqrt(b_i b_j):
#   S01 = 1/sqrt8  S02 = 1/sqrt6  S03 = 1/2  S12 = 2/sqrt12 = 1/sqrt3  S13 = 1/sqrt8  S14 = 1/2  S15 = 2/sqrt8
#   S23 = 2/sqrt6  S24 = 1/sqrt3  S25 = 1/sqrt6  S45 = 1/sqrt2   (S04 = S05 = S34 = S35 = 0)
S = np.zeros((6, 6))
for (i, j), v in {(0, 1): 1 / math.sqrt(8), (0, 2): 1 / math.sqrt(6), (0, 3): 0.5, (1, 2): 1 / SQ3,
                  (1, 3): 1 / math.sqrt(8), (1, 4): 0.5, (1, 5): 2 / math.sqrt(8), (2, 3): 2 / math.sqrt(6),
                  (2, 4): 1 / SQ3, (2, 5): 1 / math.sqrt(6), (4, 5): 1 / SQ2}.items():
    S[i, j] = S[j, i] = v


def test_item_knn_sums_the_cosine_to_every_bought_item():
    s = scores_of("item-knn", {"neighbours": 0}, config=BaselineConfig.defaults(popularity_days=7.0), shoppers=(11,))
    # u11 bought {0, 2, 3}: score(j) = S0j + S2j + S3j
    expected = S[0] + S[2] + S[3]
    np.testing.assert_allclose(expected, [0.5 + 1 / math.sqrt(6), 1 / math.sqrt(8) * 2 + 1 / SQ3,
                                          1 / math.sqrt(6) + 2 / math.sqrt(6), 0.5 + 2 / math.sqrt(6), 1 / SQ3,
                                          1 / math.sqrt(6)])
    np.testing.assert_allclose(s[0], expected + pop7_ties(), rtol=1e-9)
    assert ranking(s[0]) == [3, 1, 2, 0, 4, 5]


def test_item_knn_keeps_each_items_k_nearest_neighbours_and_ties_at_the_cut():
    s = scores_of("item-knn", {"neighbours": 2}, config=BaselineConfig.defaults(popularity_days=7.0), shoppers=(11,))
    # rows (a bought item's neighbours) cut to the 2 largest: row 0 keeps 3 and 2; row 2 keeps 3 and, tied at
    # 1/sqrt3, both 1 and 4; row 3 keeps 2 and 0.
    kept0 = {2: 1 / math.sqrt(6), 3: 0.5}
    kept2 = {1: 1 / SQ3, 3: 2 / math.sqrt(6), 4: 1 / SQ3}
    kept3 = {0: 0.5, 2: 2 / math.sqrt(6)}
    expected = np.zeros(6)
    for row in (kept0, kept2, kept3):
        for j, v in row.items():
            expected[j] += v
    np.testing.assert_allclose(expected, [0.5, 1 / SQ3, 1 / math.sqrt(6) + 2 / math.sqrt(6),
                                          0.5 + 2 / math.sqrt(6), 1 / SQ3, 0.0])
    np.testing.assert_allclose(s[0], expected + pop7_ties(), rtol=1e-9, atol=1e-15)
    # i1 and i4 tie at 1/sqrt3: the more popular i4 (7-day popularity 1.2 > 0.8) goes first
    assert ranking(s[0]) == [3, 2, 4, 1, 0, 5]


# ---------------------------------------------------------------- ALS

def two_groups() -> Purchases:
    """Shoppers 0-5 buy from items {0, 1, 2}, shoppers 6-11 from {3, 4, 5}; shopper 0 lacks item 2 and shopper 6
    item 5, which everyone else in their group bought. Two factors, one per group: with more factors than the
    matrix needs, ALS fits the purchases exactly and scores every unbought item near 0."""
    rows = [(0, 0, 1), (0, 1, 2), (6, 3, 1), (6, 4, 2)]
    for u in range(1, 6):
        rows += [(u, 0, u), (u, 1, u + 1), (u, 2, u + 2)]
    for u in range(7, 12):
        rows += [(u, 3, u), (u, 4, u + 1), (u, 5, u + 2)]
    return purchases(rows)


@pytest.mark.parametrize("params", [{"factors": 2, "alpha": 1.0}, {"factors": 2, "alpha": 10.0}])
def test_als_recommends_the_unbought_item_of_the_shoppers_group(params):
    data = two_groups()
    s = scores_of("als", params, data=data, shoppers=(0, 6))
    top = basket_metrics.top_items(s, POOL, exclude=[np.array([0, 1]), np.array([3, 4])])
    assert top[0, 0] == 2 and top[1, 0] == 5
    assert s[0, 2] > s[0, [3, 4, 5]].max() and s[1, 5] > s[1, [0, 1, 2]].max()


def test_als_is_deterministic_given_the_seed():
    data = two_groups()
    a = scores_of("als", {"factors": 4, "alpha": 10.0}, data=data, shoppers=(0, 3, 6, 50), seed=3)
    b = scores_of("als", {"factors": 4, "alpha": 10.0}, data=data, shoppers=(0, 3, 6, 50), seed=3)
    c = scores_of("als", {"factors": 4, "alpha": 10.0}, data=data, shoppers=(0, 3, 6, 50), seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # a shopper the fit never saw (50) gets the popularity tie-break only
    np.testing.assert_allclose(a[3], scores_of("repeat", {"half_life_days": 30.0}, data=data, shoppers=(50,))[0])


def test_als_confidence_is_one_plus_alpha_times_the_purchase_count(monkeypatch):
    """The documented confidence 1 + alpha x count: implicit weighs an observed pair by the matrix value it is
    given (unobserved pairs weigh 1), so the baseline must hand it 1 + alpha x count."""
    import implicit.cpu.als

    seen = {}
    original = implicit.cpu.als.AlternatingLeastSquares.fit

    def spy(self, user_items, *args, **kwargs):
        seen["alpha"], seen["values"] = self.alpha, user_items.toarray()
        return original(self, user_items, *args, **kwargs)

    monkeypatch.setattr(implicit.cpu.als.AlternatingLeastSquares, "fit", spy)
    data = purchases([(0, 1, 1), (0, 1, 2), (1, 2, 3)])
    scores_of("als", {"factors": 2, "alpha": 10.0}, data=data, shoppers=(0,))
    confidence = seen["alpha"] * seen["values"]
    np.testing.assert_allclose(confidence[0, 1], 1 + 10 * 2)
    np.testing.assert_allclose(confidence[1, 2], 1 + 10 * 1)
    assert (confidence[seen["values"] == 0] == 0).all()


# ---------------------------------------------------------------- text

EMBEDDINGS = np.array([[2, 0, 0], [0, 3, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], np.float32)


def test_text_is_the_cosine_to_the_mean_of_the_last_distinct_items():
    # u10's purchases, newest first: i0 (99), i0 (98), i1 (60), i1, i1: the last 2 DISTINCT items are i0 and i1
    s = scores_of("text", {"recent": 2}, shoppers=(10, 13, 99), embeddings=EMBEDDINGS)
    # mean of the unit vectors (1,0,0) and (0,1,0) -> (1,1,0)/sqrt2 (not the mean of the raw (2,0,0), (0,3,0))
    np.testing.assert_allclose(s[0], [1 / SQ2, 1 / SQ2, 0, 1, 0.5, 0.5], atol=1e-6)
    # u13's last two: i4 (96), i5 (93): mean of (1,0,1)/sqrt2 and (0,1,1)/sqrt2 -> (1,1,2)/sqrt6
    p = np.array([1, 1, 2]) / math.sqrt(6)
    unit = EMBEDDINGS / np.linalg.norm(EMBEDDINGS, axis=1, keepdims=True)
    np.testing.assert_allclose(s[1], unit @ p, atol=1e-6)
    np.testing.assert_allclose(s[1], [1 / math.sqrt(6), 1 / math.sqrt(6), 2 / math.sqrt(6), 1 / SQ3,
                                      3 / math.sqrt(12), 3 / math.sqrt(12)], atol=1e-6)
    # a shopper without purchases: no profile, every item scores 0
    np.testing.assert_array_equal(s[2], np.zeros(6))
    # one recent item: its own direction
    s1 = scores_of("text", {"recent": 1}, shoppers=(10,), embeddings=EMBEDDINGS)
    np.testing.assert_allclose(s1[0], [1, 0, 0, 1 / SQ2, 1 / SQ2, 0], atol=1e-6)
    # more recent items than u10 bought: its 2 distinct items, as with recent = 2
    np.testing.assert_allclose(scores_of("text", {"recent": 20}, shoppers=(10,), embeddings=EMBEDDINGS)[0], s[0])
    # an item bought long ago and again lately counts as recent: i0 (days 10 and 90) is newer than i1 (day 50)
    again = scores_of("text", {"recent": 1}, data=purchases([(1, 0, 10), (1, 1, 50), (1, 0, 90)]), shoppers=(1,),
                      embeddings=EMBEDDINGS)
    np.testing.assert_allclose(again[0], [1, 0, 0, 1 / SQ2, 1 / SQ2, 0], atol=1e-6)


def test_text_needs_embeddings():
    with pytest.raises(BaselineError, match="embeddings"):
        scores_of("text", {"recent": 5})


# ---------------------------------------------------------------- every baseline

SETTINGS = {"popularity": {"days": 7.0}, "repeat": {"half_life_days": 10.0}, "item-knn": {"neighbours": 2},
            "als": {"factors": 4, "alpha": 10.0}, "text": {"recent": 2}}


@pytest.mark.parametrize("name", NAMES)
def test_every_baseline_fits_without_purchases(name):
    """A merchant with no purchase before the cut (its shoppers only clicked) still gets scores, not an error."""
    empty = purchases([])
    s = scores_of(name, SETTINGS[name], data=empty, shoppers=(1, 2), embeddings=EMBEDDINGS)
    assert s.shape == (2, ITEMS) and np.isfinite(s).all()


def test_check_names_rejects_unknown_names_naming_them():
    assert check_names(["repeat", "als", "repeat"], "--baselines") == ["repeat", "als"]
    with pytest.raises(BaselineError, match="--baselines: unknown baseline.*'pop'.*'knn'") as err:
        check_names(["popularity", "pop", "knn"], "--baselines")
    assert "popularity, repeat, item-knn, als, text" in str(err.value)
    with pytest.raises(BaselineError, match="unknown baseline 'nope'"):
        fit("nope", {}, purchases(LOG), ITEMS, CUT, BaselineConfig.defaults())


def test_config_errors_and_grids():
    with pytest.raises(BaselineError, match="baselines.popularity-days = 0"):
        BaselineConfig.defaults(popularity_days=0)
    with pytest.raises(BaselineError, match="baselines.als-iterations = 0"):
        BaselineConfig.defaults(als_iterations=0)
    config = BaselineConfig.defaults(popularity_days=45.0)
    assert [g["days"] for g in config.grid("popularity")] == [7.0, 14.0, 30.0, 45.0, 90.0, 365.0]
    for name in NAMES:
        assert config.default_setting(name) in config.grid(name)
        untuned = BaselineConfig.defaults(tune=False)
        assert untuned.grid(name) == [untuned.default_setting(name)]


# ---------------------------------------------------------------- tasks: cut, scopes, tuning

def task_of(rows, relevant: dict[int, list[int]], cut: int, merchant_of=None, bought=None) -> BasketTask:
    """A task by hand: `rows` (shopper, item, day) purchases (any time: build_task keeps only those before the
    cut, the baselines must do the same), `relevant` shopper -> next-basket items."""
    merchant_of = merchant_of or {}
    shoppers = np.array(sorted(relevant), np.int64)
    s = len(shoppers)
    data = purchases(rows, [merchant_of.get(r[0], 0) for r in rows])
    return BasketTask(np.array([merchant_of.get(int(u), 0) for u in shoppers], np.int32), shoppers,
                      np.full(s, cut, np.int64), [np.array(sorted(relevant[int(u)]), np.int64) for u in shoppers],
                      [np.array((bought or {}).get(int(u), []), np.int64) for u in shoppers],
                      np.full((s, 2), -1, np.int64), np.full((s, 2), -1, np.int64), np.zeros((s, 2), np.float32),
                      data, {})


def ndcg(sums: dict) -> float:
    return basket_metrics.finalise(sums, bootstrap=0)["nb.all.ndcg@10"]


@pytest.mark.parametrize("name", NAMES)
def test_purchases_at_or_after_the_cut_change_nothing(name):
    task = task_of(LOG, {10: [2], 11: [1, 4], 13: [3]}, CUT)
    later = task_of(LOG + [(10, 2, 100), (11, 5, 100), (12, 5, 101), (14, 3, 150), (13, 4, 100)],
                    {10: [2], 11: [1, 4], 13: [3]}, CUT)
    for scope in next_basket.SCOPES:
        a = baseline_sums(name, SETTINGS[name], task, {0: POOL}, ITEMS, BaselineConfig.defaults(), scope, EMBEDDINGS)
        b = baseline_sums(name, SETTINGS[name], later, {0: POOL}, ITEMS, BaselineConfig.defaults(), scope, EMBEDDINGS)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {scope} {key}")


def two_merchants() -> BasketTask:
    """Both merchants sell items 0-3. Merchant 0's shoppers (1-4) mostly buy item 0, merchant 1's (11-15) item 1.
    Shopper 1 (merchant 0) next buys item 1."""
    rows = [(1, 0, 90), (2, 0, 91), (3, 0, 92), (4, 2, 93),
            (11, 1, 90), (12, 1, 91), (13, 1, 92), (14, 1, 93), (15, 3, 94)]
    merchant_of = {1: 0, 2: 0, 3: 0, 4: 0, 11: 1, 12: 1, 13: 1, 14: 1, 15: 1}
    return task_of(rows, {1: [1]}, CUT, merchant_of)


def test_local_scope_fits_each_merchant_alone_and_pooled_fits_everyone():
    task, candidates = two_merchants(), {0: np.arange(4), 1: np.arange(4)}
    local = baseline_sums("popularity", {"days": 30.0}, task, candidates, 4, BaselineConfig.defaults(), "local")
    pooled = baseline_sums("popularity", {"days": 30.0}, task, candidates, 4, BaselineConfig.defaults(), "pooled")
    # local, merchant 0 alone: item 0 (3 buyers) > item 2 (1) > items 1, 3 (0, tied): item 1 at rank 3 or 4
    tied = [int(i) for i in basket_metrics.tie_order(4) if i in (1, 3)]
    rank = 3 + tied.index(1)
    assert ndcg(local) == pytest.approx(1 / math.log2(rank + 1))
    # pooled, both merchants: item 1 (4 buyers) first
    assert ndcg(pooled) == pytest.approx(1.0)


def test_scopes_fit_on_what_the_module_doc_says(monkeypatch):
    """local: one fit per merchant on its own purchases at its cut; pooled: one fit per distinct cut on every
    merchant's purchases before it."""
    calls = []
    real_fit = next_basket.fit

    def spy(name, params, data, n_items, cut, *args, **kwargs):
        calls.append((sorted(set(data.merchant.tolist())), cut, len(data)))
        return real_fit(name, params, data, n_items, cut, *args, **kwargs)

    monkeypatch.setattr(next_basket, "fit", spy)
    a = two_merchants()
    b = task_of([(11, 1, 90), (12, 1, 150)], {11: [2]}, 200 * DAY, {11: 1, 12: 1})
    task = BasketTask.concat([a, b])
    candidates = {0: np.arange(4), 1: np.arange(4)}
    baseline_sums("popularity", {"days": 30.0}, task, candidates, 4, BaselineConfig.defaults(), "local")
    assert calls == [([0], CUT, 4), ([1], 200 * DAY, 7)]
    calls.clear()
    baseline_sums("popularity", {"days": 30.0}, task, candidates, 4, BaselineConfig.defaults(), "pooled")
    assert calls == [([0, 1], CUT, 9 + 1), ([0, 1], 200 * DAY, 11)]
    with pytest.raises(ValueError, match="scope"):
        baseline_sums("popularity", {"days": 30.0}, task, candidates, 4, BaselineConfig.defaults(), "global")


def tuning_tasks() -> tuple[BasketTask, BasketTask]:
    """Validation (cut day 100): item 0 was bought by 5 shoppers long ago (day 10), item 1 by 2 recently (day 95);
    shopper 1 next buys item 1, so the short windows (7, 14, 30 days) rank it first and the long ones (90, 365)
    rank item 0 first. Test (cut day 200): item 2 was bought by 3 shoppers at day 195, and shopper 1 next buys
    item 0: the long windows win there."""
    old = [(u, 0, 10) for u in range(10, 15)] + [(20, 1, 95), (21, 1, 95)]
    validation = task_of(old + [(1, 3, 50)], {1: [1]}, CUT)
    recent = [(30, 2, 195), (31, 2, 195), (32, 2, 195), (1, 1, 100)]
    test = task_of(old + [(1, 3, 50)] + recent, {1: [0]}, 200 * DAY)
    return validation, test


def test_tuning_picks_the_best_validation_setting_and_never_looks_at_the_test(monkeypatch):
    validation, test = tuning_tasks()
    candidates, config = {0: np.arange(4)}, BaselineConfig.defaults(popularity_days=30.0)
    by_days = {d: ndcg(baseline_sums("popularity", {"days": d}, test, candidates, 4, config, "local"))
               for d in (7.0, 14.0, 30.0, 90.0, 365.0)}
    # on the test, only the whole year ranks item 0 first (item 2's recent buyers win every shorter window)
    assert by_days[365.0] == 1.0 and by_days[7.0] == by_days[90.0] == pytest.approx(1 / math.log2(3))
    cuts = []
    real_fit = next_basket.fit

    def spy(name, params, data, n_items, cut, *args, **kwargs):
        cuts.append((params["days"], cut))
        return real_fit(name, params, data, n_items, cut, *args, **kwargs)

    monkeypatch.setattr(next_basket, "fit", spy)
    (result,) = evaluate_baselines(["popularity"], validation, test, candidates, 4, config, "local")
    # validation: 7, 14 and 30 days all reach NDCG 1; the first of them in the grid wins
    assert result.params == {"days": 7.0} and result.validation_ndcg == 1.0
    assert result.metrics["nb.all.ndcg@10"] == pytest.approx(by_days[7.0])
    # every grid setting was fitted at the validation cut, and only the chosen one at the test cut
    assert cuts == [(d, CUT) for d in (7.0, 14.0, 30.0, 90.0, 365.0)] + [(7.0, 200 * DAY)]
    assert result.metrics["nb.all.n"] == 1 and result.name == "popularity" and result.scope == "local"


def test_without_tuning_the_default_setting_is_used():
    validation, test = tuning_tasks()
    (fixed,) = evaluate_baselines(["popularity"], validation, test, {0: np.arange(4)}, 4,
                                  BaselineConfig.defaults(popularity_days=90.0, tune=False), "pooled")
    assert fixed.params == {"days": 90.0} and fixed.validation_ndcg is None
    assert next_basket.params_text({"days": 30.0, "neighbours": 100}) == "days 30, neighbours 100"


@pytest.mark.parametrize("name", ["popularity", "repeat", "item-knn", "text"])
def test_without_validation_shoppers_the_default_setting_is_used(name):
    _, test = tuning_tasks()
    config = BaselineConfig.defaults()
    empty = test.subset(np.zeros(0, np.int64))
    for validation in (None, empty):
        (result,) = evaluate_baselines([name], validation, test, {0: np.arange(4)}, 4, config, "pooled",
                                       np.eye(4, 3))
        assert result.params == config.default_setting(name)
