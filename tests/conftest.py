"""Shared fixtures: small generated data, written the way users write it."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def write_tables(folder: Path, items: pd.DataFrame | None, events: pd.DataFrame | None, fmt: str = "csv") -> Path:
    """Write a merchant folder in CSV or Parquet, as a user would."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("items", items), ("events", events)):
        if frame is None:
            continue
        if fmt == "csv":
            frame.to_csv(folder / f"{name}.csv", index=False)
        else:
            frame.to_parquet(folder / f"{name}.parquet", index=False)
    return folder


def good_items() -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": ["a", "b", "c"],
        "title": ["Red wool sweater", "Blue denim jeans", "Steel kettle"],
        "description": ["Warm", None, "Boils fast"],
        "category": ["Clothing", "Clothing", "Home"],
        "brand": ["Nordvik", "Alba", None],
        "price": [49.0, 59.5, None],
    })


def good_events() -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u2", "u2"],
        "item_id": ["a", "a", "b", "c", "c"],
        "event": ["impression", "click", "impression", "impression", "purchase"],
        "timestamp": ["2024-03-01T10:00:00Z", "2024-03-01T10:00:05Z", "2024-03-01 10:01", "1709287200",
                      "2024-03-01T11:00:30+00:00"],
        "session_id": ["s1", "s1", "s1", "s2", "s2"],
        "position": [1, None, 2, 1, None],
    })


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory) -> Path:
    """A small synthetic marketplace (3 merchants), generated once per test session."""
    from fedcvr.simulations.synth import SynthConfig, generate_marketplace

    out = tmp_path_factory.mktemp("market")
    generate_marketplace(SynthConfig(merchants=3, items=300, shoppers=400, events=12_000, seed=11), out)
    return out
