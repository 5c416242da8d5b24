"""The round records a ServerApp writes into its run folder (`rounds.jsonl`, `history.json`), read while the run
goes and afterwards, and their formatting: the rounds table, the progress text, the privacy line (ε with its δ).

Contract with the ServerApp (it writes into the run config's `out-dir`, which is the run folder):
  * after each finished round it appends one JSON object and a newline to `rounds.jsonl`, e.g.
    {"round": 1, "seconds": 12.3, "ctcvr.auc": 0.61, "click.auc": 0.66, "ctcvr.gauc": 0.58,
     "ctcvr.logloss": 0.05, "ndcg@10": 0.21, "max-epsilon": 1.9, "delta": 1e-05, "bytes-sent": 123456,
     "bytes-received": 123456, "nodes-trained": 3, "nodes-declined": 0}
    ("round" is a whole number from 1; any other key is optional and may be null; keys are kebab-case, and they
    are also read spelt with _ for -, as in "max_epsilon"; "max-epsilon" and "delta" are the largest ε and the
    largest δ of any node so far, a pair that every node's guarantee meets);
  * at the end it writes `history.json`: a JSON list of those objects.
`read_rounds` reads `rounds.jsonl` while the run goes (a last line without its newline is still being written and
is read on a later poll); `write_history_csv` writes `history.csv` from `history.json`, or from `rounds.jsonl` when
the server wrote no history.json.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .flower_app import HISTORY_FILE, ROUNDS_FILE, flatten

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """flwr's output without its terminal colour codes."""
    return ANSI.sub("", text)

def _parse_record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_rounds(path: Path, offset: int = 0, final: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Round records appended to `path` (JSON lines) after byte `offset`, and the offset to read on from.

    Only complete lines (ending in a newline) are read: a last line without one is still being written and is
    left for the next call, unless `final` (the writer is done), when it is read if it parses. Lines that are not
    a JSON object are skipped."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    complete, rest = data[:end], data[end:]
    records = [r for line in complete.splitlines() if line.strip() and (r := _parse_record(line)) is not None]
    if final and rest.strip() and (record := _parse_record(rest)) is not None:
        records.append(record)
        end = len(data)
    return records, offset + end


def _by_round(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per round (the last one written wins), in round order."""
    latest: dict[Any, dict[str, Any]] = {}
    for record in records:
        latest[record.get("round", len(latest) + 1)] = record
    return sorted(latest.values(), key=lambda r: (not isinstance(r.get("round"), int), r.get("round", 0)))


def load_history(run_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The round records of a finished run and the file they came from: history.json when it is a JSON list of
    objects, else rounds.jsonl; ([], None) when there is neither."""
    history = run_dir / HISTORY_FILE
    if history.is_file():
        try:
            records = json.loads(history.read_text())
        except ValueError:
            records = None
        if isinstance(records, list) and all(isinstance(r, dict) for r in records):
            return _by_round(records), HISTORY_FILE
    rounds = run_dir / ROUNDS_FILE
    if rounds.is_file():
        return _by_round(read_rounds(rounds, final=True)[0]), ROUNDS_FILE
    return [], None


def write_history_csv(records: list[dict[str, Any]], path: Path) -> Path:
    """One row per round, "round" first, then every other key in the order first seen (nested objects are
    flattened to dotted columns; missing and null values are empty cells)."""

    rows = [flatten(r) for r in records]
    columns = ["round"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else
                             json.dumps(row[c]) if isinstance(row[c], list) else row[c] for c in columns])
    return path


TABLE_COLUMNS = ("round", "ctcvr.auc", "click.auc", "ctcvr.gauc", "ctcvr.logloss", "ndcg@10", "max ε (max δ)",
                 "MB sent / received", "seconds")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def format_metric(value: Any, digits: int = 4) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.{digits}f}"


def format_epsilon(epsilon: Any, delta: Any = None) -> str:
    """"1.93 (δ=1e-05)"; "∞" when no finite guarantee holds; "n/a" when the round reports none (DP off)."""
    number = _number(epsilon)
    if number is None:
        return "n/a"
    text = "∞" if math.isinf(number) else f"{number:.2f}"
    delta = _number(delta)
    return text if delta is None else f"{text} (δ={delta:.3g})"


def format_megabytes(sent: Any, received: Any) -> str:
    sent, received = _number(sent), _number(received)
    if sent is None and received is None:
        return "n/a"
    return " / ".join("n/a" if b is None else f"{b / 1e6:.2f}" for b in (sent, received))


def field_of(record: Mapping[str, Any], name: str) -> Any:
    """`record[name]`, also when the server spells it with - for _ or the other way round (max-epsilon)."""
    for key in (name, name.replace("_", "-"), name.replace("-", "_")):
        if key in record:
            return record[key]
    return None


def round_cells(record: Mapping[str, Any]) -> list[str]:
    """The cells of one round's row, in TABLE_COLUMNS order."""
    seconds = _number(field_of(record, "seconds"))
    # purchase logs rank each shopper's next basket (nb.all.ndcg@10) where impression logs rank each purchase
    ndcg = record.get("ndcg@10", record.get("nb.all.ndcg@10"))
    return [str(record.get("round", "?")),
            *(format_metric(record.get(k)) for k in ("ctcvr.auc", "click.auc", "ctcvr.gauc", "ctcvr.logloss")),
            format_metric(ndcg),
            format_epsilon(field_of(record, "max_epsilon"), field_of(record, "delta")),
            format_megabytes(field_of(record, "bytes_sent"), field_of(record, "bytes_received")),
            "n/a" if seconds is None else f"{seconds:.1f}"]


def rounds_table(records: list[dict[str, Any]], title: str = "Federated rounds"):
    from rich.table import Table

    table = Table(title=title)
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="right")
    for record in records:
        table.add_row(*round_cells(record))
    table.caption = ("metrics of the global model on the nodes' held-out data after each round, as the ServerApp "
                     "reports them; max ε (max δ): the largest ε and the largest δ of any node so far, so every "
                     "node's training is (ε, δ)-DP within that pair; MB: 10^6 bytes of "
                     "model weights sent to / received from the nodes")
    return table


def progress_text(record: Mapping[str, Any] | None) -> str:
    """What the progress line shows after a round: its ctcvr.auc and the worst (ε, δ) of any node."""
    if record is None:
        return "waiting for round 1"
    return (f"ctcvr.auc {format_metric(record.get('ctcvr.auc'))}  "
            f"max ε {format_epsilon(field_of(record, 'max_epsilon'), field_of(record, 'delta'))}")


def privacy_line(records: Iterable[Mapping[str, Any]]) -> str:
    """The run's privacy in one line: the largest ε and the largest δ of any node over all rounds (ε adds up on
    each node, so the largest of any round is the largest spent), the pair every node's guarantee meets."""
    epsilons = [e for r in records if (e := _number(field_of(r, "max_epsilon"))) is not None]
    deltas = [d for r in records if (d := _number(field_of(r, "delta"))) is not None]
    if not epsilons:
        return "privacy: no node reported ε (DP off): no privacy guarantee"
    if not deltas or math.isinf(max(epsilons)):
        return f"privacy: max ε {format_epsilon(max(epsilons))}: no finite guarantee"
    return (f"privacy: every node's training is ({max(epsilons):.2f}, {max(deltas):.3g})-DP or better for the "
            "whole run (the largest ε and the largest δ of any node)")


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(strip_ansi(text).splitlines()[-lines:])
