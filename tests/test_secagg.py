"""Secure aggregation (SecAgg+) in process: the real ServerApp logic and ClientApp over a fake Grid."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from support import federation, node_context, pyproject_run_config

from fedcvr.client.secagg import secure_train
from fedcvr.server.app import run_training
from fedcvr.server.config import ConfigError, SecAggConfig, ServerConfig
from fedcvr.server.secagg import SecAggError, SecAggGrid, merge_node_metrics

SECAGG = SecAggConfig.from_run_config({"secagg": True})  # SecAgg+ with the declared shares, threshold and ranges


class SecureNodes:
    """A Grid of nodes that run only the SecAgg+ stages around a given train function (no model, no data)."""

    def __init__(self, updates: dict[int, tuple[dict[str, np.ndarray], int]], drop_at: dict[int, str] | None = None):
        self.contexts = {node: node_context(node, {}, {}) for node in updates}
        self.sent: list[Message] = []
        self.updates = updates
        self.drop_at = drop_at or {}
        self.dropped: set[int] = set()

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.sent.append(message)
            message = copy.deepcopy(message)  # what a real transport delivers
            if message.metadata.message_type == "query.train_size":
                size = MetricRecord({"train-size": self.updates[node][1]})
                replies.append(Message(RecordDict({"size": size}), reply_to=message))
                continue
            stage = message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if self.drop_at.get(node) == stage:
                self.dropped.add(node)
            if node in self.dropped:
                continue
            arrays, examples = self.updates[node]
            train = lambda _weights, _config, a=arrays, n=examples: (  # noqa: E731
                {k: torch.from_numpy(v) for k, v in a.items()}, {"num-examples": n, "train-loss": 0.5})
            replies.append(secure_train(message, self.contexts[node], train))
        return replies

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)


def instructions(nodes: list[int], arrays: dict[str, np.ndarray]) -> list[Message]:
    record = ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()})
    return [Message(RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=node, message_type="train") for node in nodes]


def three_updates(rng: np.random.Generator) -> dict[int, tuple[dict[str, np.ndarray], int]]:
    return {node: ({"a.weight": rng.normal(0, 0.3, (4, 3)).astype(np.float32),
                    "b.bias": rng.normal(0, 0.3, 5).astype(np.float32)}, examples)
            for node, examples in ((101, 100), (102, 300), (103, 600))}


def test_the_coordinator_gets_the_weighted_mean_and_never_a_single_update(server_identity):
    rng = np.random.default_rng(0)
    updates = three_updates(rng)
    grid = SecureNodes(updates)
    start = {"a.weight": np.zeros((4, 3), np.float32), "b.bias": np.zeros(5, np.float32)}
    replies = SecAggGrid(grid, SECAGG, node_context(0, {}, {})).send_and_receive(
        instructions([101, 102, 103], start))
    assert len(replies) == 1 and not replies[0].has_error()
    mean = replies[0].content["arrays"].to_numpy_ndarrays()
    total = sum(n for _, n in updates.values())
    for got, name in zip(mean, ["a.weight", "b.bias"], strict=True):
        want = sum(a[name] * n for a, n in updates.values()) / total
        np.testing.assert_allclose(got, want, atol=1e-4)  # quantisation error only
    metrics = replies[0].content["metrics"]
    assert metrics["num-examples"] == total and metrics["nodes-trained"] == 3
    assert metrics["bytes-sent"] > 0 and metrics["bytes-received"] > 0 and metrics["secure-round"] == 1


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS])
def test_a_node_dropping_out_mid_round_is_recovered(server_identity, stage):
    """Whenever a node drops out (before sharing keys, before sending its masked update, or after it trained),
    the others' mean is unmasked and the node is reported as failed."""
    rng = np.random.default_rng(1)
    updates = three_updates(rng)
    grid = SecureNodes(updates, drop_at={102: stage})
    start = {"a.weight": np.zeros((4, 3), np.float32), "b.bias": np.zeros(5, np.float32)}
    replies = SecAggGrid(grid, SECAGG, node_context(0, {}, {})).send_and_receive(
        instructions([101, 102, 103], start))
    ok = [r for r in replies if not r.has_error()]
    failed = [r for r in replies if r.has_error()]
    assert len(ok) == 1 and len(failed) == 1 and failed[0].metadata.src_node_id == 102
    total = updates[101][1] + updates[103][1]
    want = (updates[101][0]["b.bias"] * updates[101][1] + updates[103][0]["b.bias"] * updates[103][1]) / total
    np.testing.assert_allclose(ok[0].content["arrays"]["b.bias"].numpy(), want, atol=1e-4)
    assert ok[0].content["metrics"]["nodes-trained"] == 2


def test_too_many_drop_outs_halt_the_round_and_keep_the_model(server_identity):
    updates = three_updates(np.random.default_rng(3))
    grid = SecureNodes(updates, drop_at={102: Stage.COLLECT_MASKED_VECTORS, 103: Stage.COLLECT_MASKED_VECTORS})
    replies = SecAggGrid(grid, SECAGG, node_context(0, {}, {})).send_and_receive(
        instructions([101, 102, 103], {"a.weight": np.zeros((4, 3), np.float32),
                                       "b.bias": np.zeros(5, np.float32)}))
    assert replies and all(r.has_error() for r in replies)


def test_fewer_than_three_nodes_are_refused(server_identity):
    grid = SecureNodes(dict(list(three_updates(np.random.default_rng(2)).items())[:2]))
    with pytest.raises(SecAggError, match="at least 3 nodes"):
        SecAggGrid(grid, SECAGG, node_context(0, {}, {})).send_and_receive(
            instructions([101, 102], {"x": np.zeros(2, np.float32)}))
    with pytest.raises(ConfigError, match="min-nodes"):
        ServerConfig.from_run_config({**pyproject_run_config(), "secagg": True, "min-nodes": 2})


@pytest.mark.parametrize("key, value", [("secagg", "yes"), ("secagg-num-shares", 2), ("secagg-num-shares", 1.5),
                                        ("secagg-reconstruction-threshold", 0), ("secagg-clipping-range", -1.0),
                                        ("secagg-quantization-range", 2.5), ("secagg-max-weight", -1)])
def test_bad_secagg_keys_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        SecAggConfig.from_run_config({"secagg": True, key: value})


def test_secagg_keys_left_out_take_the_pyproject_defaults():
    declared = pyproject_run_config()
    config = SecAggConfig.from_run_config({})
    assert config == SecAggConfig.from_run_config(declared)
    assert (config.enabled, config.num_shares, config.reconstruction_threshold, config.clipping_range,
            config.quantization_range, config.max_weight) == (
        declared["secagg"], declared["secagg-num-shares"], declared["secagg-reconstruction-threshold"],
        declared["secagg-clipping-range"], declared["secagg-quantization-range"], declared["secagg-max-weight"])


def test_merge_node_metrics_weights_the_loss_and_keeps_the_largest_epsilon_and_delta():
    merged = merge_node_metrics({1: {"num-examples": 100, "train-loss": 1.0, "epsilon": 2.0, "delta": 1e-5},
                                 2: {"num-examples": 300, "train-loss": 0.5, "epsilon": 3.0, "delta": 1e-6}})
    assert merged == {"num-examples": 400, "nodes-trained": 2, "train-loss": 0.625, "epsilon": 3.0, "delta": 1e-5}
    # the nodes train side by side: the round waited for the slowest one's training
    timed = merge_node_metrics({1: {"num-examples": 1, "train-loss": 1.0, "train-seconds": 4.0},
                                2: {"num-examples": 1, "train-loss": 1.0, "train-seconds": 9.5}})
    assert timed["train-seconds"] == 9.5


def test_federated_training_with_dp_under_secagg(tiny_market, tiny_bert, tmp_path, server_identity):
    grid, run_config = federation(tiny_market, tiny_bert, tmp_path / "run", secagg=True)
    summary = run_training(grid, run_config, ServerConfig.from_run_config(run_config))
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["nodes-trained"] == 3 and 0 < r["ctcvr.auc"] < 1 for r in rounds)
    assert 0 < rounds[0]["max-epsilon"] < rounds[1]["max-epsilon"] <= 8.0 * 1.0001
    assert 0 < summary["test"]["ctcvr.auc"] < 1
    train_replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train_replies) == 2 * 3 * 4  # 2 rounds x 3 nodes x 4 SecAgg+ stages
    assert all(not r.content.array_records or all(not len(a) for a in r.content.array_records.values())
               for r in train_replies if not r.has_error())
