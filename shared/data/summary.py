"""Summaries of a merchant's data: sizes, event counts and funnel rates.

Funnel rates (each a ratio of event counts, None where the denominator is 0):
  click rate      = clicks / impressions
  purchase rate   = purchases / clicks         (post-click conversion)
  conversion rate = purchases / impressions    (impression to purchase)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .contract import EVENT_TYPES
from .loader import MerchantData


@dataclass
class DataSummary:
    """Counts that add up across merchants; rates are derived from them."""

    name: str
    users: int
    items: int
    events: dict[str, int] = field(default_factory=dict)
    first: pd.Timestamp | None = None
    last: pd.Timestamp | None = None

    @staticmethod
    def _ratio(num: int, den: int) -> float | None:
        return num / den if den else None

    @property
    def click_rate(self) -> float | None:
        return self._ratio(self.events.get("click", 0), self.events.get("impression", 0))

    @property
    def purchase_rate(self) -> float | None:
        return self._ratio(self.events.get("purchase", 0), self.events.get("click", 0))

    @property
    def conversion_rate(self) -> float | None:
        return self._ratio(self.events.get("purchase", 0), self.events.get("impression", 0))

    @property
    def total_events(self) -> int:
        return sum(self.events.values())


def summarise(data: MerchantData) -> DataSummary:
    counts = data.events["event"].value_counts()
    return DataSummary(
        name=data.name,
        users=int(data.events["user_id"].nunique()),
        items=len(data.items),
        events={name: int(counts.get(name, 0)) for name in EVENT_TYPES},
        first=data.events["timestamp"].min(),
        last=data.events["timestamp"].max(),
    )


def combine(summaries: list[DataSummary], users: int, items: int, name: str = "all") -> DataSummary:
    """Totals over merchants: event counts add up; `users` and `items` are the distinct counts over all merchants
    (a shopper or an item can appear at several merchants, so per-merchant counts do not add up)."""
    return DataSummary(
        name=name,
        users=users,
        items=items,
        events={k: sum(s.events.get(k, 0) for s in summaries) for k in EVENT_TYPES},
        first=min((s.first for s in summaries if s.first is not None), default=None),
        last=max((s.last for s in summaries if s.last is not None), default=None),
    )
