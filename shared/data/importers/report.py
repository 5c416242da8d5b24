"""What every importer shares: the error type for bad input, the import report, the progress display and
the writer that splits events into one merchant folder per partition."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..contract import TEXT_LIMITS, timestamp_window
from ..learnable import MIN_ITEMS
from ..loader import is_merchant_folder
from ..pseudonym import merchant_key, pseudonymise
from ..writer import safe_folder_name, write_merchant

ITEM_COLUMNS = ("item_id", "title", "description", "category", "brand", "price")
EVENT_COLUMNS = ("user_id", "item_id", "event", "timestamp", "session_id")


class ImportInputError(ValueError):
    """The importer's input cannot be used; the message names the file, what is wrong and how to fix it."""


@dataclass
class ImportReport:
    """Counts of one import. `dropped` maps a reason (prefixed by its rule) to the number of rows it removed."""

    source: str
    out: Path
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    users: int = 0
    items: int = 0
    events: int = 0
    partitions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def drop(self, reason: str, count: int) -> None:
        """Record `count` rows removed for `reason` (reasons keep the order in which they were first added)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + int(count)


def make_progress(enabled: bool, *, bytes_total: bool = False) -> Progress:
    """A transient rich progress display on stderr; a silent one when `enabled` is False or stderr is not a
    terminal (logs and pipes get the final counts only)."""
    console = Console(stderr=True)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
    columns.append(DownloadColumn() if bytes_total else TextColumn("{task.completed:,.0f} rows"))
    columns.append(TimeElapsedColumn())
    return Progress(*columns, console=console, transient=True, disable=not (enabled and console.is_terminal))


def fit_contract(items: pd.DataFrame, events: pd.DataFrame, report: ImportReport) -> tuple[pd.DataFrame,
                                                                                          pd.DataFrame]:
    """What the contract refuses, made to fit and counted: events dated outside the plausible window are dropped
    (counted in the report), non-finite prices become missing and item texts longer than their limit are cut to it
    (each said in a note)."""
    earliest, latest = timestamp_window()
    outside = ~events["timestamp"].between(earliest, latest)
    if outside.any():
        report.drop(f"events dated before {earliest:%Y-%m-%d} or more than a day ahead of the import", outside.sum())
        events = events[~outside]
    items = items.copy()
    price = pd.to_numeric(items["price"], errors="coerce").astype("float64")
    infinite = np.isinf(price.to_numpy())
    if infinite.any():
        report.notes.append(f"{int(infinite.sum()):,} item price(s) were not finite (infinity) and are left empty")
    items["price"] = price.mask(infinite)
    for column, limit in TEXT_LIMITS.items():
        text = items[column].fillna("").astype(str)
        long = text.str.len() > limit
        if long.any():
            report.notes.append(f"{int(long.sum()):,} item {column}(s) longer than {limit:,} characters were cut to "
                                f"{limit:,}")
            items[column] = text.where(~long, text.str.slice(0, limit).str.rstrip())
    return items, events


def write_partitions(out: Path, items: pd.DataFrame, events: pd.DataFrame, report: ImportReport,
                     progress: Progress | None = None) -> None:
    """Write one merchant folder per value of `events["partition"]` under `out`.

    Folder names are `safe_folder_name(partition)`; values that give the same name share one folder. A folder's
    items table holds exactly the items its events refer to. Shopper ids are written as pseudonyms under the
    folder's own key (`pseudonym.py`): no raw id reaches a written table. Values the contract refuses are made to
    fit first (`fit_contract`). Folders of fewer than 2 items are written too, and named in a note: validation
    warns about them and training refuses their all-positive examples. Fills the report's users, items, events
    and partitions (folder name -> events).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ImportInputError(f"{out}: exists and is not a folder. fix: pass a folder path to --out.")
    items, events = fit_contract(items, events, report)
    if events.empty:
        raise ImportInputError(f"{report.source}: no event is left to import (see the counts of dropped rows). fix: "
                               "check the dates of the source file.")
    partition = events["partition"].fillna("").astype(str).astype("category")
    names = np.array([safe_folder_name(c) if c.strip() else "unknown" for c in partition.cat.categories] or [""],
                     dtype=object)
    events = events.assign(_folder=names[partition.cat.codes.to_numpy()])
    items = items.set_index("item_id", drop=False)
    groups = events.groupby("_folder", sort=True)
    task = progress.add_task("writing folders", total=groups.ngroups) if progress is not None else None
    small: list[str] = []
    for folder, part in groups:
        part = part.sort_values("timestamp", kind="stable")
        part_items = items.loc[pd.unique(part["item_id"]), list(ITEM_COLUMNS)].reset_index(drop=True)
        columns = [c for c in EVENT_COLUMNS if c in part.columns]
        written = part[columns].reset_index(drop=True)
        written["user_id"] = pseudonymise(written["user_id"], merchant_key(out / str(folder)))
        write_merchant(out / str(folder), part_items, written)
        report.partitions[str(folder)] = len(part)
        if len(part_items) < MIN_ITEMS:
            small.append(str(folder))
        if progress is not None:
            progress.advance(task)
    report.users = int(events["user_id"].nunique())
    report.items = int(events["item_id"].nunique())
    report.events = len(events)
    if small:
        report.notes.append(
            f"{len(small):,} of {len(report.partitions):,} folder(s) hold a single item ({', '.join(small[:5])}"
            f"{' ...' if len(small) > 5 else ''}): no negative example can be drawn for their purchases, so "
            "`fedcvr data validate` warns about them and training refuses them; leave them out of training, or "
            "partition more coarsely (e.g. Amazon's default --partition-by) to keep their data")
    stale = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in report.partitions
                   and is_merchant_folder(p))
    if stale:
        report.notes.append(f"{out} also holds merchant folder(s) this import did not write: {', '.join(stale[:5])}"
                            f"{' ...' if len(stale) > 5 else ''}; remove them if they are left from an earlier run")


def report_table(report: ImportReport, user_word: str = "users", partition_word: str = "partitions") -> Table:
    """The report as a rich table: rows read, rows dropped per rule, and what was written."""
    table = Table(title=f"Imported {report.source}", show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("rows read", f"{report.rows_read:,}")
    for reason, count in report.dropped.items():
        table.add_row(f"  {reason}", f"{count:,}")
    table.add_row(user_word, f"{report.users:,}", end_section=False)
    table.add_row("items", f"{report.items:,}")
    table.add_row(partition_word, f"{len(report.partitions):,}")
    table.add_row("purchase events", f"{report.events:,}")
    table.add_row("seconds", f"{report.seconds:.1f}")
    return table
