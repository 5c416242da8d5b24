"""What a merchant's own event log says about a (shopper, item) pair at a time t: the signals real shops carry
beside item text. Every signal counts only events strictly before t, so no example sees its own future.

For a query (shopper u, item i, time t), `signals` gives N_SIGNALS numbers:
- candidate in history, for each event type e in EVENT_TYPES (impression = viewed, click, cart, purchase), over
  u's WHOLE history (not only the last `examples.history-length` events):
    seen    1 if u had an e event on i before t, else 0
    count   log1p(number of u's e events on i before t) / 4
    age     log1p(hours since u's last e event on i) / 10, or 1.2 when there is none (further than any age)
- item statistics on this merchant: for e in (click, purchase) and each window w in WINDOWS_DAYS,
    log1p(number of e events on i by anyone in [t - w, t)) / 4;
  the 7-day against the 30-day count is the item's trend;
- merchant scale: log1p(number of purchases of any item in [t - 30 days, t)) / 4, so that the item counts can be read
  relative to the shop's size (a shop of 40 shoppers and one of 4,000 share one model).
Counts are log-scaled and divided by small constants so that every signal sits in about [0, 3]: under DP-SGD the
gradient of a weight grows with its input, and the clipping bound is shared by all weights.

The log is indexed once (`EventLog.build`) and answers any batch of queries with binary searches; the same function
builds the signals of training examples, of next-basket candidates at a cut and of served recommendations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .contract import EVENT_TYPES

WINDOWS_DAYS = (7, 30, 365)
ITEM_EVENTS = ("click", "purchase")
N_PAIR = 3 * len(EVENT_TYPES)
N_SIGNALS = N_PAIR + len(ITEM_EVENTS) * len(WINDOWS_DAYS) + 1
NO_AGE = 1.2
_NS_PER_HOUR = 3_600 * 1_000_000_000
_NS_PER_DAY = 24 * _NS_PER_HOUR
_TYPES = len(EVENT_TYPES)
_PURCHASE = EVENT_TYPES.index("purchase")


def repeat_prior() -> np.ndarray:
    """(N_SIGNALS,) weights of a linear score of the signals that ranks as the classic "the shopper's own past
    purchases, most often bought first, then what the shop sold most in the last 30 days" list does: a bought item
    scores 3 plus twice its purchase-count signal (about 3.2 to 5), a carted or clicked one 1 or 0.5 more, and every
    item its 30-day purchase signal (0 to about 2, below any bought item's 3)."""
    out = popular_prior()
    out[3 * _PURCHASE] = 3.0
    out[3 * _PURCHASE + 1] = 2.0
    out[3 * EVENT_TYPES.index("cart")] = 1.0
    out[3 * EVENT_TYPES.index("click")] = 0.5
    return out


def popular_prior() -> np.ndarray:
    """(N_SIGNALS,) weights of the classic "the shop's best sellers of the last 30 days" score: its 30-day purchase
    signal alone (shops whose shoppers rarely buy an item twice)."""
    out = np.zeros(N_SIGNALS, np.float32)
    out[N_PAIR + ITEM_EVENTS.index("purchase") * len(WINDOWS_DAYS) + WINDOWS_DAYS.index(30)] = 1.0
    return out


PRIORS = {"repeat": repeat_prior, "popular": popular_prior}
"""The classic rankers as linear scores of the signals, that a node may blend into its model's score
(`model/memory.py`, `training/personalise.py`)."""


def unseen_pair() -> np.ndarray:
    """(N_PAIR,) the candidate-in-history signals of an item the shopper never touched."""
    out = np.zeros(N_PAIR, np.float32)
    out[2::3] = NO_AGE
    return out


def _log(count: np.ndarray) -> np.ndarray:
    return (np.log1p(count) / 4.0).astype(np.float32)


@dataclass
class KeyedEvents:
    """Events as sorted composite keys key * stride + time rank (ranks into the log's distinct times), so that
    "events of key k before time t" is a range of one sorted array."""

    keys: np.ndarray  # distinct keys, sorted
    composite: np.ndarray  # key index * stride + time rank, sorted
    times: np.ndarray  # event times in the order of `composite`

    @classmethod
    def build(cls, key: np.ndarray, rank: np.ndarray, t: np.ndarray, stride: int) -> KeyedEvents:
        keys, index = np.unique(key, return_inverse=True)
        composite = index.astype(np.int64) * stride + rank
        order = np.argsort(composite, kind="stable")
        return cls(keys, composite[order], t[order])

    def locate(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of each query key among the distinct keys, and whether it is there at all."""
        at = np.searchsorted(self.keys, key)
        found = at < len(self.keys)
        found[found] = self.keys[at[found]] == key[found]
        return np.where(found, at, 0), found

    def before(self, index: np.ndarray, found: np.ndarray, rank: np.ndarray, stride: int) -> np.ndarray:
        """Position just past the last event of key `index` with time rank < `rank` (its count is this minus
        `start`)."""
        return np.where(found, np.searchsorted(self.composite, index * stride + rank, side="left"), 0)

    def start(self, index: np.ndarray, found: np.ndarray, stride: int) -> np.ndarray:
        return np.where(found, np.searchsorted(self.composite, index * stride, side="left"), 0)

    def count_before(self, key: np.ndarray, rank: np.ndarray, stride: int) -> np.ndarray:
        """For each query: how many events of `key` have a time rank below `rank` (0 for a key never seen)."""
        index, found = self.locate(key)
        return self.before(index, found, rank, stride) - self.start(index, found, stride)


@dataclass
class EventLog:
    """One merchant's events, indexed for `signals`. user, item: any integer codes (the same codes as the
    queries), event: index into EVENT_TYPES, t: ns since epoch."""

    distinct_times: np.ndarray
    stride: int
    pairs: KeyedEvents  # key (user, item, event)
    items: KeyedEvents  # key (item, event)
    purchase_times: np.ndarray  # every purchase's time, sorted
    n_items: int

    @classmethod
    def build(cls, user: np.ndarray, item: np.ndarray, event: np.ndarray, t: np.ndarray) -> EventLog:
        user, item = np.asarray(user, np.int64), np.asarray(item, np.int64)
        event, t = np.asarray(event, np.int64), np.asarray(t, np.int64)
        distinct_times, rank = np.unique(t, return_inverse=True)
        stride = len(distinct_times) + 1
        n_items = int(item.max()) + 1 if len(item) else 1
        pair_key = (user * n_items + item) * _TYPES + event
        item_key = item * _TYPES + event
        return cls(distinct_times, stride, KeyedEvents.build(pair_key, rank, t, stride),
                   KeyedEvents.build(item_key, rank, t, stride), np.sort(t[event == _PURCHASE]), n_items)

    @classmethod
    def empty(cls) -> EventLog:
        none = np.zeros(0, np.int64)
        return cls.build(none, none, none, none)

    def _rank(self, t: np.ndarray) -> np.ndarray:
        """Number of the log's distinct times strictly before each t: an event is before t iff its rank is less."""
        return np.searchsorted(self.distinct_times, t, side="left")

    def signals(self, user: np.ndarray, item: np.ndarray, t: np.ndarray) -> np.ndarray:
        """(Q, N_SIGNALS) float32 signals of the queries (user (Q,), item (Q,), t (Q,) ns); see the module doc.
        Items or shoppers the log never saw get zero counts (an item new to the shop, a new shopper)."""
        return np.concatenate([self.pair_signals(user, item, t), self.item_signals(item, t)], 1)

    def _queries(self, item: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        item, t = np.asarray(item, np.int64), np.asarray(t, np.int64)
        known_item = (item >= 0) & (item < self.n_items)
        return np.where(known_item, item, 0), known_item, t, self._rank(t)

    def pair_signals(self, user: np.ndarray, item: np.ndarray, t: np.ndarray) -> np.ndarray:
        """(Q, N_PAIR): the candidate-in-history part of `signals`."""
        user = np.asarray(user, np.int64)
        safe_item, known_item, t, rank = self._queries(item, t)
        out = np.zeros((len(t), N_PAIR), np.float32)
        column = 0
        for e in range(_TYPES):
            index, found = self.pairs.locate((user * self.n_items + safe_item) * _TYPES + e)
            found &= known_item
            end = self.pairs.before(index, found, rank, self.stride)
            count = end - self.pairs.start(index, found, self.stride)
            seen = count > 0
            last = self.pairs.times[np.where(seen, end - 1, 0)] if len(self.pairs.times) else np.zeros(len(t))
            age_hours = np.maximum(t - last, 0) / _NS_PER_HOUR
            out[:, column] = seen
            out[:, column + 1] = _log(count)
            out[:, column + 2] = np.where(seen, np.log1p(age_hours) / 10.0, NO_AGE)
            column += 3
        return out

    def item_signals(self, item: np.ndarray, t: np.ndarray) -> np.ndarray:
        """(Q, N_SIGNALS - N_PAIR): the item-statistics and shop-scale part of `signals`."""
        safe_item, known_item, t, rank = self._queries(item, t)
        out = np.zeros((len(t), N_SIGNALS - N_PAIR), np.float32)
        window_starts = [self._rank(t - days * _NS_PER_DAY) for days in WINDOWS_DAYS]
        column = 0
        for name in ITEM_EVENTS:
            index, found = self.items.locate(safe_item * _TYPES + EVENT_TYPES.index(name))
            found &= known_item
            end = self.items.before(index, found, rank, self.stride)
            for window_start in window_starts:
                begin = self.items.before(index, found, window_start, self.stride)
                out[:, column] = _log(end - begin)
                column += 1
        recent = (np.searchsorted(self.purchase_times, t, side="left")
                  - np.searchsorted(self.purchase_times, t - 30 * _NS_PER_DAY, side="left"))
        out[:, column] = _log(recent)
        return out

    def grid(self, users: np.ndarray, items: np.ndarray, t: np.ndarray) -> np.ndarray:
        """(n, k, N_SIGNALS) signals of every (shopper, item) pair: users (n,) each at its time t (n,), items (k,)."""
        n, k = len(users), len(items)
        flat = self.signals(np.repeat(users, k), np.tile(items, n), np.repeat(t, k))
        return flat.reshape(n, k, N_SIGNALS)
