"""Secure aggregation (SecAgg+) as the transport of the training step.

With `secagg = true` the coordinator never sees one merchant's weights: each node masks its quantised update so
that only the sum over the round's nodes can be unmasked (Flower's SecAgg+; in flwr 1.42 it exists only on the
legacy path, `SecAggPlusWorkflow` here and `secaggplus_mod` on the nodes).

`SecAggGrid` wraps the run's Grid. Every message that is not a training instruction (evaluation,
push-back) passes through unchanged. A batch of training instructions is run as one SecAgg+ round among those
nodes, and comes back as ONE reply holding the weighted mean of their weights and the round's merged metrics.
The strategy (FedAvg, FedProx, FedAdam), the evaluation, the checkpoints and the nodes' training and privacy
ledger are the same code as without SecAgg: FedAvg of one reply is that reply, FedAdam steps from it.

Each update weighs its node's training-split size (FedAvg's weighting). What the coordinator still sees per node:
that it took part, its training-split size, the examples it saw, its training loss and its ε with δ (metrics
travel in the clear).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedcvr.shared import protocol
from fedcvr.shared.secagg import MAX_WEIGHT_KEY, MIN_NODES, WEIGHT_NAMES_KEY

from .config import SecAggConfig
from .strategy import worst_privacy


class SecAggError(RuntimeError):
    """A secure aggregation round cannot run (too few nodes)."""


def _value_bytes(value: object) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, str | bytes):
        return len(value)
    return 8  # bool, int and float travel as 64-bit numbers


def message_bytes(message: Message) -> int:
    """Bytes of a message's payload (arrays, config and metric values); 0 for an error reply."""
    if message.has_error():
        return 0
    content = message.content
    arrays = sum(record.count_bytes() for record in content.array_records.values())
    values = sum(_value_bytes(v) for group in (content.config_records, content.metric_records)
                 for record in group.values() for v in record.values())
    return arrays + values


class _OneRound(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives for one round: it hands out the given instructions and
    keeps what the protocol unmasked (the weighted mean) and the nodes' plaintext metrics."""

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]):
        self.instructions = instructions
        self.mean: list[np.ndarray] | None = None
        self.node_metrics: dict[int, dict[str, Scalar]] = {}
        self.node_examples: dict[int, int] = {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return self.instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        self.mean = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the unmasked mean
        for proxy, fitres in results:
            self.node_metrics[int(proxy.node_id)] = dict(fitres.metrics)
            self.node_examples[int(proxy.node_id)] = int(fitres.num_examples)
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


class _Counting:
    """The inner grid for the protocol: counts bytes both ways and remembers which node failed and why."""

    def __init__(self, grid: Any):
        self.grid = grid
        self.sent = 0
        self.received = 0
        self.failures: dict[int, str] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.sent += sum(message_bytes(m) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        answered = {r.metadata.src_node_id for r in replies if not r.has_error()}
        # an error reply may come from the SuperLink itself (e.g. "Node Unavailable"): match it by the message
        errors = {r.metadata.reply_to_message_id: r.error.reason or f"error code {r.error.code}"
                  for r in replies if r.has_error()}
        errors_by_node = {r.metadata.src_node_id: r.error.reason for r in replies if r.has_error()}
        self.received += sum(message_bytes(r) for r in replies)
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in answered:
                reason = (errors.get(message.metadata.message_id) or errors_by_node.get(node)
                          or f"no reply within {timeout} s")
                self.failures.setdefault(node, reason)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def merge_node_metrics(node_metrics: Mapping[int, Mapping[str, Scalar]]) -> dict[str, Any]:
    """One reply's metrics for the whole round: examples summed, loss weighted by examples, the largest ε and
    the largest δ (`strategy.worst_privacy`), the number of nodes; what the strategy's metric aggregation reads
    from a reply."""
    rows = list(node_metrics.values())
    total = sum(int(r["num-examples"]) for r in rows)
    out: dict[str, Any] = {"num-examples": total, "nodes-trained": len(rows)}
    if total:
        out["train-loss"] = sum(float(r["train-loss"]) * int(r["num-examples"]) for r in rows) / total
    pair = worst_privacy([(r["epsilon"], r["delta"]) for r in rows if "epsilon" in r])
    if pair is not None:
        out["epsilon"], out["delta"] = pair
    seconds = [float(r["train-seconds"]) for r in rows if "train-seconds" in r]
    if seconds:  # the nodes trained side by side: the round waited for the slowest
        out["train-seconds"] = max(seconds)
    return out


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, except that a node that drops out before it has shared its keys (setup or
    share-keys stage) counts as not sampled: no other node masked its vector with it, so there is nothing of it to
    unmask. (flwr 1.42 asks the others for its key shares, which never existed, and halts the round.)"""

    def setup_stage(self, grid: Any, context: LegacyContext, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.sampled_node_ids &= state.active_node_ids
        return ok

    def share_keys_stage(self, grid: Any, context: LegacyContext, state: Any) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        state.sampled_node_ids &= state.active_node_ids
        return ok


class SecAggGrid:
    """A Grid whose training rounds run under SecAgg+; every other message goes through unchanged."""

    def __init__(self, grid: Any, config: SecAggConfig, context: Context):
        self.grid = grid
        self.config = config
        self.context = context
        self.train_sizes: dict[int, int] = {}  # node -> training-split size, asked once (secagg-max-weight = 0)

    def max_weight(self, nodes: list[int], timeout: float | None) -> float:
        """The weight cap of a round: `secagg-max-weight`, or with 0 the largest training split of its nodes."""
        if self.config.max_weight > 0:
            return self.config.max_weight
        unknown = [node for node in nodes if node not in self.train_sizes]
        if unknown:
            query = [Message(RecordDict(), dst_node_id=node, message_type=f"query.{protocol.TRAIN_SIZE}")
                     for node in unknown]
            for reply in self.grid.send_and_receive(query, timeout=timeout):
                if not reply.has_error():
                    size = reply.content[protocol.SIZE][protocol.TRAIN_SIZE_KEY]
                    self.train_sizes[reply.metadata.src_node_id] = int(size)
        sizes = [self.train_sizes[node] for node in nodes if node in self.train_sizes]
        return float(max(sizes)) if sizes else 1.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        return self.secure_round(messages, timeout)

    def secure_round(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Run one SecAgg+ round over the nodes these training instructions go to; one reply with the mean,
        plus an error reply for each node that failed."""
        if len(messages) < MIN_NODES:
            raise SecAggError(
                f"secure aggregation needs at least {MIN_NODES} nodes in a round, but this round asks "
                f"{len(messages)}: connect more nodes and raise min-nodes, or set secagg = false.")
        arrays: ArrayRecord = messages[0].content["arrays"]
        names = list(arrays.keys())
        parameters = ndarrays_to_parameters([arrays[name].numpy() for name in names])
        server_round = int(messages[0].content["config"].get("server-round", 1))
        max_weight = self.max_weight([m.metadata.dst_node_id for m in messages], timeout)
        counting = _Counting(self.grid)
        instructions = []
        for message in messages:
            config = {**dict(message.content[protocol.CONFIG]), WEIGHT_NAMES_KEY: "\n".join(names),
                      MAX_WEIGHT_KEY: max_weight}
            proxy = GridClientProxy(message.metadata.dst_node_id, counting, self.context.run_id)
            instructions.append((proxy, FitIns(parameters, config)))
        strategy = _OneRound(instructions)
        manager = SimpleClientManager()
        for proxy, _ in instructions:
            manager.register(proxy)
        legacy = LegacyContext(Context(run_id=self.context.run_id, node_id=self.context.node_id, node_config={},
                                       state=RecordDict(), run_config={}), strategy=strategy, client_manager=manager)
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, keep_input=True)
        log(INFO, "Round %d: secure aggregation (SecAgg+) over %d node(s)", server_round, len(messages))
        workflow = _SecAggPlus(self.config.num_shares, self.config.reconstruction_threshold, max_weight=max_weight,
                               clipping_range=self.config.clipping_range,
                               quantization_range=self.config.quantization_range, timeout=timeout)
        workflow(counting, legacy)
        replies: list[Message] = []
        by_node = {m.metadata.dst_node_id: m for m in messages}
        for node, reason in sorted(counting.failures.items()):
            if node in strategy.node_metrics:
                continue
            log(ERROR, "Node %s left the secure round: %s", node, reason)
            replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                                   reply_to=by_node[node]))
        if strategy.mean is None:
            log(WARNING, "Round %d: secure aggregation halted (too few nodes left to unmask the sum); the global "
                "model stays as it was", server_round)
            return replies or [Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                             reason="secure aggregation halted"), reply_to=m) for m in messages]
        metrics = merge_node_metrics(strategy.node_metrics)
        metrics[protocol.BYTES_SENT], metrics[protocol.BYTES_RECEIVED] = counting.sent, counting.received
        metrics[protocol.SECURE_ROUND] = 1
        mean = ArrayRecord({name: Array(np.asarray(value, dtype=arrays[name].numpy().dtype))
                            for name, value in zip(names, strategy.mean, strict=True)})
        first = by_node[min(strategy.node_metrics)]
        log(INFO, "Round %d: unmasked the mean of %d node(s); %d failed", server_round, len(strategy.node_metrics),
            len(replies))
        mean_reply = RecordDict({protocol.ARRAYS: mean, protocol.METRICS: MetricRecord(metrics)})
        return [Message(mean_reply, reply_to=first), *replies]

