"""The coordinator's strategy: Flower's FedAvg, FedProx or FedAdam, with fedcvr's bookkeeping on top.

Aggregation is Flower's own (weighted by each node's `num-examples`). On top of it, per round:
- evaluation replies carry metric sums, which are added up and finalised (`merge_evaluations`), never averaged;
- training replies report ε spent so far with δ: the round records the largest ε across nodes;
- bytes sent (global weights x nodes asked) and received (the nodes' weights) are counted;
- time: the round's wall time (`seconds`), the nodes' own training time (`client-train-seconds`, summed, and
  `client-train-seconds-max`) and the aggregation's (`aggregate-seconds`); the rest is evaluation and overhead;
- one line per round goes to `<out-dir>/rounds.jsonl` and a table to the log.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedcvr.client.node import merge_evaluations

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}
TABLE_METRICS = ("ctcvr.auc", "ctcvr.gauc", "click.auc", "ctcvr.logloss", "ndcg@10")


def _train_metrics(contents: list, weighted_by_key: str) -> MetricRecord:
    """Examples summed, loss weighted by examples, the largest ε (and its δ) across nodes."""
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
    eps = [(float(c["metrics"]["epsilon"]), float(c["metrics"]["delta"])) for c in contents
           if "epsilon" in c["metrics"]]
    if eps:
        out["max-epsilon"], out["delta"] = max(eps)
    return MetricRecord(out)


def _evaluate_metrics(contents: list, weighted_by_key: str) -> MetricRecord:
    return MetricRecord(merge_evaluations([dict(c["metrics"]) for c in contents]))


class RoundBook:
    """Per-round bookkeeping shared by the strategy hooks; writes rounds.jsonl."""

    def __init__(self, out_dir: Path | None, offset: int = 0):
        self.out_dir = out_dir
        self.offset = offset
        self.rows: list[dict[str, Any]] = []
        self.current: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.arrays: ArrayRecord | None = None  # the global weights after the latest round
        self.on_round: Callable[[dict[str, Any]], None] | None = None  # e.g. write a checkpoint

    def start(self, server_round: int) -> None:
        self.current = {"round": server_round, "bytes-sent": 0, "bytes-received": 0,
                        "nodes-declined": 0, "declined": []}
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
        parts.append(f"max ε {row['max-epsilon']:.3f} (δ {row['delta']:.1e})")
    parts.append(f"sent {row['bytes-sent'] / 1e6:.2f} MB, received {row['bytes-received'] / 1e6:.2f} MB")
    if row.get("nodes-declined"):
        parts.append(f"{row['nodes-declined']} node(s) declined")
    return " | ".join(parts)


def make_strategy(name: str, book: RoundBook, *, fraction_train: float, fraction_evaluate: float, min_nodes: int,
                  proximal_mu: float, server_lr: float, seed: int = 0):
    """The named Flower strategy with fedcvr's hooks.

    Rounds are numbered across a resumed run: `book.offset` rounds were done before, so Flower's round r is
    round r + offset everywhere (the nodes' `server-round`, FedAdam's bias correction, the log). Flower samples
    nodes with Python's `random`, which is seeded from `seed` and the round before each sampling, so a resumed
    run asks the same nodes as an uninterrupted one."""
    base = STRATEGIES[name]

    class Tracked(base):  # type: ignore[misc, valid-type]
        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Iterable[Message]:
            server_round += book.offset
            book.start(server_round)
            random.seed(seed * 1_000_003 + server_round)
            messages = list(super().configure_train(server_round, arrays, config, grid))
            book.current["bytes-sent"] += arrays.count_bytes() * len(messages)
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            replies = list(replies)
            for reply in replies:
                if reply.has_error():
                    book.current["nodes-declined"] += int("declined" in (reply.error.reason or ""))
                    book.current["declined"].append(reply.error.reason)
                elif "bytes-received" in reply.content["metrics"]:  # a secure round measured its own traffic
                    book.current["bytes-received"] += int(reply.content["metrics"]["bytes-received"])
                    book.current["bytes-sent"] = int(reply.content["metrics"]["bytes-sent"])
                else:
                    book.current["bytes-received"] += reply.content["arrays"].count_bytes()
            started = time.perf_counter()
            arrays, metrics = super().aggregate_train(server_round + book.offset, replies)
            book.current["aggregate-seconds"] = time.perf_counter() - started
            if metrics is not None:
                book.current.update(dict(metrics))
            if arrays is not None:
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
    return Tracked(**kwargs)
