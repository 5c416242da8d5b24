"""The federated data census: per-merchant counts that add up, their merge, and the funnel rates.

Each node reports SUMS only (never ratios, which cannot be merged): merchants (1 per node), users, items,
impressions, clicks, carts, purchases and events. The server adds them up with `merge_census` and derives the
rates from the totals with `finalise_census`, so a merchant with many impressions weighs in proportionally.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from .data.loader import load_merchant
from .data.summary import DataSummary, summarise

CENSUS_MESSAGE_TYPE = "query.census"
"""Message type of the census query; the ClientApp registers it with `@app.query("census")`."""
CENSUS_ACTION = CENSUS_MESSAGE_TYPE.split(".", 1)[1]
CENSUS_RECORD = "census"
"""Key of the MetricRecord holding a node's counts in its reply."""

CENSUS_KEYS: tuple[str, ...] = (
    "merchants", "users", "items", "impressions", "clicks", "carts", "purchases", "events",
)
"""The counts one node reports and the server sums, in display order."""

RATE_KEYS: tuple[str, ...] = ("click_rate", "purchase_rate", "conversion_rate")


def census_of(summary: DataSummary) -> dict[str, int]:
    """The census counts of one merchant's data summary."""
    return {
        "merchants": 1,
        "users": int(summary.users),
        "items": int(summary.items),
        "impressions": int(summary.events.get("impression", 0)),
        "clicks": int(summary.events.get("click", 0)),
        "carts": int(summary.events.get("cart", 0)),
        "purchases": int(summary.events.get("purchase", 0)),
        "events": int(summary.total_events),
    }


def local_census(folder: str | Path) -> dict[str, int]:
    """Load and validate one merchant folder and count it; raises `DataValidationError` on bad data."""
    return census_of(summarise(load_merchant(folder)))


def _as_count(value: object, key: str, index: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"census part {index}: '{key}' is {value!r}, expected a whole number >= 0")
    if not math.isfinite(value) or value < 0 or int(value) != value:
        raise ValueError(f"census part {index}: '{key}' is {value!r}, expected a whole number >= 0")
    return int(value)


def merge_census(parts: Iterable[Mapping[str, int | float]]) -> dict[str, int]:
    """Add up the census counts of several nodes key by key.

    Every part must hold every key of `CENSUS_KEYS` as a whole number >= 0 (a float such as 3.0 is accepted,
    since metric records may carry numbers as floats); other keys are ignored. No parts give all zeros.
    Raises ValueError (TypeError for a value that is not a number) naming the part and the key.
    """
    totals = dict.fromkeys(CENSUS_KEYS, 0)
    for index, part in enumerate(parts):
        missing = [k for k in CENSUS_KEYS if k not in part]
        if missing:
            raise ValueError(f"census part {index} lacks {', '.join(missing)} (it has: {', '.join(part)})")
        for key in CENSUS_KEYS:
            totals[key] += _as_count(part[key], key, index)
    return totals


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def finalise_census(totals: Mapping[str, int]) -> dict[str, float | None]:
    """The funnel rates of merged census totals; each is None where its denominator is 0.

    click_rate      = clicks / impressions
    purchase_rate   = purchases / clicks         (post-click conversion)
    conversion_rate = purchases / impressions    (impression to purchase)
    """
    return {
        "click_rate": _ratio(totals["clicks"], totals["impressions"]),
        "purchase_rate": _ratio(totals["purchases"], totals["clicks"]),
        "conversion_rate": _ratio(totals["purchases"], totals["impressions"]),
    }


def format_census(totals: Mapping[str, int], rates: Mapping[str, float | None]) -> str:
    """A plain-text table of the totals and rates, for logs."""
    rows = [(key, f"{totals[key]:,}") for key in CENSUS_KEYS]
    rows += [(key, "n/a (denominator 0)" if rates[key] is None else f"{rates[key]:.4%}") for key in RATE_KEYS]
    width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    rule = "-" * (width + value_width + 3)
    lines = [rule, *(f"{k:<{width}} | {v:>{value_width}}" for k, v in rows), rule]
    return "\n".join(lines)
