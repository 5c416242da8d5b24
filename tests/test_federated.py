"""Federated training in process: the real ServerApp logic and the real ClientApp over a fake Grid."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from support import federation

from fedcvr.client.recommender import Recommender
from fedcvr.server.app import run_training
from fedcvr.server.config import ServerConfig
from fedcvr.shared.data.loader import load_merchant, merchant_folders
from fedcvr.shared.model.folder import load_model_folder


def test_fedavg_with_dp_trains_reports_epsilon_and_pushes_the_model_back(tiny_market, tiny_bert, tmp_path,
                                                                          server_identity):
    grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "run")
    summary = run_training(grid, run_config, ServerConfig.from_run_config(run_config))
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert 0 < rounds[0]["max-epsilon"] < rounds[1]["max-epsilon"] <= 8.0 * 1.0001
    assert all(0 < r["ctcvr.auc"] < 1 and r["bytes-sent"] > 0 and r["bytes-received"] > 0 for r in rounds)
    assert all(0 <= r["ndcg@10"] <= 1 for r in rounds)  # rank-validation = true by default
    # the round's time: the nodes' training (summed over the 3 nodes, and the slowest) and the aggregation
    assert all(0 < r["client-train-seconds-max"] <= r["client-train-seconds"] < r["seconds"] for r in rounds)
    assert all(0 <= r["aggregate-seconds"] < r["seconds"] for r in rounds)
    # and the slowest node's own evaluation, beside the sums (never merged into them)
    assert all(0 < r["client-evaluate-seconds-max"] < r["seconds"] for r in rounds)
    assert "evaluate-seconds" not in rounds[0] and "evaluate-seconds" not in summary["test"]
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == rounds
    assert 0 < summary["test"]["ctcvr.auc"] < 1
    version = summary["model_version"]
    assert set(summary["saved_by_nodes"].values()) == {version}
    for folder in merchant_folders(tiny_market):
        saved = tmp_path / "run" / "models" / folder.name
        assert (saved / "VERSION").read_text().strip() == version
        model, _, settings = load_model_folder(saved)
        assert settings["version"] == version and settings["merchant"] == folder.name
    # the pushed-back model ranks the merchant's catalog for one of its shoppers
    data = load_merchant(merchant_folders(tiny_market)[0])
    shopper = str(data.events["user_id"].iloc[0])
    recommender = Recommender(tmp_path / "run" / "models" / data.name, merchant_folders(tiny_market)[0])
    top = pd.DataFrame(recommender.recommend(shopper, k=5)["items"])
    bought = set(data.events.loc[(data.events.user_id == shopper) & (data.events.event == "purchase"), "item_id"])
    assert len(top) == 5 and top["p_ctcvr"].is_monotonic_decreasing and not set(top["item_id"]) & bought
    assert (abs(top["p_ctcvr"] - top["p_ctr"] * top["p_cvr"]) < 1e-6).all()


def test_no_shopper_data_leaves_a_node(tiny_market, tiny_bert, tmp_path, server_identity):
    """Every reply of every node carries only weights and numbers: no user id, item id, title or event row; and
    never the local item memory, which stays in the node's model folder (personalise = true, the default; kept
    whatever validation says, personalise-select = false, so that every node has one)."""
    grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "run", **{"num-server-rounds": 1,
                                                                             "personalise-select": False})
    summary = run_training(grid, run_config, ServerConfig.from_run_config(run_config))
    assert 0 < summary["test_personalised"]["ctcvr.auc"] < 1  # global + local, evaluated on each node
    for folder in merchant_folders(tiny_market):
        model, _, _ = load_model_folder(tmp_path / "run" / "models" / folder.name)
        assert (tmp_path / "run" / "models" / folder.name / "local.safetensors").is_file()
        assert model.memory is not None and model.memory.table.weight.abs().sum() > 0  # trained on the node
    replies = grid.replies
    secrets = set()
    for folder in merchant_folders(tiny_market):
        items = pd.read_parquet(folder / "items.parquet")
        events = pd.read_parquet(folder / "events.parquet")
        secrets |= set(events["user_id"]) | set(items["item_id"]) | set(items["title"]) | set(events["session_id"])
    assert replies
    for reply in replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        content = reply.content
        for record in content.config_records.values():
            for value in record.values():
                assert not (isinstance(value, str) and value in secrets)
        for record in content.metric_records.values():
            assert all(isinstance(v, int | float | list) for v in record.values())
        for record in content.array_records.values():
            assert all(not any(s in key for s in secrets) for key in record.keys())
            assert all(key.split(".")[0] in {"item_encoder", "user_tower", "head"} for key in record.keys())
            assert not any("memory" in key for key in record.keys())


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_other_strategies_run(tiny_market, tiny_bert, tmp_path, server_identity, strategy):
    grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "run",
                                  **{"strategy": strategy, "num-server-rounds": 2, "dp.enabled": False})
    summary = run_training(grid, run_config, ServerConfig.from_run_config(run_config))
    assert summary["strategy"] == strategy and len(summary["rounds"]) == 2
    assert "max-epsilon" not in summary["rounds"][0]
    # the weights sent stay float32: FedAdam's float64 arithmetic does not double the second round's download
    first, second = (row["bytes-sent"] for row in summary["rounds"])
    assert first == second > 0


def test_rank_validation_false_skips_ranking_in_rounds_not_in_the_final_test(tiny_market, tiny_bert, tmp_path,
                                                                            server_identity):
    grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "run",
                                  **{"num-server-rounds": 1, "dp.enabled": False, "rank-validation": False})
    summary = run_training(grid, run_config, ServerConfig.from_run_config(run_config))
    row = summary["rounds"][0]
    assert 0 < row["ctcvr.auc"] < 1 and "ndcg@10" not in row
    assert 0 <= summary["test"]["ndcg@10"] <= 1
