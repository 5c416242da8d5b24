"""Next-basket tasks: which shoppers are asked for their next basket at a date cut, which items that basket holds,
and the history they are ranked from.

A basket is one session (`session_id`; an invoice in Online Retail) or, where the data has no session ids, a
shopper's purchases at one timestamp. At a cut c, with an end e (the test cut, for validation) or none (test):
- shoppers: those with at least one event before c and a purchase in [c, e);
- relevant items: the distinct items of the shopper's FIRST basket in [c, e) (the basket of its earliest purchase);
- bought before: the distinct items the shopper purchased before c (the "new items" variant leaves them out);
- history: every event before c. The model reads the last `examples.history-length` of them, built by the same
  `histories` as its training examples; the classic baselines read every purchase before c (`Purchases`).
Codes: items are rows of the shared `Catalog`; shoppers are numbered as in `TrainingSet` (merchant k's sorted
shopper ids, offset by the shoppers of merchants 0..k-1), so a shopper is one number across merchants.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from ..data.contract import EVENT_TYPES
from ..data.examples import event_codes, histories
from ..data.loader import MerchantData
from ..data.signals import N_SIGNALS, EventLog
from ..training.data import Catalog

PURCHASE = EVENT_TYPES.index("purchase")


@dataclass
class Purchases:
    """P purchase events: shopper (P,) int64, item (P,) int64 catalog row, t (P,) int64 ns, merchant (P,) int32."""

    user: np.ndarray
    item: np.ndarray
    t: np.ndarray
    merchant: np.ndarray

    def __len__(self) -> int:
        return len(self.item)

    def subset(self, mask: np.ndarray) -> Purchases:
        return Purchases(*(getattr(self, f.name)[mask] for f in fields(self)))

    @classmethod
    def concat(cls, parts: list[Purchases]) -> Purchases:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


@dataclass
class BasketTask:
    """S shoppers asked for their next basket.

    merchant (S,) int32, shopper (S,) int64, cut (S,) int64 ns; relevant[s] and bought[s] sorted catalog rows;
    history_item (S, L) catalog rows (-1 padding), history_event (S, L), history_age_hours (S, L): the model's
    input at the cut; purchases: every purchase of the merchants (all shoppers, tested or not, at any time): a
    baseline's fit keeps those strictly before its cut (`next_basket.baseline_sums`), so that a pooled fit at one
    merchant's cut sees every other merchant's purchases up to that same cut; logs: each merchant's `EventLog` in
    these codes, for the model's signals of a (shopper, candidate) pair at the cut (`signals`)."""

    merchant: np.ndarray
    shopper: np.ndarray
    cut: np.ndarray
    relevant: list[np.ndarray]
    bought: list[np.ndarray]
    history_item: np.ndarray
    history_event: np.ndarray
    history_age_hours: np.ndarray
    purchases: Purchases
    logs: dict[int, EventLog]

    def __len__(self) -> int:
        return len(self.shopper)

    def subset(self, rows: np.ndarray) -> BasketTask:
        """The shoppers `rows` (indices), with the same purchases."""
        rows = np.asarray(rows, dtype=np.int64)
        return BasketTask(self.merchant[rows], self.shopper[rows], self.cut[rows],
                          [self.relevant[r] for r in rows], [self.bought[r] for r in rows],
                          self.history_item[rows], self.history_event[rows], self.history_age_hours[rows],
                          self.purchases, self.logs)

    def signals(self, pool: np.ndarray) -> np.ndarray:
        """(S, C, N_SIGNALS) signals of each shopper with each candidate of `pool` (C,) at the shopper's cut, from
        the shopper's merchant's log: the same `EventLog.signals` as the training examples."""
        out = np.zeros((len(self), len(pool), N_SIGNALS), np.float32)
        for merchant in np.unique(self.merchant):
            rows = np.flatnonzero(self.merchant == merchant)
            out[rows] = self.logs[int(merchant)].grid(self.shopper[rows], pool, self.cut[rows])
        return out

    @classmethod
    def concat(cls, parts: list[BasketTask]) -> BasketTask:
        return cls(np.concatenate([p.merchant for p in parts]), np.concatenate([p.shopper for p in parts]),
                   np.concatenate([p.cut for p in parts]), [r for p in parts for r in p.relevant],
                   [b for p in parts for b in p.bought], np.concatenate([p.history_item for p in parts]),
                   np.concatenate([p.history_event for p in parts]),
                   np.concatenate([p.history_age_hours for p in parts]),
                   Purchases.concat([p.purchases for p in parts]), {k: v for p in parts for k, v in p.logs.items()})


def _basket_keys(events: pd.DataFrame, is_buy: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A basket label per purchase: its session id where the data has them, else its timestamp."""
    if "session_id" in events.columns:
        session = events["session_id"].fillna("").astype(str).to_numpy()[is_buy]
        if (session != "").all():
            return pd.factorize(session)[0].astype(np.int64)
    return pd.factorize(t[is_buy])[0].astype(np.int64)


def merchant_log(data: MerchantData, catalog: Catalog, user_offset: int) -> EventLog:
    """A merchant's events as an `EventLog` in the task's codes (catalog rows; shoppers offset by `user_offset`)."""
    codes, _ = event_codes(data)
    to_catalog = catalog.codes(data.items["item_id"].to_numpy(dtype=object))
    return EventLog.build(codes["user"].astype(np.int64) + user_offset, to_catalog[codes["item"]], codes["event"],
                          codes["t"])


def build_task(data: MerchantData, catalog: Catalog, merchant: int, user_offset: int, cut: int, end: int | None,
               history_length: int, log: EventLog | None = None) -> BasketTask:
    """The next-basket task of one merchant at `cut` (ns): the first basket among the purchases in [cut, end)
    (`end` ns, or None for no end); `log` is the merchant's `merchant_log` (built here when not given)."""
    log = merchant_log(data, catalog, user_offset) if log is None else log
    codes, _ = event_codes(data)
    to_catalog = catalog.codes(data.items["item_id"].to_numpy(dtype=object))
    user, item, t = codes["user"].astype(np.int64), codes["item"], codes["t"]
    is_buy = codes["event"] == PURCHASE
    buy_user, buy_item, buy_t = user[is_buy], to_catalog[item[is_buy]], t[is_buy]
    buy_basket = _basket_keys(data.events, is_buy, t)
    before = buy_t < cut
    purchases = Purchases(buy_user + user_offset, buy_item, buy_t, np.full(len(buy_t), merchant, np.int32))

    after = (buy_t >= cut) & ((buy_t < end) if end is not None else True)
    seen_before = np.unique(user[t < cut])
    frame = pd.DataFrame({"user": buy_user[after], "item": buy_item[after], "t": buy_t[after],
                          "basket": buy_basket[after]})
    frame = frame[frame["user"].isin(seen_before)]
    if len(frame):
        first = frame.sort_values(["t", "basket"], kind="stable").groupby("user", sort=True).head(1)
        frame = frame.merge(first[["user", "basket"]], on=["user", "basket"])
    relevant = {int(u): np.unique(g.to_numpy()) for u, g in frame.groupby("user", sort=True)["item"]}
    shoppers = np.fromiter(relevant, dtype=np.int64, count=len(relevant))
    old = pd.DataFrame({"user": buy_user[before], "item": buy_item[before]})
    old = old[old["user"].isin(shoppers)]
    bought_by = {int(u): np.unique(g.to_numpy()) for u, g in old.groupby("user", sort=True)["item"]}
    empty = np.zeros(0, np.int64)

    hist_item, hist_event, hist_age = histories(shoppers, np.full(len(shoppers), cut, np.int64), user, t, item,
                                                codes["event"], history_length)
    hist_item = np.where(hist_item >= 0, to_catalog[np.maximum(hist_item, 0)], -1).astype(np.int64)
    return BasketTask(np.full(len(shoppers), merchant, np.int32), shoppers + user_offset,
                      np.full(len(shoppers), cut, np.int64), [relevant[int(u)] for u in shoppers],
                      [bought_by.get(int(u), empty) for u in shoppers], hist_item,
                      hist_event.astype(np.int64), hist_age.astype(np.float32), purchases, {merchant: log})
