"""Screening of updates, robust aggregation and faulty nodes: the round goes on without what is broken."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from support import TamperingGrid

from fedcvr.client.node import MerchantNode
from fedcvr.server.app import run_training
from fedcvr.server.config import ConfigError, ServerConfig
from fedcvr.server.robust import change_norm, combine, screen_updates, trimmed_count
from fedcvr.simulations.inprocess import FIRST_NODE_ID

# ---------------------------------------------------------------- plain functions


def reference() -> dict[str, np.ndarray]:
    return {"a": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}


def moved(step: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in reference().items():
        change = rng.normal(size=value.shape)
        out[name] = (value + step * change / np.sqrt(value.size)).astype(np.float32)
    return out


def test_screening_keeps_ordinary_updates():
    updates = [moved(1.0, seed) for seed in range(5)]
    result = screen_updates(reference(), updates, norm_factor=10.0)
    assert result.kept == [0, 1, 2, 3, 4] and result.rejected == []
    assert result.median_norm == pytest.approx(np.median([change_norm(reference(), u) for u in updates]))


@pytest.mark.parametrize("breakage, needle", [
    (lambda u: u.pop("b"), "1 array(s) missing (e.g. 'b')"),
    (lambda u: u.update(c=np.zeros(1)), "1 unexpected array(s) (e.g. 'c')"),
    (lambda u: u.update(a=np.zeros((3, 2), dtype=np.float32)), "array 'a' has shape (3, 2)"),
    (lambda u: u["a"].__setitem__((0, 0), np.nan), "array 'a' holds 1 NaN or Inf value(s)"),
    (lambda u: u["b"].__setitem__(slice(0, 2), np.inf), "array 'b' holds 2 NaN or Inf value(s)"),
    (lambda u: u.update(b=np.array(["x"] * 4)), "array 'b' holds <U1 values, not numbers"),
])
def test_screening_rejects_broken_updates_and_says_why(breakage, needle):
    updates = [moved(1.0, seed) for seed in range(4)]
    breakage(updates[2])
    result = screen_updates(reference(), updates, norm_factor=10.0)
    assert result.kept == [0, 1, 3]
    assert len(result.rejected) == 1 and result.rejected[0][0] == 2 and needle in result.rejected[0][1]


def test_screening_rejects_a_change_far_above_the_median():
    updates = [moved(1.0, seed) for seed in range(4)] + [moved(50.0, 9)]
    result = screen_updates(reference(), updates, norm_factor=10.0)
    assert result.kept == [0, 1, 2, 3]
    assert result.rejected[0][0] == 4 and "above reject-norm-factor 10 x the round's median" in result.rejected[0][1]
    assert screen_updates(reference(), updates, norm_factor=0.0).kept == [0, 1, 2, 3, 4]  # 0 = off
    assert screen_updates(reference(), updates, norm_factor=60.0).kept == [0, 1, 2, 3, 4]


def test_norm_screening_needs_three_updates():
    updates = [moved(1.0, 0), moved(1000.0, 1)]
    assert screen_updates(reference(), updates, norm_factor=1.5).kept == [0, 1]


def test_mean_is_weighted_by_examples():
    updates = [{"w": np.array([0.0, 2.0], dtype=np.float32)}, {"w": np.array([4.0, 6.0], dtype=np.float32)}]
    out = combine(updates, [3, 1], "mean")
    np.testing.assert_allclose(out["w"], [1.0, 3.0])
    assert out["w"].dtype == np.float32


def test_median_and_trimmed_mean_ignore_one_extreme_node_per_coordinate():
    values = [1.0, 2.0, 3.0, 4.0, 1e6]
    updates = [{"w": np.array([v, -v], dtype=np.float32)} for v in values]
    np.testing.assert_allclose(combine(updates, [1] * 5, "median")["w"], [3.0, -3.0])
    np.testing.assert_allclose(combine(updates, [1] * 5, "trimmed-mean", trim=0.2)["w"], [3.0, -3.0])
    np.testing.assert_allclose(combine(updates, [1] * 5, "trimmed-mean", trim=0.1)["w"], [2e5 + 2, -2e5 - 2])
    assert trimmed_count(5, 0.2) == 1 and trimmed_count(5, 0.49) == 2 and trimmed_count(2, 0.4) == 0


def test_combine_refuses_unknown_methods_and_empty_input():
    with pytest.raises(ValueError, match="use one of mean, median, trimmed-mean"):
        combine([reference()], [1], "mode")
    with pytest.raises(ValueError, match="no update"):
        combine([], [], "mean")


@pytest.mark.parametrize("pairs, needle", [
    ({"aggregation": "krum"}, "`aggregation` = 'krum' is invalid: use one of mean, median, trimmed-mean"),
    ({"aggregation-trim": 0.5}, "`aggregation-trim` = 0.5 is invalid"),
    ({"aggregation-trim": 0}, "`aggregation-trim` = 0 is invalid"),
    ({"reject-norm-factor": -1}, "`reject-norm-factor` = -1 is invalid: it must be a number >= 0 (0 = no norm check)"),
    ({"aggregation": "median", "secagg": True, "min-nodes": 3}, "cannot be combined with `secagg` = true"),
])
def test_config_refuses_bad_aggregation_settings(pairs, needle):
    from test_flower_app import pyproject_run_config

    with pytest.raises(ConfigError) as err:
        ServerConfig.from_run_config({**pyproject_run_config(), **pairs})
    assert needle in str(err.value)


def test_config_defaults():
    from test_flower_app import pyproject_run_config

    config = ServerConfig.from_run_config(pyproject_run_config())
    assert (config.aggregation, config.aggregation_trim, config.reject_norm_factor) == ("mean", 0.2, 10.0)


# ---------------------------------------------------------------- a federation with a hostile or broken node


@pytest.fixture(scope="module")
def five_merchants(tmp_path_factory):
    from fedcvr.simulations.synth import SynthConfig, generate_marketplace

    out = tmp_path_factory.mktemp("five")
    generate_marketplace(SynthConfig(merchants=5, items=200, shoppers=400, events=10_000, seed=5), out)
    return out


def with_arrays(reply: Message, arrays: dict[str, np.ndarray]) -> Message:
    """The same reply carrying other weights."""
    reply.content = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v))
                                                       for k, v in arrays.items()}),
                                "metrics": reply.content["metrics"]})
    return reply


HOSTILE = FIRST_NODE_ID + 4


def scaled_attack(factor: float):
    def tamper(node, sent, reply):
        if node != HOSTILE:
            return reply
        base = {k: v.numpy() for k, v in sent.items()}
        new = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        return with_arrays(reply, {k: base[k] + factor * (new[k] - base[k]) for k in base})
    return tamper


def random_attack(scale: float):
    """Replace the node's weights by random ones: N(0, scale^2) in every coordinate."""
    def tamper(node, sent, reply):
        if node != HOSTILE:
            return reply
        rng = np.random.default_rng(node)
        return with_arrays(reply, {k: (scale * rng.normal(size=v.shape)).astype(np.float32)
                                   for k, v in reply.content["arrays"].items()})
    return tamper


def alternating_attack(node, sent, reply):
    """Round 1: the node's change scaled 100 times; later rounds: random weights, N(0, 1) everywhere."""
    alternating_attack.calls += node == HOSTILE
    if node != HOSTILE:
        return reply
    return (scaled_attack(100.0) if alternating_attack.calls == 1 else random_attack(1.0))(node, sent, reply)


def run(market, tiny_bert, out, tamper=lambda node, sent, reply: reply, **overrides):
    from test_flower_app import pyproject_run_config

    run_config = {**pyproject_run_config(), "data-root": str(market), "out-dir": str(out), "min-nodes": 5,
                  "model.encoder": str(tiny_bert), "model.dim": 8, "model.attention-hidden": 8,
                  "model.head-hidden": 8, "model.max-text-tokens": 32, "examples.history-length": 8,
                  "examples.test-fraction": 0.3, "examples.validation-fraction": 0.05, "train.lr": 0.02,
                  "train.batch-size": 128, "num-server-rounds": 2, "dp.enabled": False, "round-timeout": 30,
                  **overrides}
    from fedcvr.client import node as node_module

    kept = node_module.NODES_KEPT["count"]
    node_module.NODES_KEPT["count"] = 5
    try:
        with _server_identity():
            summary = run_training(TamperingGrid(run_config, 5, tamper), run_config,
                                   ServerConfig.from_run_config(run_config))
    finally:
        node_module.NODES_KEPT["count"] = kept
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return summary["test"], rows


def _server_identity():
    from fedcvr.simulations.inprocess import server_identity

    return server_identity()


@pytest.fixture(scope="module")
def honest(five_merchants, tiny_bert, tmp_path_factory):
    """The reference: the same federation with five honest merchants."""
    return run(five_merchants, tiny_bert, tmp_path_factory.mktemp("honest"))[0]


def test_one_hostile_node_of_five_is_rejected_and_the_model_stays_where_it_was(five_merchants, tiny_bert, tmp_path,
                                                                             honest, caplog):
    """1 of 5 nodes sends its change scaled 100 times (round 1), then random weights (round 2): both are rejected
    by the norm screen, logged with the node's id, and the global CTCVR AUC moves by less than 0.03."""
    alternating_attack.calls = 0
    with caplog.at_level(logging.WARNING):
        test, rows = run(five_merchants, tiny_bert, tmp_path / "attacked", alternating_attack)
    assert [r["nodes-rejected"] for r in rows] == [1, 1]
    assert all(r["rejected"][0]["node"] == HOSTILE and "above reject-norm-factor 10" in r["rejected"][0]["reason"]
               for r in rows)
    assert f"update of node {HOSTILE} rejected" in caplog.text
    # the honest reference averages five nodes, the screened run four: on this small market leaving one honest
    # node's update out alone moves the AUC by about 0.015, far less than the attack does unscreened (below)
    assert abs(test["ctcvr.auc"] - honest["ctcvr.auc"]) < 0.03, (test, honest)
    # without the screen the scaled update wrecks the model: the check above has teeth
    undefended, rows = run(five_merchants, tiny_bert, tmp_path / "undefended", scaled_attack(100.0),
                           **{"reject-norm-factor": 0, "num-server-rounds": 1})
    assert rows[0]["nodes-rejected"] == 0
    assert undefended["ctcvr.logloss"] > 1.5 * honest["ctcvr.logloss"], (undefended, honest)


def test_nan_update_raising_node_and_silent_node_are_named_and_the_round_goes_on(five_merchants, tiny_bert,
                                                                                 tmp_path, monkeypatch, caplog):
    broken = FIRST_NODE_ID + 1
    raising = sorted(p.name for p in five_merchants.iterdir() if p.is_dir())[2]  # node FIRST_NODE_ID + 2
    original = MerchantNode.train

    def train(self, *args, **kwargs):
        if self.folder.name == raising:
            raise RuntimeError("disk full while reading the shop's events")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MerchantNode, "train", train)

    def tamper(node, sent, reply):
        if node == broken:  # NaN in one array
            arrays = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
            next(iter(arrays.values())).flat[0] = np.nan
            return with_arrays(reply, arrays)
        if node == FIRST_NODE_ID + 3:
            return None  # hangs past the round's timeout
        return reply

    with caplog.at_level(logging.WARNING):
        test, rows = run(five_merchants, tiny_bert, tmp_path / "faults", tamper)
    assert [r["round"] for r in rows] == [1, 2] and 0 < test["ctcvr.auc"] < 1
    for row in rows:
        assert len(row["rejected"]) == 1 and row["rejected"][0]["node"] == broken
        assert "NaN or Inf" in row["rejected"][0]["reason"]
        failed = {f["node"]: f["reason"] for f in row["failed"]}
        assert failed == {FIRST_NODE_ID + 2: "RuntimeError: disk full while reading the shop's events",
                          FIRST_NODE_ID + 3: "no reply within round-timeout = 30 s"}
        assert row["nodes-failed"] == 2 and row["nodes-rejected"] == 1 and row["num-examples"] > 0
    assert f"node {FIRST_NODE_ID + 2} failed: RuntimeError: disk full" in caplog.text
    assert f"node {FIRST_NODE_ID + 3} failed: no reply within round-timeout" in caplog.text
    assert f"update of node {broken} rejected: array" in caplog.text


def test_a_declining_node_is_not_booked_as_failed():
    """A node with no training example (or no privacy budget left) declines the round: booked in `declined`, not in
    `failed`; a node whose ClientApp raised is a failure."""
    from types import SimpleNamespace

    from fedcvr.server.strategy import RoundBook, screen_replies

    def error_reply(node: int, reason: str):
        return SimpleNamespace(has_error=lambda: True, error=SimpleNamespace(reason=reason, code=0),
                               metadata=SimpleNamespace(src_node_id=node))

    book = RoundBook(None)
    book.start(1)
    book.asked = [1, 2]
    replies = [error_reply(1, "declined to train: the training split is empty"), error_reply(2, "RuntimeError: x")]
    assert screen_replies(book, replies, 10.0, 60.0) == replies  # error replies pass through to Flower
    assert book.current["failed"] == [{"node": 2, "reason": "RuntimeError: x"}] and book.current["nodes-failed"] == 1
