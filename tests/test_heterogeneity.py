"""How alike the clients are: catalog and best-seller overlap, computed by hand on three tiny merchants."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import write_tables
from fedcvr.simulations.heterogeneity import client_overlap, overlap_of_results


def merchant(folder, catalog: str, bought: str):
    """A merchant whose catalog is the letters of `catalog` and who bought each letter of `bought` once."""
    items = pd.DataFrame({"item_id": list(catalog), "title": [f"Item {i}" for i in catalog]})
    times = [f"2024-03-01T10:{k:02d}:00Z" for k in range(len(bought))]
    events = pd.DataFrame({"user_id": [f"u{k % 3}" for k in range(len(bought))], "item_id": list(bought),
                           "event": "purchase", "timestamp": times})
    # an impression of an item never bought does not make it a best seller
    events = pd.concat([events, pd.DataFrame({"user_id": ["u9"] * 5, "item_id": [catalog[-1]] * 5,
                                              "event": "impression", "timestamp": "2024-03-02T10:00:00Z"})])
    return write_tables(folder, items, events)


@pytest.fixture
def three(tmp_path):
    root = tmp_path / "market"
    merchant(root / "m1", "abcd", "aaabbc")  # best two: a, b
    merchant(root / "m2", "abe", "aee")      # best two: e, a
    merchant(root / "m3", "f", "f")          # best: f
    return root


def test_overlap_by_hand(three):
    rows = client_overlap(three, top=2).set_index("merchant")
    m1, m2, m3 = rows.loc["m1"], rows.loc["m2"], rows.loc["m3"]
    assert (m1["catalog items"], m1["items bought"], m1["shoppers"]) == (4, 3, 4)  # u0-u2 and the impression's u9
    assert m1["catalog shared"] == pytest.approx(2 / 4)       # a, b are sold by m2 too
    assert m1["catalog Jaccard"] == pytest.approx((2 / 5 + 0 / 5) / 2)
    assert m1["best sellers shared"] == pytest.approx((1 + 0) / (2 * 2))  # a in m2's top 2, nothing in m3's
    assert m2["catalog shared"] == pytest.approx(2 / 3)
    assert m2["best sellers shared"] == pytest.approx((1 + 0) / (2 * 2))
    assert (m3["catalog shared"], m3["catalog Jaccard"], m3["best sellers shared"]) == (0, 0, 0)


def test_one_client_has_nothing_to_compare(tmp_path):
    merchant(tmp_path / "only", "ab", "a")
    row = client_overlap(tmp_path).iloc[0]
    assert row["catalog items"] == 2 and pd.isna(row["catalog shared"]) and pd.isna(row["best sellers shared"])


def test_top_must_be_positive(three):
    with pytest.raises(ValueError, match="at least 1"):
        client_overlap(three, top=0)


def test_results_keep_the_overlap_so_the_report_needs_no_data(tmp_path, three):
    results = tmp_path / "results"
    results.mkdir()
    assert overlap_of_results(results, None) is None
    assert overlap_of_results(results, str(tmp_path / "gone")) is None
    computed = overlap_of_results(results, str(three), top=2)
    saved = json.loads((results / "clients.json").read_text())
    assert saved["top"] == 2 and [m["merchant"] for m in saved["merchants"]] == ["m1", "m2", "m3"]
    again = overlap_of_results(results, str(tmp_path / "gone"))  # read back, no data needed
    assert again.attrs["top"] == 2
    pd.testing.assert_frame_equal(again, computed, check_dtype=False)
