"""The synthetic marketplace: contract, determinism, non-IID merchants, a learnable ground truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedcvr.cli import app
from fedcvr.shared.data.loader import load_merchant, merchant_folders
from fedcvr.simulations import synth
from fedcvr.simulations.synth import SynthConfig, generate_marketplace


def read(folder):
    return pd.read_parquet(folder / "items.parquet"), pd.read_parquet(folder / "events.parquet")


def auc(score, label):
    order = np.argsort(score)
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    pos = label.astype(bool)
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


def test_every_merchant_folder_meets_the_contract(tiny_market):
    folders = merchant_folders(tiny_market)
    assert [f.name for f in folders] == ["merchant-01", "merchant-02", "merchant-03"]
    for folder in folders:
        data = load_merchant(folder)
        assert set(data.events["event"]) == {"impression", "click", "cart", "purchase"}
    meta = json.loads((tiny_market / "marketplace.json").read_text())
    assert meta["config"]["seed"] == 11 and len(meta["merchants"]) == 3


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    config = SynthConfig(merchants=2, items=100, shoppers=60, events=2_000, seed=4)
    generate_marketplace(config, tmp_path / "a")
    generate_marketplace(config, tmp_path / "b")
    generate_marketplace(SynthConfig(merchants=2, items=100, shoppers=60, events=2_000, seed=5), tmp_path / "c")
    for name in ("merchant-01", "merchant-02"):
        items_a, events_a = read(tmp_path / "a" / name)
        items_b, events_b = read(tmp_path / "b" / name)
        pd.testing.assert_frame_equal(items_a, items_b)
        pd.testing.assert_frame_equal(events_a, events_b)
    assert not read(tmp_path / "a" / "merchant-01")[1].equals(read(tmp_path / "c" / "merchant-01")[1])


def test_merchants_are_not_iid(tiny_market):
    folders = merchant_folders(tiny_market)
    mixes, sizes, conversion, prices = [], [], [], []
    for folder in folders:
        items, events = read(folder)
        mixes.append(items["category"].value_counts(normalize=True))
        sizes.append(len(events))
        counts = events["event"].value_counts()
        conversion.append(counts["purchase"] / counts["impression"])
        prices.append(items.groupby("category")["price"].median())
    mix = pd.DataFrame(mixes).fillna(0.0).to_numpy()
    total_variation = max(0.5 * np.abs(mix[a] - mix[b]).sum() for a in range(3) for b in range(a + 1, 3))
    assert total_variation > 0.3, "category mixes should differ between merchants"
    assert max(sizes) / min(sizes) > 2.5, "merchant sizes should be heavy-tailed"
    assert max(conversion) / min(conversion) > 1.3, "conversion levels should differ"
    ids = [set(read(f)[0]["item_id"]) for f in folders]
    sold_by = pd.Series([i for s in ids for i in s]).value_counts()
    assert (sold_by > 1).any(), "some items are sold by several merchants"
    assert (sold_by == 1).mean() > 0.8, "most items belong to one merchant"


def test_funnel_is_consistent_and_purchases_imply_clicks(tiny_market):
    for folder in merchant_folders(tiny_market):
        _, events = read(folder)
        key = ["user_id", "item_id", "session_id"]
        first = events.sort_values("timestamp").groupby(key + ["event"])["timestamp"].min().unstack()
        bought = first["purchase"].notna()
        assert first.loc[bought, "click"].notna().all() and first.loc[bought, "cart"].notna().all()
        assert (first.loc[bought, "click"] < first.loc[bought, "purchase"]).all()
        assert (first["impression"].notna()).all(), "every click, cart and purchase follows an impression"
        imp = events[events["event"] == "impression"]
        assert imp[["true_p_click", "true_p_purchase"]].notna().all().all()
        assert events.loc[events["event"] != "impression", "true_p_click"].isna().all()
        assert (imp["true_p_purchase"] <= imp["true_p_click"]).all()


def test_ground_truth_predicts_behaviour_and_lives_in_the_text(tiny_market):
    folder = merchant_folders(tiny_market)[0]
    items, events = read(folder)
    imp = events[events["event"] == "impression"]
    clicks = set(map(tuple, events.loc[events["event"] == "click", ["session_id", "item_id"]].to_numpy()))
    clicked = np.array([(s, i) in clicks for s, i in imp[["session_id", "item_id"]].to_numpy()])
    assert auc(imp["true_p_click"].to_numpy(), clicked) > 0.7
    # the attributes the ground truth uses are words of the title and description
    for row in items.itertuples():
        assert row.brand in row.title and row.brand in row.description
    premium = items["title"].str.contains(" Premium | Deluxe | Pro ", regex=True)
    assert items.loc[premium, "price"].median() > 1.4 * items.loc[~premium, "price"].median()


def test_chunks_stream_to_parquet(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "EVENTS_PER_CHUNK", 320)  # 20 events a shopper: 16 a chunk
    calls = []
    generate_marketplace(SynthConfig(merchants=1, items=40, shoppers=50, events=1_000, seed=2), tmp_path,
                         progress=lambda done, total: calls.append(done))
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "merchant-01" / "events.parquet").num_row_groups == 4
    assert len(calls) == 4 and calls == sorted(calls)
    load_merchant(tmp_path / "merchant-01")


def test_default_size_is_about_what_the_issue_promises(tmp_path):
    meta = generate_marketplace(SynthConfig(), tmp_path)
    events = sum(sum(m["events"].values()) for m in meta["merchants"])
    assert 150_000 < events < 250_000
    assert sum(m["shoppers"] for m in meta["merchants"]) == 5_000
    unique_items = set()
    for folder in merchant_folders(tmp_path):
        unique_items |= set(read(folder)[0]["item_id"])
    assert 1_800 <= len(unique_items) <= 2_000


@pytest.mark.parametrize("args, message", [
    (["--merchants", "0"], "--merchants must be at least 1"),
    (["--items", "10"], "--items 10 is too small"),
    (["--events", "5"], "--events 5 is too small"),
])
def test_cli_synth_rejects_bad_sizes(tmp_path, args, message):
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "m"), *args])
    assert result.exit_code == 2 and message in result.output


def test_cli_synth_writes_and_refuses_to_overwrite(tmp_path):
    args = ["data", "synth", "--out", str(tmp_path), "--merchants", "2", "--items", "80", "--shoppers", "40",
            "--events", "800"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "wrote 2 merchant folders" in first.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
