"""Shared fixtures: small generated data, written the way users write it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import support

from fedcvr.simulations import inprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_prefix_cache(tmp_path_factory):
    """Tests never write into the user's ~/.cache: the frozen-prefix cache lives in a temporary folder."""
    os.environ["FEDCVR_CACHE"] = str(tmp_path_factory.mktemp("prefix-cache"))

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


def make_tiny_bert(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny random BERT checkpoint with a word-level vocabulary of the synthetic catalog's words."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from fedcvr.simulations.vocab import CATEGORIES, COLOURS, QUALIFIERS

    words = {"a", "by", "made", "of", "in", "for", "great", "size", "with", "the"}
    for vocab in CATEGORIES:
        for group in (vocab.nouns, vocab.materials, vocab.brands, vocab.sizes, vocab.uses, (vocab.name,)):
            for phrase in group:
                words.update(phrase.lower().replace(",", " ").replace("&", " ").split())
    words.update(COLOURS)
    words.update(q[0].lower() for q in QUALIFIERS)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","]
    tokens = specials + sorted(words)
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokens), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def server_identity():
    """What the ServerApp process has when flwr runs it: instruction messages need a run and node id."""
    with inprocess.server_identity():
        yield


@pytest.fixture(scope="session")
def quality_market(tmp_path_factory):
    """The quality tests' marketplace (3 merchants, 80k events) and one centralised training on it with the
    packaged MiniLM (frozen embeddings): the reference both the centralised and the federated quality tests
    compare with, trained once per test session. -> (marketplace folder, `train_central` result)."""
    from fedcvr.shared.data.examples import ExampleConfig
    from fedcvr.shared.model.config import ModelConfig, TrainConfig
    from fedcvr.simulations.central import train_central
    from fedcvr.simulations.synth import SynthConfig, generate_marketplace

    root = tmp_path_factory.mktemp("quality")
    generate_marketplace(SynthConfig(merchants=3, items=600, shoppers=2000, events=80_000, seed=3), root / "market")
    result = train_central(root / "market", root / "central", ModelConfig.defaults(adapter_layers=0),
                           TrainConfig.defaults(epochs=5, batch_size=512, lr=0.006, threads=2),
                           ExampleConfig.defaults())
    return root / "market", result


def purchase_log(folder: Path, seed: int, shoppers: int = 80, items: int = 60, baskets: int = 8) -> Path:
    """A merchant's purchase log (no impressions): shoppers buy baskets of 1-4 items over 90 days, from a skewed
    popularity and with a habit of buying their own favourites again; invoices as session ids."""
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "wool", "steel", "oak", "linen", "glass", "cotton", "silver", "green"]
    nouns = ["mug", "scarf", "lamp", "bowl", "candle", "frame", "basket", "towel", "clock", "vase"]
    catalog = pd.DataFrame({"item_id": [f"i{k:03d}" for k in range(items)],
                            "title": [f"{words[k % 10]} {nouns[(k // 10) % 10]} {k}" for k in range(items)],
                            "price": rng.uniform(2, 40, items).round(2)})
    popularity = rng.zipf(1.6, items).astype(float)
    rows = []
    start = pd.Timestamp("2024-01-01")
    for shopper in range(shoppers):
        favourites = rng.choice(items, 3, replace=False, p=popularity / popularity.sum())
        for b in range(int(rng.integers(2, baskets + 1))):
            when = start + pd.Timedelta(minutes=int(rng.integers(0, 90 * 24 * 60)))
            size = int(rng.integers(1, 5))
            own = rng.random(size) < 0.5
            picked = np.where(own, rng.choice(favourites, size),
                              rng.choice(items, size, p=popularity / popularity.sum()))
            for item in np.unique(picked):
                rows.append((f"s{seed}-{shopper}", f"i{item:03d}", "purchase", when, f"inv-{seed}-{shopper}-{b}"))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event", "timestamp", "session_id"])
    return write_tables(folder, catalog, events.sort_values("timestamp"), fmt="parquet")


@pytest.fixture(scope="session")
def tiny_purchase_market(tmp_path_factory) -> Path:
    """Three merchants' purchase logs (implicit feedback), 2024-01-01 to 2024-03-31; cut e.g. at 2024-03-01."""
    out = tmp_path_factory.mktemp("purchases")
    for k, shoppers in enumerate((120, 80, 40), 1):
        purchase_log(out / f"shop-{k}", seed=k, shoppers=shoppers)
    return out


@pytest.fixture
def fake_bin(tmp_path):
    """A bin folder holding a fake `flwr` (`support.FAKE_FLWR`): the launcher's tests run it instead of Flower."""
    return support.write_fake_flwr(tmp_path / "bin")
