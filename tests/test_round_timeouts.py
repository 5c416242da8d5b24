"""Rounds that time out: the run keeps a model that fits (`server/app.py`)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from support import TamperingGrid, pyproject_run_config

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


class _Clocked:
    """A grid that answers every message (or all but `drop`) after `seconds[kind]` of a fake clock."""

    def __init__(self, seconds: dict[str, float]):
        self.now = 0.0
        self.seconds = seconds
        self.asked: list[tuple[str, float]] = []
        self.drop = 0

    def clock(self) -> float:
        return self.now

    def send_and_receive(self, messages, *, timeout=None):
        kind = messages[0].metadata.message_type
        self.asked.append((kind, timeout))
        self.now += min(self.seconds[kind], timeout)
        return [object() for _ in messages[self.drop:]]

    def get_node_ids(self):
        return [1, 2, 3]


class _Meta:
    def __init__(self, kind: str):
        self.message_type = kind


class _Msg:
    def __init__(self, kind: str):
        self.metadata = _Meta(kind)


def test_waits_follow_the_time_the_nodes_took(caplog):
    """The first training batch took 50 s of a 60 s round-timeout: later ones may take 2 x 50 s; other kinds of
    message keep their own measure; a batch with a missing reply does not count as a measure."""
    from fedcvr.server.pacing import PacedGrid

    inner = _Clocked({"train": 50.0, "evaluate": 5.0})
    grid = PacedGrid(inner, round_timeout=60, clock=inner.clock)
    with caplog.at_level(logging.INFO, logger="flwr"):  # other tests may leave flwr's logger above INFO
        for kind in ("train", "evaluate", "train", "evaluate"):
            assert len(list(grid.send_and_receive([_Msg(kind)] * 3, timeout=60))) == 3
    assert inner.asked == [("train", 60), ("evaluate", 60), ("train", 100), ("evaluate", 60)]
    assert "Waiting up to 100 s for 3 train replies: 2 x the 50 s" in caplog.text
    inner.seconds["train"], inner.drop = 500.0, 1  # a node did not answer: the wait ran out, nothing learnt
    grid.send_and_receive([_Msg("train")] * 3, timeout=60)
    assert grid.timeout_for("train", 60) == 100 and grid.get_node_ids() == [1, 2, 3]


def _row(number: int, trained: int, *reasons: str) -> dict:
    return {"round": number, "nodes-trained": trained, "failed": [{"node": i, "reason": r} for i, r in
                                                                  enumerate(reasons)]}


def test_a_run_whose_nodes_never_answer_in_time_stops_with_the_reason_and_the_fix():
    from fedcvr.server.pacing import RoundsTimedOut, check_progress

    late = "no reply within round-timeout = 60 s"
    rows = [_row(1, 3), _row(2, 0, late, late, late)]
    check_progress(rows, 60)  # one round can be a passing spike
    rows.append(_row(3, 0, late, "secure aggregation halted"))
    with pytest.raises(RoundsTimedOut, match=r"rounds 2, 3 produced no update.*round-timeout = 60 s.*checkpoint "
                                             r"holds the model of round 1.*--resume OUT.*round-timeout=600"):
        check_progress(rows, 60)
    # rounds that failed for other reasons, or in which some node trained, are no stall
    check_progress([_row(1, 0, late), _row(2, 0, "ValueError: bad data")], 60)
    check_progress([_row(1, 0, late), _row(2, 1, late)], 60)


def test_run_training_stops_when_two_rounds_in_a_row_get_no_answer_in_time(tiny_market, tiny_bert, tmp_path):
    """Nodes that never answer within round-timeout: the run used to go on through every planned round for
    nothing (and then fail on empty weights); it stops after two such rounds, checkpoint written."""
    from fedcvr.server.checkpoint import checkpoint_folder, load_checkpoint
    from fedcvr.server.pacing import RoundsTimedOut

    out = tmp_path / "run"
    run_config = small_run_config(tiny_market, tiny_bert, out, **{"num-server-rounds": 5})
    with pytest.raises(RoundsTimedOut, match="rounds 1, 2 produced no update: no node answered within "
                                             "round-timeout = 30 s"):
        run_in_process(run_config, lambda node, sent, reply: None)
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 2
    assert load_checkpoint(checkpoint_folder(out)).round == 2


class _PushPull:
    """A Grid with push and pull: each message's reply is ready `ready[i]` pulls after it was pushed."""

    def __init__(self, ready: list[int]):
        self.ready, self.pulls, self.now = ready, 0, 0.0

    def clock(self) -> float:
        return self.now

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        self.now += 1.0
        return [_Reply(i) for i in sorted(ids) if self.ready[int(i[1:])] <= self.pulls]


class _Reply:
    def __init__(self, reply_to: str):
        self.metadata = type("Meta", (), {"reply_to_message_id": reply_to})()


def test_replies_are_collected_as_they_come_and_the_wait_ends_at_the_timeout():
    from fedcvr.server.pacing import PacedGrid

    inner = _PushPull([1, 3, 2])
    grid = PacedGrid(inner, round_timeout=60, clock=inner.clock, poll=0.0)
    replies = list(grid.send_and_receive([_Msg("train")] * 3, timeout=60))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"] and inner.pulls == 3
    late = _PushPull([1, 100, 1])  # one node never answers within the 5 s the wait allows
    grid = PacedGrid(late, round_timeout=5, clock=late.clock, poll=0.0)
    replies = list(grid.send_and_receive([_Msg("evaluate")] * 3, timeout=5))
    assert len(replies) == 2 and late.pulls == 5
