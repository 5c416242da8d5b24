"""Each merchant alone, with the federation's own settings, next to the federated model."""

from __future__ import annotations

import pytest
import torch
from support import federation

from fedcvr.server.app import run_training
from fedcvr.server.config import ServerConfig
from fedcvr.shared.data.loader import merchant_folders
from fedcvr.simulations.local_only import compare, initial_weights


def test_initial_weights_are_the_coordinators(tiny_market, tiny_bert, tmp_path, server_identity):
    grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "run", **{"num-server-rounds": 1})
    sent = []
    original = grid.send_and_receive

    def spy(messages, *, timeout=None):
        messages = list(messages)
        sent.extend(m for m in messages if m.metadata.message_type == "train")
        return original(messages, timeout=timeout)

    grid.send_and_receive = spy
    run_training(grid, run_config, ServerConfig.from_run_config(run_config))
    first = sent[0].content["arrays"].to_torch_state_dict()
    for name, value in initial_weights(run_config).items():
        torch.testing.assert_close(first[name], value)


@pytest.mark.slow  # whole runs: the integration lane (`make test-slow`)
def test_compare_trains_each_merchant_alone_with_the_runs_budget(tiny_market, tiny_bert, tmp_path, server_identity):
    grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "run")
    run_training(grid, run_config, ServerConfig.from_run_config(run_config))
    folders = merchant_folders(tiny_market)
    rounds_seen = []
    results = compare(folders, run_config, tmp_path / "run" / "model", on_round=rounds_seen.append)
    assert [r.merchant for r in results] == [f.name for f in folders]
    assert rounds_seen == [1, 2] * len(folders)
    for r in results:
        assert r.train_examples > 0 and r.test_purchases >= 0
        assert 0 < r.epsilon <= run_config["dp.target-epsilon"] * 1.0001
        scored = ("click.auc", "ctcvr.auc") if r.test_purchases else ("click.auc",)  # AUC needs positives
        assert all(0 <= r.alone[k] <= 1 and 0 <= r.federated[k] <= 1 for k in scored)
    # a lone model differs from the federated one (its own data only)
    assert any(r.alone["click.auc"] != pytest.approx(r.federated["click.auc"], abs=1e-9) for r in results)


def test_cli_compares_a_finished_run(tiny_market, tiny_bert, tmp_path, server_identity):
    from typer.testing import CliRunner

    from fedcvr.cli import app
    from fedcvr.shared.flower_app import RUN_CONFIG_FILE, write_run_config

    grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "run", **{"num-server-rounds": 1})
    run_training(grid, run_config, ServerConfig.from_run_config(run_config))
    keys = ("data-root", "out-dir", "num-server-rounds", "min-nodes", "model.encoder", "model.dim",
            "model.attention-hidden", "model.head-hidden", "model.max-text-tokens", "examples.history-length",
            "train.batch-size")
    write_run_config(tmp_path / "run" / RUN_CONFIG_FILE, {k: run_config[k] for k in keys})
    result = CliRunner().invoke(app, ["local-only", "--run", str(tmp_path / "run"), "--merchants", "merchant-01"])
    assert result.exit_code == 0, result.output
    assert "merchant-01" in result.output and "alone → fed" in result.output
    import json
    saved = json.loads((tmp_path / "run" / "local-only.json").read_text())
    assert [r["merchant"] for r in saved] == ["merchant-01"] and saved[0]["alone_epsilon"] > 0

    result = CliRunner().invoke(app, ["local-only", "--run", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not a finished simulation run" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["local-only", "--run", str(tmp_path / "run"), "--merchants", "shop-x"])
    assert result.exit_code == 2 and "shop-x" in result.output


def test_inprocess_federation_keeps_each_nodes_test_sums(tiny_market, tiny_bert, tmp_path):
    """A grid's per-merchant test rows come from the nodes' own replies to the final test evaluation: the same
    metrics as evaluating the saved global model on each merchant's test split again, without the second pass."""
    from fedcvr.client.node import MerchantNode, NodeSettings
    from fedcvr.shared.metrics import merge_evaluations
    from fedcvr.shared.model.folder import load_model_folder
    from fedcvr.shared.model.weights import trainable_state
    from fedcvr.simulations.inprocess import run_federation
    from fedcvr.simulations.local_only import test_metrics

    _, run_config = federation(tiny_market, tiny_bert, tmp_path / "run", **{"num-server-rounds": 1,
                                                                             "dp.enabled": False})
    folders = merchant_folders(tiny_market)
    summary = run_federation(run_config, len(folders))
    assert sorted(summary["test_sums"]) == list(range(len(folders)))
    weights = trainable_state(load_model_folder(tmp_path / "run" / "model")[0])
    settings = NodeSettings.from_run_config(run_config)
    for index, folder in enumerate(folders):
        node = MerchantNode(folder, settings)
        assert summary["train_sizes"][index] == node.train_size()  # the examples its train replies reported
        again = test_metrics(node, weights)
        kept = merge_evaluations([summary["test_sums"][index]])
        assert kept.keys() == again.keys() and "rank.n" in kept  # the final test ranks
        assert kept == pytest.approx(again, abs=1e-9)
    # the nodes' sums add up to the server's test metrics over all merchants
    assert merge_evaluations(list(summary["test_sums"].values())) == pytest.approx(summary["test"], abs=1e-9)
