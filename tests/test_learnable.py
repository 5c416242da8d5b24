"""Training refuses examples it cannot learn from (one class of labels), saying why: the node's round, its
ClientApp reply, and centralised training; learnable data still trains."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
from typer.testing import CliRunner

from fedcvr.cli import app
from fedcvr.client.app import app as client_app
from fedcvr.client.node import NodeSettings
from fedcvr.shared.data.examples import ExampleConfig
from fedcvr.shared.data.loader import load_merchant, merchant_folders
from fedcvr.shared.dp_config import DPConfig
from fedcvr.shared.model.encoder import load_backbone
from fedcvr.shared.model.esmm import ConversionModel
from fedcvr.shared.model.weights import trainable_state
from fedcvr.shared.privacy import PrivacyLedger
from fedcvr.shared.training.learnable import UnlearnableDataError, label_problem, refuse_unlearnable
from fedcvr.shared.training.local import train_round
from fedcvr.shared.training.loop import ItemSide
from fedcvr.shared.training.prepare import prepare


def write_folder(folder: Path, n_items: int, rows: list[tuple[str, str, str]]) -> Path:
    """rows: (user, item, event), one minute apart from 2024-03-01."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)],
                  "title": [f"Item {k}" for k in range(n_items)]}).to_parquet(folder / "items.parquet")
    pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows], "event": [r[2] for r in rows],
                  "timestamp": pd.date_range("2024-03-01", periods=len(rows), freq="min")}
                 ).to_parquet(folder / "events.parquet")
    return folder


def one_item_purchases(folder: Path) -> Path:
    """An Amazon import by brand's one-item folder: purchases of its only item, no impressions."""
    return write_folder(folder, 1, [(f"u{k}", "i0", "purchase") for k in range(10)])


def train_split(folder: Path):
    prepared = prepare([load_merchant(folder)], ExampleConfig.defaults())
    return prepared.splits["train"], len(prepared.catalog)


def test_label_problem_names_each_unlearnable_kind(tmp_path):
    train, items = train_split(one_item_purchases(tmp_path / "one"))
    reason = label_problem(train, items)
    assert reason.startswith(f"all {len(train)} training examples are positive (its catalog holds 1 item")
    assert "fix: add the merchant's other items" in reason
    no_clicks = [(f"u{k}", f"i{k % 2}", "impression") for k in range(10)]
    train, items = train_split(write_folder(tmp_path / "cold", 2, no_clicks))
    assert label_problem(train, items).startswith(f"none of the {len(train)} training examples is clicked")
    mixed = [(f"u{k}", f"i{k % 2}", e) for k in range(5) for e in ("impression", "click")][:-2] + no_clicks
    train, items = train_split(write_folder(tmp_path / "ok", 2, mixed))
    assert label_problem(train, items) is None


@pytest.fixture
def node_setup(tiny_bert, tmp_path):
    run_config = {"data-root": str(one_item_purchases(tmp_path / "market" / "brand-x")),
                  "model.encoder": str(tiny_bert), "model.dim": 8, "model.attention-hidden": 8,
                  "model.head-hidden": 8, "model.max-text-tokens": 32, "examples.history-length": 8,
                  "out-dir": str(tmp_path / "run"), "num-server-rounds": 2}
    settings = NodeSettings.from_run_config(run_config)
    torch.manual_seed(0)
    model = ConversionModel(load_backbone(settings.model.encoder), settings.model)
    return run_config, model


def test_a_node_declines_a_one_item_purchase_log_without_spending_privacy(node_setup, tmp_path):
    run_config, model = node_setup
    prepared = prepare([load_merchant(Path(run_config["data-root"]))], ExampleConfig.defaults(history_length=8))
    side = ItemSide(None, torch.from_numpy(prepared.catalog.numeric))  # never encoded: the round declines first
    ledger = PrivacyLedger()
    result = train_round(model, side, prepared.splits["train"], lr=0.01, batch_size=8, local_epochs=1,
                         dp=DPConfig.defaults(target_epsilon=4.0), ledger=ledger, rounds=2, seed=0,
                         device=torch.device("cpu"))
    assert not result.trained and result.steps == 0 and "training examples are positive" in result.reason
    assert ledger.rounds_trained == 0 and ledger.epsilon() == 0


def test_the_client_app_replies_with_the_reason(node_setup):
    run_config, model = node_setup
    metadata = Metadata(run_id=1, message_id="t1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=600.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord(trainable_state(model)),
                          "config": ConfigRecord({"server-round": 1})})
    context_config = {"partition-id": 0, "num-partitions": 1}
    from flwr.app import Context

    context = Context(run_id=1, node_id=7, node_config=context_config, state=RecordDict(), run_config=run_config)
    reply = client_app(Message(content=content, metadata=metadata), context)
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith("declined to train: all ") and "its catalog holds 1 item" in reason
    assert "fix:" in reason


def test_central_training_refuses_all_positive_merchants_and_names_the_others(tiny_market, tiny_bert, tmp_path):
    market = tmp_path / "market"
    market.mkdir()
    for folder in merchant_folders(tiny_market)[:2]:
        shutil.copytree(folder, market / folder.name)
    one_item_purchases(market / "brand-x")
    prepared = prepare([load_merchant(f) for f in merchant_folders(market)], ExampleConfig.defaults())
    with pytest.raises(UnlearnableDataError, match=r"brand-x: all \d+ training examples are positive"):
        refuse_unlearnable(prepared)
    result = CliRunner().invoke(app, ["train-central", "--data", str(market), "--out", str(tmp_path / "m"),
                                      "--encoder", str(tiny_bert), "--epochs", "1"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "cannot train on 1 merchant folder(s) whose training examples are all positive" in text
    assert "--merchants merchant-01,merchant-02" in text and "Traceback" not in text
    assert not (tmp_path / "m").exists()


def test_central_training_keeps_a_merchant_without_clicks_in_a_learnable_pool(tiny_market, tmp_path):
    cold = write_folder(tmp_path / "cold", 2, [(f"u{k}", f"i{k % 2}", "impression") for k in range(10)])
    pool = [load_merchant(merchant_folders(tiny_market)[0]), load_merchant(cold)]
    refuse_unlearnable(prepare(pool, ExampleConfig.defaults()))  # true negatives: kept
    with pytest.raises(UnlearnableDataError, match=r"pooled training split: none of the \d+ training"):
        refuse_unlearnable(prepare([load_merchant(cold)], ExampleConfig.defaults()))
    assert np.isfinite(prepare(pool, ExampleConfig.defaults()).catalog.numeric).all()
