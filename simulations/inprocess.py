"""A whole federation in one process: the real ServerApp logic (`run_training`) and the real ClientApp, with a
Grid that hands each message to the ClientApp of its node directly (no Flower processes, no network).

For research grids, where starting Flower for every run would cost more than the run. Every node keeps its own
Context (state: privacy ledger, SecAgg+ keys) across messages, as a SuperNode does; messages are deep-copied on
the way, as a real transport would. A ClientApp that raises answers with an error reply naming the exception, as
Flower's runtime does, so the round goes on with the other nodes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedcvr.client import node as node_module
from fedcvr.client.app import app as client_app
from fedcvr.server.app import run_training
from fedcvr.server.config import ServerConfig

FIRST_NODE_ID = 100


class InProcessGrid:
    """Delivers messages to the ClientApp of node `FIRST_NODE_ID + i` (the i-th merchant folder). Keeps each node's
    last reply to a test evaluation (`test_sums`: partition index -> its metric sums) and the training examples its
    train replies report (`train_sizes`: partition index -> examples), so that a research grid can report every
    merchant's test metrics without building its node or evaluating the model again."""

    def __init__(self, run_config: Mapping[str, Any], nodes: int):
        self.test_sums: dict[int, dict[str, Any]] = {}
        self.test_personalised_sums: dict[int, dict[str, Any]] = {}
        self.train_sizes: dict[int, int] = {}
        self.contexts = {
            FIRST_NODE_ID + i: Context(run_id=1, node_id=FIRST_NODE_ID + i,
                                       node_config={"partition-id": i, "num-partitions": nodes},
                                       state=RecordDict(), run_config=dict(run_config))
            for i in range(nodes)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            reply = self.deliver(message)
            self._keep(message, reply)
            replies.append(reply)
        return replies

    def _keep(self, message: Message, reply: Message | None) -> None:
        if reply is None or reply.has_error() or "metrics" not in reply.content.metric_records:
            return
        partition = int(self.contexts[message.metadata.dst_node_id].node_config["partition-id"])
        metrics = reply.content.metric_records["metrics"]
        if message.metadata.message_type == MessageType.TRAIN and "train-size" in metrics:
            self.train_sizes[partition] = int(metrics["train-size"])
        elif message.metadata.message_type == MessageType.EVALUATE:
            config = message.content.config_records.get("config")
            if config is not None and config.get("split") == "test":
                kept = self.test_personalised_sums if config.get("personalised", False) else self.test_sums
                kept[partition] = dict(metrics)

    def deliver(self, message: Message) -> Message:
        """The node's reply to one message (an error reply when its ClientApp raised)."""
        try:
            return client_app(copy.deepcopy(message), self.contexts[message.metadata.dst_node_id])
        except Exception as err:  # what Flower's runtime does with an exception of a ClientApp
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                           reply_to=message)


@contextmanager
def server_identity():
    """What the ServerApp process has when Flower runs it (Flower's runtime sets the same public properties):
    messages it creates need a run and node id. Unset again afterwards, as in a process Flower did not start."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = None, None, None


def run_federation(run_config: Mapping[str, Any], nodes: int,
                   on_round: Callable[[dict], None] | None = None) -> dict:
    """One federated run (the app's ServerApp logic) over `nodes` merchants of `data-root`; returns the summary
    and writes into the run config's `out-dir` what a Flower run writes. `on_round` gets each finished round's
    row. The summary's `test_sums` holds each node's metric sums on its test split (partition index -> sums),
    `test_personalised_sums` those of global + local (run config `personalise`), `train_sizes` each node's
    training examples (partition index -> examples)."""
    kept = node_module.NODES_KEPT["count"]
    node_module.NODES_KEPT["count"] = nodes
    grid = InProcessGrid(run_config, nodes)
    try:
        with server_identity():
            summary = run_training(grid, dict(run_config), ServerConfig.from_run_config(run_config),
                                   on_round=on_round)
        return {**summary, "test_sums": grid.test_sums, "test_personalised_sums": grid.test_personalised_sums,
                "train_sizes": grid.train_sizes}
    finally:
        node_module.NODES_KEPT["count"] = kept
        node_module._NODES.clear()
