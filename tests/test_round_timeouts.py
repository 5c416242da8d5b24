"""Rounds that time out: the run keeps a model that fits (`server/app.py`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_flower_app import pyproject_run_config
from test_robust import TamperingGrid

from fedcvr.client import node as node_module
from fedcvr.server.app import run_training
from fedcvr.server.config import ServerConfig
from fedcvr.shared.model.config import ModelConfig
from fedcvr.shared.model.esmm import initial_model
from fedcvr.shared.model.weights import trainable_state
from fedcvr.simulations.inprocess import server_identity


def small_run_config(market, tiny_bert, out, **overrides) -> dict:
    return {**pyproject_run_config(), "data-root": str(market), "out-dir": str(out), "min-nodes": 3,
            "model.encoder": str(tiny_bert), "model.dim": 8, "model.attention-hidden": 8, "model.head-hidden": 8,
            "model.max-text-tokens": 32, "examples.history-length": 8, "train.batch-size": 128,
            "num-server-rounds": 1, "dp.enabled": False, "round-timeout": 30, **overrides}


def run_in_process(run_config: dict, tamper) -> dict:
    kept = node_module.NODES_KEPT["count"]
    node_module.NODES_KEPT["count"] = 3
    try:
        with server_identity():
            return run_training(TamperingGrid(run_config, 3, tamper), run_config,
                                ServerConfig.from_run_config(run_config))
    finally:
        node_module.NODES_KEPT["count"] = kept
        node_module._NODES.clear()


def test_a_run_in_which_no_round_produced_an_update_keeps_the_model_it_started_from(tiny_market, tiny_bert,
                                                                                   tmp_path):
    """Every node's training reply is lost (as when no node answers within round-timeout, or SecAgg+ halts):
    Flower's Result then holds no arrays, which the ServerApp took for the final model, so the test evaluation and
    the push-back got empty weights and the run failed at the end with "the weights do not fit this model
    (missing: head.ctr.0.bias, ...)". The model the run began from is the final one."""
    run_config = small_run_config(tiny_market, tiny_bert, tmp_path / "run")
    summary = run_in_process(run_config, lambda node, sent, reply: None)  # no training reply arrives

    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert rows[0]["nodes-failed"] == 3 and "round-timeout" in rows[0]["failed"][0]["reason"]
    assert 0 < summary["test"]["ctcvr.auc"] < 1  # the nodes evaluated a model that fits
    assert set(summary["saved_by_nodes"].values()) == {summary["model_version"]}
    model, _ = initial_model(ModelConfig.from_run_config(run_config), int(run_config.get("seed", 0)))
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / "run" / "model" / "weights.safetensors"))
    for name, value in trainable_state(model).items():
        np.testing.assert_array_equal(saved[name], value.numpy())


@pytest.mark.parametrize("arrays", [{}, {"only": 1}])
def test_final_arrays_takes_the_result_only_when_a_round_aggregated(arrays):
    import torch
    from flwr.app import ArrayRecord

    from fedcvr.server.app import final_arrays

    initial = ArrayRecord({"w": torch.zeros(2)})
    result = ArrayRecord({name: torch.ones(2) for name in arrays})
    assert final_arrays(result, initial, 2) is (result if arrays else initial)
