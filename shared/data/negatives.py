"""Examples from a purchase log (implicit feedback): positives, plausible negatives and the sampling correction.

Positives
  Each distinct purchase (u, i, t) is a positive example (clicked = purchased = 1).
Negatives
  K per positive (clicked = purchased = 0), at the same time t and with the same history, among the items u did not
  buy at time t. Each is drawn from a mixture Q(. | u, t):
  - with probability h = `examples.history-negatives`: the item of one of u's own purchases strictly before t,
    drawn uniformly among them (so in proportion to how often u bought it);
  - with probability p = `examples.popular-negatives`: the item of one of the shop's purchases strictly before t,
    drawn uniformly among them (in proportion to how often it sold until then; never from the future);
  - else uniformly from the I catalog items; the share of a source with nothing before t (a shopper's first
    purchase, the shop's first sales) goes to uniform too.
  A draw that hits an item of the same basket is drawn again (up to 20 times, then left out).
Sampling correction (log_q)
  Against uniform noise a model learns to tell a sold item from one that never sells, and ranks every shopper by
  one list; plausible negatives make it learn what tells apart the items a shopper might plausibly buy. But a
  classifier of positives against negatives drawn from Q learns logit = log(P(i | u) / (K Q(i | u))): items that Q
  draws often (the shopper's own favourites, the best sellers) would be pushed down by exactly how often they are
  drawn. Each example therefore carries log_q = log(I Q(i | u, t)) (0 under uniform sampling), and training
  subtracts it from the click logit (`model/esmm.py`, `esmm_loss`): the model's own score then learns
  log(I P(i | u) / K), a ranking of the whole catalog as under uniform negatives, with the lower variance of the
  informative ones (the logQ correction of sampled softmax). log_q is floored at log(0.01), for the edge case of a
  positive that Q cannot draw (h + p = 1 and an item neither u nor the shop bought before).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .contract import EVENT_TYPES
from .signals import KeyedEvents

MIN_Q_RATIO = 0.01  # floor of I x Q(i | u, t)


def _before(keys: np.ndarray, t_rank: np.ndarray, q_keys: np.ndarray, q_rank: np.ndarray) -> np.ndarray:
    """For each query (key, time rank): how many of the rows (keys, t_rank) have the same key and an earlier time."""
    stride = int(max(t_rank.max(initial=0), q_rank.max(initial=0))) + 1
    return KeyedEvents.build(keys, t_rank, t_rank, stride).count_before(q_keys, q_rank, stride)


def implicit_targets(codes: dict[str, np.ndarray], n_items: int, negatives: int, popular_share: float,
                     history_share: float, seed: int) -> dict[str, np.ndarray]:
    """Positives, negatives and log_q (see the module doc) from a merchant's event codes (user, item, event, t)."""
    is_buy = codes["event"] == EVENT_TYPES.index("purchase")
    pos = pd.DataFrame({"user": codes["user"][is_buy], "item": codes["item"][is_buy], "t": codes["t"][is_buy]})
    pos = pos.drop_duplicates().reset_index(drop=True)
    n, k = len(pos), negatives
    p_user, p_item, p_t = (pos[c].to_numpy().astype(np.int64) for c in ("user", "item", "t"))
    basket = pos.groupby(["user", "t"], sort=False).ngroup().to_numpy().astype(np.int64)
    bought = np.unique(basket * n_items + p_item)
    rng = np.random.default_rng([seed, 7])
    t_rank = np.unique(p_t, return_inverse=True)[1].astype(np.int64)
    # the shop's purchases strictly before each one: the first `earlier` of `sold_items` (in time order)
    by_time = np.argsort(t_rank, kind="stable")
    sold_items = p_item[by_time]
    earlier = np.searchsorted(t_rank[by_time], t_rank, side="left")
    # the shopper's own purchases strictly before each one: rows [own_start, own_end) of `own_items`
    key = p_user * (int(t_rank.max(initial=0)) + 1) + t_rank
    by_user = np.argsort(key, kind="stable")
    own_items = p_item[by_user]
    own_end = np.searchsorted(key[by_user], key, side="left")
    own_start = np.searchsorted(key[by_user], key - t_rank, side="left")
    last = max(n - 1, 0)

    def draw(rows: np.ndarray) -> np.ndarray:
        """One negative item for each positive of `rows`."""
        uniform = rng.integers(0, n_items, len(rows))
        r, u = rng.random(len(rows)), rng.random(len(rows))
        own_n = own_end[rows] - own_start[rows]
        own = (r < history_share) & (own_n > 0)
        popular = (r >= history_share) & (r < history_share + popular_share) & (earlier[rows] > 0)
        if not n:
            return uniform
        own_pick = own_items[np.minimum(own_start[rows] + (u * own_n).astype(np.int64), last)]
        sold_pick = sold_items[np.minimum((u * earlier[rows]).astype(np.int64), last)]
        return np.where(own, own_pick, np.where(popular, sold_pick, uniform))

    neg = np.stack([draw(np.arange(n)) for _ in range(k)], 1) if n else np.zeros((0, k), np.int64)
    for _ in range(20):  # redraw the few that hit an item of the same basket
        clash = np.isin(basket[:, None] * n_items + neg, bought)
        if not clash.any():
            break
        neg[clash] = draw(np.nonzero(clash)[0])
    keep = ~np.isin(basket[:, None] * n_items + neg, bought)
    rows = np.concatenate([np.arange(n), np.repeat(np.arange(n), k)[keep.ravel()]])
    items = np.concatenate([p_item, neg.ravel()[keep.ravel()]]).astype(np.int64)
    label = np.concatenate([np.ones(n, np.int8), np.zeros(int(keep.sum()), np.int8)])
    order = np.argsort(rows, kind="stable")
    rows, items, label = rows[order], items[order], label[order]

    # Q(item | user, t) of every example, positives included
    own_n = (own_end - own_start)[rows]
    own_c = _before(p_user * n_items + p_item, t_rank, p_user[rows] * n_items + items, t_rank[rows])
    sold_c = _before(p_item, t_rank, items, t_rank[rows])
    h = history_share * (own_n > 0)
    p = popular_share * (earlier[rows] > 0)
    q = (h * own_c / np.maximum(own_n, 1) + p * sold_c / np.maximum(earlier[rows], 1) + (1.0 - h - p) / n_items)
    log_q = np.log(np.maximum(n_items * q, MIN_Q_RATIO)).astype(np.float32)
    return {
        "user": p_user.astype(np.int32)[rows], "item": items.astype(np.int32), "t": p_t[rows],
        "position": np.full(len(rows), -1, dtype=np.int32), "clicked": label, "purchased": label.copy(),
        "true_p_click": np.full(len(rows), np.nan, np.float32),
        "true_p_purchase": np.full(len(rows), np.nan, np.float32), "log_q": log_q,
    }
