"""The fedcvr ServerApp: what runs at the coordinator.

For now it runs the federated data census: wait for `min-nodes` nodes (at most `round-timeout` seconds), send
a `query.census` message to every connected node, add up the counts of the nodes that replied (logging the
errors of those that failed), derive the funnel rates and log them; with a non-empty `out-dir` the result is
also written to `<out-dir>/census.json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedcvr.shared.census import (
    CENSUS_MESSAGE_TYPE,
    CENSUS_RECORD,
    finalise_census,
    format_census,
    merge_census,
)

from .config import ServerConfig

CENSUS_FILE = "census.json"
POLL_SECONDS = 1.0

app = ServerApp()


class CensusError(RuntimeError):
    """The census could not be taken (too few nodes, or no node replied)."""


@dataclass
class CensusResult:
    """Merged census totals, their rates, and which nodes were asked, answered or failed."""

    totals: dict[str, int]
    rates: dict[str, float | None]
    nodes_asked: list[int]
    nodes_replied: list[int]
    failures: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "totals": self.totals,
            "rates": self.rates,
            "nodes": {
                "asked": len(self.nodes_asked),
                "replied": len(self.nodes_replied),
                "failed": [{"node_id": node, "reason": reason}
                           for node, reason in sorted(self.failures.items())],
            },
        }


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float, *, sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> list[int]:
    """The connected node ids once at least `min_nodes` are connected; CensusError after `timeout` seconds."""
    deadline = clock() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes:
            return nodes
        if clock() >= deadline:
            raise CensusError(
                f"only {len(nodes)} node(s) connected within round-timeout = {timeout:g} s, but min-nodes "
                f"= {min_nodes}: start more SuperNodes (in simulation raise num-supernodes), lower "
                "min-nodes, or raise round-timeout.")
        log(INFO, "Waiting for nodes: %d connected, min-nodes = %d", len(nodes), min_nodes)
        sleep(POLL_SECONDS)


def collect_census(grid: Grid, nodes: list[int], timeout: float) -> CensusResult:
    """Send the census query to `nodes` and merge the counts of those that reply; failures are logged."""
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type=CENSUS_MESSAGE_TYPE)
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    parts: list[dict[str, int]] = []
    replied: list[int] = []
    failures: dict[int, str] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            failures[node] = reply.error.reason or f"error code {reply.error.code}"
        elif CENSUS_RECORD not in reply.content.metric_records:
            failures[node] = f"the reply has no '{CENSUS_RECORD}' metric record"
        else:
            parts.append(dict(reply.content.metric_records[CENSUS_RECORD]))
            replied.append(node)
    for node in nodes:
        if node not in replied and node not in failures:
            failures[node] = f"no reply within round-timeout = {timeout:g} s"
    for node, reason in sorted(failures.items()):
        log(ERROR, "Node %s failed the census: %s", node, reason)
    if not parts:
        raise CensusError(f"none of the {len(nodes)} node(s) answered the census; see the errors above.")
    totals = merge_census(parts)
    return CensusResult(totals, finalise_census(totals), nodes, sorted(replied), failures)


def write_census(result: CensusResult, out_dir: Path) -> Path:
    """Write the census to `<out_dir>/census.json` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CENSUS_FILE
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


def run_census(grid: Grid, config: ServerConfig) -> CensusResult:
    """Wait for nodes, take the census, log it and, with `out-dir` set, write it."""
    nodes = wait_for_nodes(grid, config.min_nodes, config.round_timeout)
    log(INFO, "Census: asking %d node(s)", len(nodes))
    result = collect_census(grid, nodes, config.round_timeout)
    if result.failures:
        log(WARNING, "Census covers %d of %d node(s)", len(result.nodes_replied), len(nodes))
    log(INFO, "Census totals and rates:\n%s", format_census(result.totals, result.rates))
    if config.out_dir is not None:
        log(INFO, "Census written to %s", write_census(result, config.out_dir))
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_census(grid, ServerConfig.from_run_config(context.run_config))
