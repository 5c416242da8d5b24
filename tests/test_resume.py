"""Checkpoints after every round, and resuming a stopped run: the result equals an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from support import federation, pyproject_run_config

from fedcvr.client.node import LEDGER_FILE
from fedcvr.server.app import run_training
from fedcvr.server.checkpoint import CheckpointError, load_checkpoint
from fedcvr.server.config import ConfigError, ServerConfig


class Stopped(RuntimeError):
    """Stands for the coordinator being killed."""


def stop_before_round(grid, stop_round: int):
    """Make `grid` fail when the train messages of `stop_round` go out, as a killed coordinator would."""
    original = grid.send_and_receive

    def send(messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train" and m.content["config"]["server-round"] == stop_round
               for m in messages):
            raise Stopped(f"stopped before round {stop_round}")
        return original(messages, timeout=timeout)

    grid.send_and_receive = send
    return grid


def weights(run):
    return load_file(str(run / "model" / "weights.safetensors"))


TIMES = ("seconds", "client-train-seconds", "client-train-seconds-max", "client-evaluate-seconds-max",
         "aggregate-seconds")


def metrics_of(rows):
    """A round's record without its wall-clock times, which no two runs share."""
    return [{k: v for k, v in row.items() if k not in TIMES} for row in rows]


@pytest.mark.parametrize("strategy, dp", [pytest.param("fedavg", True, marks=pytest.mark.slow), ("fedadam", False)])
def test_resumed_run_equals_uninterrupted_run(tiny_market, tiny_bert, tmp_path, server_identity, strategy, dp):
    settings = {"num-server-rounds": 3, "strategy": strategy, "dp.enabled": dp}
    grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "whole", **settings)
    whole = run_training(grid, run_config, ServerConfig.from_run_config(run_config))

    grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "stopped", **settings)
    with pytest.raises(Stopped):
        run_training(stop_before_round(grid, 3), run_config, ServerConfig.from_run_config(run_config))
    checkpoint = load_checkpoint(tmp_path / "stopped")
    assert checkpoint.round == 2 and len(checkpoint.history) == 2
    assert bool(checkpoint.optimizer) == (strategy == "fedadam")  # FedAdam's m_t and v_t travel with it
    if dp:  # each node kept its privacy ledger on disk
        ledgers = list((tmp_path / "stopped" / "models").glob(f"*/{LEDGER_FILE}"))
        assert len(ledgers) == 3
        assert all(json.loads(p.read_text())["ledger"]["rounds-trained"] == 2 for p in ledgers)

    # a fresh coordinator and fresh node processes (empty node state) continue the stopped run
    grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "stopped",
                                  **settings, resume=str(tmp_path / "stopped"))
    resumed = run_training(grid, run_config, ServerConfig.from_run_config(run_config))
    assert resumed["resumed_from_round"] == 2
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert metrics_of(resumed["rounds"]) == metrics_of(whole["rounds"])
    assert resumed["test"] == whole["test"]
    assert resumed["model_version"] == whole["model_version"]
    for name, value in weights(tmp_path / "whole").items():
        torch.testing.assert_close(weights(tmp_path / "stopped")[name], value, rtol=0, atol=0)
    lines = (tmp_path / "stopped" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    if dp:  # ε went on from the ledger on disk, not from zero
        assert resumed["rounds"][-1]["max-epsilon"] == pytest.approx(whole["rounds"][-1]["max-epsilon"])


def test_resume_refuses_a_checkpoint_that_does_not_fit(tiny_market, tiny_bert, tmp_path, server_identity):
    grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "run", **{"num-server-rounds": 1,
                                                                                "dp.enabled": False})
    run_training(grid, run_config, ServerConfig.from_run_config(run_config))
    cases = [
        ({"resume": str(tmp_path / "nowhere")}, "no checkpoint there"),
        ({"resume": str(tmp_path / "run"), "num-server-rounds": 1}, "raise num-server-rounds above 1"),
        ({"resume": str(tmp_path / "run"), "num-server-rounds": 2, "strategy": "fedadam"}, "strategy = 'fedavg'"),
        ({"resume": str(tmp_path / "run"), "num-server-rounds": 2, "model.dim": 16}, "do not fit this run's model"),
    ]
    for overrides, message in cases:
        grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "again",
                                      **{"dp.enabled": False, **overrides})
        with pytest.raises(CheckpointError, match=message):
            run_training(grid, run_config, ServerConfig.from_run_config(run_config))
        assert not grid.sent  # refused before any node was asked anything


def test_resume_must_be_an_absolute_path():
    with pytest.raises(ConfigError, match="absolute path"):
        ServerConfig.from_run_config({**pyproject_run_config(), "resume": "runs/x"})
