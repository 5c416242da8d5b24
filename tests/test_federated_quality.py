"""A small version of the federated quality claims, with the packaged MiniLM (frozen embeddings) on a small
synthetic marketplace: FedAvg without DP reaches 0.95 of centralised training's test CTCVR AUC, and with DP-SGD at
ε = 8 the federated model predicts the smallest merchant's purchases better than that merchant training alone under
the same budget. The full-size figures are in the reference experiments (simulations/results/)."""

from __future__ import annotations

import pytest
from support import RecordingGrid, pyproject_run_config

from fedcvr.server.app import run_training
from fedcvr.server.config import ServerConfig
from fedcvr.shared.data.loader import merchant_folders
from fedcvr.simulations.local_only import compare


@pytest.mark.slow
def test_fedavg_approaches_central_and_beats_the_smallest_merchant_alone(tmp_path, server_identity, quality_market):
    market, central_result = quality_market  # centralised training on the union, 5 epochs, batch 512
    central = central_result.metrics["test"]["model"]["ctcvr.auc"]

    folders = merchant_folders(market)
    run_config = {**pyproject_run_config(), "data-root": str(market), "out-dir": str(tmp_path / "run"),
                  "min-nodes": len(folders), "num-server-rounds": 5, "dp.enabled": False, "train.threads": 2}

    def federate(**overrides) -> dict:
        config = {**run_config, **overrides}
        grid = RecordingGrid(config, len(folders))
        return run_training(grid, config, ServerConfig.from_run_config(config))

    federated = federate()["test"]["ctcvr.auc"]
    assert federated >= 0.95 * central, (federated, central)

    private = {"dp.enabled": True, "dp.target-epsilon": 8.0, "out-dir": str(tmp_path / "dp")}
    federate(**private)
    smallest = min(folders, key=lambda f: (f / "events.parquet").stat().st_size)
    [alone] = compare([smallest], {**run_config, **private}, tmp_path / "dp" / "model")
    assert alone.epsilon <= 8.0 * 1.0001
    # The smallest merchant's test split has about 1,300 impressions but only 7 purchases: its CTCVR AUC moves by
    # more than the two models differ (measured: 0.5461 federated, 0.5472 alone), so the claim is checked with the
    # log loss of P(purchase), a proper score over every test impression (measured: 0.0836 against 0.0936), and
    # the AUC only for not being clearly worse.
    assert alone.federated["ctcvr.logloss"] < alone.alone["ctcvr.logloss"], alone.to_json()
    assert alone.federated["ctcvr.auc"] > alone.alone["ctcvr.auc"] - 0.02, alone.to_json()
