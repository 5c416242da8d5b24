"""The coordinator's strategy: Flower's FedAvg, FedProx or FedAdam, with fedcvr's bookkeeping on top.

Aggregation is Flower's own (weighted by each node's `num-examples`). On top of it, per round:
- evaluation replies carry metric sums, which are added up and finalised (`merge_evaluations`), never averaged;
- training replies report ε spent so far with δ: the round records the largest ε and the largest δ across nodes
  (`max-epsilon`, `delta`), a pair that every node's guarantee meets (not the largest ε with its own node's δ);
- bytes sent (global weights x nodes asked) and received (the nodes' weights) are counted;
- time: the round's wall time (`seconds`), the nodes' own training time (`client-train-seconds`, summed, and
  `client-train-seconds-max`), the slowest node's own evaluation time (`client-evaluate-seconds-max`) and the
  aggregation's (`aggregate-seconds`); the rest is overhead (messages, a deployed node's process per message);
- screening (`robust.py`): each update is checked against the global weights sent; one with other arrays or
  shapes, NaN/Inf values, or a change far above the round's median is rejected, logged with its node id and
  left out; the round goes on with the others. Nodes that replied with an error or not at all within
  round-timeout are logged and listed (`failed`) too;
- aggregation `mean` (Flower's, weighted by examples), `median` or `trimmed-mean` (`robust.combine`), under
  every strategy (FedAdam's server step then works on the robust aggregate);
- one line per round goes to `<out-dir>/rounds.jsonl` and a table to the log.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedcvr.shared import protocol
from fedcvr.shared.metrics import merge_evaluations

from .robust import combine, screen_updates

FLOWER_STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}  # one per flower_app.STRATEGIES
TABLE_METRICS = ("ctcvr.auc", "ctcvr.gauc", "click.auc", "ctcvr.logloss", "ndcg@10")


def _train_metrics(contents: list, weighted_by_key: str) -> MetricRecord:
    """Examples summed, loss weighted by examples, the worst privacy pair across nodes (`worst_privacy`)."""
    total = sum(int(c["metrics"][weighted_by_key]) for c in contents)
    # a secure-aggregation reply stands for several nodes and says how many
    out: dict[str, Any] = {"num-examples": total,
                           "nodes-trained": sum(int(c["metrics"].get("nodes-trained", 1)) for c in contents)}
    if total:
        out["train-loss"] = sum(float(c["metrics"]["train-loss"]) * int(c["metrics"][weighted_by_key])
                                for c in contents) / total
    seconds = [float(c["metrics"]["train-seconds"]) for c in contents if "train-seconds" in c["metrics"]]
    if seconds:  # the nodes' own training time: summed (one machine runs them in turn) and the slowest
        out["client-train-seconds"], out["client-train-seconds-max"] = sum(seconds), max(seconds)
    pair = worst_privacy([(c["metrics"]["epsilon"], c["metrics"]["delta"]) for c in contents
                          if "epsilon" in c["metrics"]])
    if pair is not None:
        out["max-epsilon"], out["delta"] = pair
    return MetricRecord(out)


def worst_privacy(pairs: Iterable[tuple[float, float]]) -> tuple[float, float] | None:
    """(largest ε, largest δ) over nodes' (ε, δ) pairs: each node is (ε_i, δ_i)-DP with ε_i <= max ε and
    δ_i <= max δ, so each is (max ε, max δ)-DP, the guarantee the whole federation can state. The largest ε with its
    own node's δ is not one: a smaller node may have trained at a larger δ. None without pairs (no DP)."""
    pairs = [(float(eps), float(delta)) for eps, delta in pairs]
    if not pairs:
        return None
    return max(eps for eps, _ in pairs), max(delta for _, delta in pairs)


def run_privacy(rows: Iterable[dict[str, Any]]) -> dict[str, float] | None:
    """The worst (ε, δ) pair of a whole run from its round rows: ε is cumulative on each node, so the largest
    `max-epsilon` of any round is the largest ε any node spent (a node that declined later rounds counts too).
    None when no round reported ε (no DP)."""
    pair = worst_privacy((row["max-epsilon"], row["delta"]) for row in rows
                         if row.get("max-epsilon") is not None and row.get("delta") is not None)
    return None if pair is None else {"max-epsilon": pair[0], "delta": pair[1]}


def _evaluate_metrics(contents: list, weighted_by_key: str) -> MetricRecord:
    """The nodes' sums added up and finalised, and the slowest node's own evaluation time."""
    out = merge_evaluations([dict(c["metrics"]) for c in contents])
    seconds = [float(c["metrics"][protocol.EVALUATE_SECONDS]) for c in contents
               if protocol.EVALUATE_SECONDS in c["metrics"]]
    if seconds:
        out["client-evaluate-seconds-max"] = max(seconds)
    return MetricRecord(out)


class RoundBook:
    """Per-round bookkeeping shared by the strategy hooks; writes rounds.jsonl."""

    def __init__(self, out_dir: Path | None, offset: int = 0):
        self.out_dir = out_dir
        self.offset = offset
        self.rows: list[dict[str, Any]] = []
        self.current: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.arrays: ArrayRecord | None = None  # the global weights after the latest round
        self.sent: dict[str, np.ndarray] = {}  # the global weights this round's training started from
        self.asked: list[int] = []  # the nodes asked to train this round
        self.on_round: Callable[[dict[str, Any]], None] | None = None  # e.g. write a checkpoint

    def start(self, server_round: int) -> None:
        self.current = {"round": server_round, "bytes-sent": 0, "bytes-received": 0,
                        "nodes-declined": 0, "declined": [], "nodes-failed": 0, "failed": [],
                        "nodes-rejected": 0, "rejected": []}
        self.started = time.perf_counter()

    def finish(self, metrics: MetricRecord | None) -> dict[str, Any]:
        row = {**self.current, **(dict(metrics) if metrics else {})}
        row["seconds"] = round(time.perf_counter() - self.started, 2)
        self.rows.append(row)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with (self.out_dir / "rounds.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        log(INFO, "%s", format_row(row))
        if self.on_round is not None:
            self.on_round(row)
        return row


def format_row(row: dict[str, Any]) -> str:
    parts = [f"round {row['round']}"]
    for key in TABLE_METRICS:
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    if "max-epsilon" in row:
        parts.append(f"max ε {row['max-epsilon']:.3f}, max δ {row['delta']:.1e}")
    parts.append(f"sent {row['bytes-sent'] / 1e6:.2f} MB, received {row['bytes-received'] / 1e6:.2f} MB")
    if row.get("nodes-declined"):
        parts.append(f"{row['nodes-declined']} node(s) declined")
    if row.get("nodes-failed"):
        parts.append(f"{row['nodes-failed']} node(s) failed")
    if row.get("nodes-rejected"):
        parts.append(f"{row['nodes-rejected']} update(s) rejected")
    return " | ".join(parts)


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as named numpy arrays."""
    return {name: array.numpy() for name, array in record.items()}


def in_dtypes(record: ArrayRecord, like: dict[str, np.ndarray]) -> ArrayRecord:
    """`record` with each array in the dtype of the same-named array in `like` (the weights sent this round).
    FedAdam's step mixes float64 scalars into float32 weights and NumPy promotes the result to float64, which would
    double every later round's download for no gain: the nodes' models are float32."""
    if all(name not in like or array.dtype == str(like[name].dtype) for name, array in record.items()):
        return record
    return ArrayRecord({name: Array(np.asarray(array.numpy(), dtype=like[name].dtype) if name in like
                                    else array.numpy()) for name, array in record.items()})


class RobustAggregation(FedAvg):
    """FedAvg's aggregation step with the combination named by `aggregation` (`robust.combine`). It sits below
    FedAdam and FedProx in the class order, so their own steps work on its result."""

    aggregation = "mean"
    aggregation_trim = 0.2

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        if self.aggregation == "mean":
            return super().aggregate_train(server_round, replies)
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        updates = [record_arrays(c[self.arrayrecord_key]) for c in contents]
        weights = [float(c["metrics"][self.weighted_by_key]) for c in contents]
        combined = combine(updates, weights, self.aggregation, self.aggregation_trim)
        arrays = ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in combined.items()})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def declined(reply: Message) -> bool:
    """True for the error reply of a node that declined the round (privacy budget spent, or no training example
    this round: `client/app.py`); a node that raised instead is a failure."""
    return reply.has_error() and protocol.is_declined(reply.error.reason)


def screen_replies(book: RoundBook, replies: list[Message], norm_factor: float, round_timeout: float,
                   secure: bool = False) -> list[Message]:
    """The replies to aggregate: error replies pass through (Flower logs and skips them); updates that fail the
    screening (`robust.screen_updates`) are dropped. Failures and rejections are logged with the node's id and
    booked in the round's row."""
    server_round = book.current.get("round", 0)
    for reply in replies:
        if reply.has_error() and not declined(reply):  # a node that declines did not fail
            reason = reply.error.reason or f"error code {reply.error.code}"
            book.current["failed"].append({"node": int(reply.metadata.src_node_id), "reason": reason})
    good = [r for r in replies if not r.has_error()]
    secure = secure or any(protocol.SECURE_ROUND in r.content[protocol.METRICS] for r in good)
    if not secure:  # a secure round answers with one reply for all its nodes and names its drop-outs itself
        replied = {int(r.metadata.src_node_id) for r in replies}
        for node in book.asked:
            if node not in replied:
                book.current["failed"].append(
                    {"node": node, "reason": f"no reply within round-timeout = {round_timeout:g} s"})
    for failure in book.current["failed"]:
        log(WARNING, "Round %d: node %s failed: %s", server_round, failure["node"], failure["reason"])
    book.current["nodes-failed"] = len(book.current["failed"])
    if not good or not book.sent:
        return replies
    screening = screen_updates(book.sent, [record_arrays(r.content["arrays"]) for r in good],
                               0.0 if secure else norm_factor)
    for index, reason in screening.rejected:
        node = int(good[index].metadata.src_node_id)
        log(WARNING, "Round %d: update of node %s rejected: %s", server_round, node, reason)
        book.current["rejected"].append({"node": node, "reason": reason})
    book.current["nodes-rejected"] = len(screening.rejected)
    kept = [good[i] for i in screening.kept]
    return kept + [r for r in replies if r.has_error()]


def make_strategy(name: str, book: RoundBook, *, fraction_train: float, fraction_evaluate: float, min_nodes: int,
                  proximal_mu: float, server_lr: float, seed: int = 0, aggregation: str = "mean",
                  aggregation_trim: float, reject_norm_factor: float, round_timeout: float,
                  secure: bool = False):
    """The named Flower strategy with fedcvr's hooks.

    Rounds are numbered across a resumed run: `book.offset` rounds were done before, so Flower's round r is
    round r + offset everywhere (the nodes' `server-round`, FedAdam's bias correction, the log). Flower samples
    nodes with Python's `random`, which is seeded from `seed` and the round before each sampling, so a resumed
    run asks the same nodes as an uninterrupted one.

    Every training reply is screened (`screen_replies`) before aggregation; `aggregation` chooses the
    combination (`RobustAggregation`)."""
    base = FLOWER_STRATEGIES[name]
    bases = (RobustAggregation,) if base is FedAvg else (base, RobustAggregation)

    class Tracked(*bases):  # type: ignore[misc, valid-type]
        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Iterable[Message]:
            server_round += book.offset
            book.start(server_round)
            random.seed(seed * 1_000_003 + server_round)
            messages = list(super().configure_train(server_round, arrays, config, grid))
            book.current["bytes-sent"] += arrays.count_bytes() * len(messages)
            book.sent = record_arrays(arrays)
            book.asked = [int(m.metadata.dst_node_id) for m in messages]
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            for reply in replies:
                if reply.has_error():
                    if declined(reply):  # other error replies are booked in `failed` (screen_replies)
                        book.current["nodes-declined"] += 1
                        book.current["declined"].append(reply.error.reason)
                elif protocol.SECURE_ROUND in reply.content[protocol.METRICS]:  # it measured its own traffic
                    book.current["bytes-received"] += int(reply.content[protocol.METRICS][protocol.BYTES_RECEIVED])
                    book.current["bytes-sent"] = int(reply.content[protocol.METRICS][protocol.BYTES_SENT])
                else:
                    book.current["bytes-received"] += reply.content["arrays"].count_bytes()
            replies = screen_replies(book, replies, reject_norm_factor, round_timeout, secure)
            started = time.perf_counter()
            arrays, metrics = super().aggregate_train(server_round + book.offset, replies)
            book.current["aggregate-seconds"] = time.perf_counter() - started
            if metrics is not None:
                book.current.update(dict(metrics))
            if arrays is not None:
                arrays = in_dtypes(arrays, book.sent)
                book.arrays = arrays
            return arrays, metrics

        def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                               grid: Grid) -> Iterable[Message]:
            server_round += book.offset
            random.seed(seed * 1_000_003 + server_round + 500_009)
            return super().configure_evaluate(server_round, arrays, config, grid)

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
            metrics = super().aggregate_evaluate(server_round + book.offset, replies)
            book.finish(metrics)
            return metrics

        def optimizer_state(self) -> dict[str, np.ndarray]:
            """The server optimiser's moments (FedAdam's m_t and v_t) as flat named arrays; {} for FedAvg/FedProx."""
            out: dict[str, np.ndarray] = {}
            for moment in ("m_t", "v_t"):
                for key, value in (getattr(self, moment, None) or {}).items():
                    out[f"{moment}/{key}"] = np.asarray(value)
            return out

        def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
            for moment in ("m_t", "v_t"):
                values = {k.split("/", 1)[1]: np.asarray(v) for k, v in state.items() if k.startswith(moment + "/")}
                if values:
                    setattr(self, moment, values)

    kwargs: dict[str, Any] = {
        "fraction_train": fraction_train, "fraction_evaluate": fraction_evaluate, "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes, "min_available_nodes": min_nodes,
        "train_metrics_aggr_fn": _train_metrics, "evaluate_metrics_aggr_fn": _evaluate_metrics,
    }
    if name == "fedprox":
        kwargs["proximal_mu"] = proximal_mu
    if name == "fedadam":
        kwargs["eta"] = server_lr
    Tracked.__name__ = f"Fedcvr{base.__name__}"
    strategy = Tracked(**kwargs)
    strategy.aggregation, strategy.aggregation_trim = aggregation, aggregation_trim
    return strategy
