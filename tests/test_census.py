"""The census arithmetic: per-merchant counts, their merge and the funnel rates, checked with hand values."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from fedcvr.shared.census import (
    CENSUS_KEYS,
    census_of,
    finalise_census,
    format_census,
    local_census,
    merge_census,
)
from fedcvr.shared.data.summary import DataSummary


def _part(**values: int) -> dict[str, int]:
    part = dict.fromkeys(CENSUS_KEYS, 0)
    part.update(values)
    return part


def test_merge_adds_every_key():
    a = _part(merchants=1, users=10, items=5, impressions=100, clicks=10, carts=4, purchases=2, events=116)
    b = _part(merchants=1, users=3, items=7, impressions=50, clicks=5, carts=1, purchases=1, events=57)
    assert merge_census([a, b]) == {
        "merchants": 2, "users": 13, "items": 12, "impressions": 150, "clicks": 15, "carts": 5,
        "purchases": 3, "events": 173,
    }


def test_merge_of_nothing_is_zero_and_extra_keys_are_ignored():
    assert merge_census([]) == dict.fromkeys(CENSUS_KEYS, 0)
    assert merge_census([{**_part(users=2), "future-key": 9}])["users"] == 2


def test_merge_accepts_whole_floats_from_metric_records():
    merged = merge_census([_part(users=2.0), _part(users=3)])
    assert merged["users"] == 5 and isinstance(merged["users"], int)


def test_merge_names_the_missing_key():
    part = _part()
    del part["clicks"]
    with pytest.raises(ValueError, match=r"census part 1 lacks clicks"):
        merge_census([_part(), part])


@pytest.mark.parametrize("bad", [-1, 2.5, float("nan")])
def test_merge_rejects_counts_that_are_not_whole_numbers(bad):
    with pytest.raises(ValueError, match="'impressions' is .* expected a whole number >= 0"):
        merge_census([_part(impressions=bad)])


def test_merge_rejects_non_numbers():
    with pytest.raises(TypeError, match="'users' is 'many'"):
        merge_census([_part(users="many")])


def test_rates_are_ratios_of_the_merged_sums_not_means_of_ratios():
    # Merchant a: 1 click / 100 impressions; merchant b: 9 clicks / 10 impressions.
    totals = merge_census([
        _part(impressions=100, clicks=1, purchases=1),
        _part(impressions=10, clicks=9, purchases=0),
    ])
    rates = finalise_census(totals)
    assert rates["click_rate"] == pytest.approx(10 / 110)   # not (0.01 + 0.9) / 2
    assert rates["purchase_rate"] == pytest.approx(1 / 10)
    assert rates["conversion_rate"] == pytest.approx(1 / 110)


def test_rates_are_none_when_the_denominator_is_zero():
    assert finalise_census(_part()) == {"click_rate": None, "purchase_rate": None, "conversion_rate": None}
    rates = finalise_census(_part(impressions=4))
    assert rates == {"click_rate": 0.0, "purchase_rate": None, "conversion_rate": 0.0}


def test_census_of_summary():
    summary = DataSummary(name="shop", users=3, items=4,
                          events={"impression": 10, "click": 3, "cart": 2, "purchase": 1})
    assert census_of(summary) == {
        "merchants": 1, "users": 3, "items": 4, "impressions": 10, "clicks": 3, "carts": 2, "purchases": 1,
        "events": 16,
    }


def test_local_census_counts_a_merchant_folder(tmp_path):
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "title": ["A", "B", "C"]})
    items.to_parquet(tmp_path / "items.parquet")
    rows = [("u1", "a", "impression"), ("u1", "a", "click"), ("u2", "b", "impression"), ("u2", "b", "click"),
            ("u2", "b", "cart"), ("u2", "b", "purchase"), ("u3", "c", "impression")]
    pd.DataFrame({
        "user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows], "event": [r[2] for r in rows],
        "timestamp": pd.date_range("2024-01-01", periods=len(rows), freq="min"),
    }).to_parquet(tmp_path / "events.parquet")
    assert local_census(tmp_path) == {
        "merchants": 1, "users": 3, "items": 3, "impressions": 3, "clicks": 2, "carts": 1, "purchases": 1,
        "events": 7,
    }


def test_format_lists_totals_and_rates():
    totals = _part(merchants=2, impressions=1000, clicks=50, purchases=5, events=1055)
    table = format_census(totals, finalise_census(totals))
    assert re.search(r"^impressions +\| +1,000$", table, re.MULTILINE)
    assert re.search(r"^click_rate +\| +5\.0000%$", table, re.MULTILINE)
    assert re.search(r"^purchase_rate +\| +10\.0000%$", table, re.MULTILINE)
    assert "n/a" not in table
    assert "n/a (denominator 0)" in format_census(_part(), finalise_census(_part()))
