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


def write_partitions(out: Path, items: pd.DataFrame, events: pd.DataFrame, report: ImportReport,
                     progress: Progress | None = None) -> None:
    """Write one merchant folder per value of `events["partition"]` under `out`.

    Folder names are `safe_folder_name(partition)`; values that give the same name share one folder. A folder's
    items table holds exactly the items its events refer to. Shopper ids are written as pseudonyms under the
    folder's own key (`pseudonym.py`): no raw id reaches a written table. Fills the report's users, items, events
    and partitions (folder name -> events).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ImportInputError(f"{out}: exists and is not a folder. fix: pass a folder path to --out.")
    partition = events["partition"].fillna("").astype(str).astype("category")
    names = np.array([safe_folder_name(c) if c.strip() else "unknown" for c in partition.cat.categories] or [""],
                     dtype=object)
    events = events.assign(_folder=names[partition.cat.codes.to_numpy()])
    items = items.set_index("item_id", drop=False)
    groups = events.groupby("_folder", sort=True)
    task = progress.add_task("writing folders", total=groups.ngroups) if progress is not None else None
    for folder, part in groups:
        part = part.sort_values("timestamp", kind="stable")
        part_items = items.loc[pd.unique(part["item_id"]), list(ITEM_COLUMNS)].reset_index(drop=True)
        columns = [c for c in EVENT_COLUMNS if c in part.columns]
        written = part[columns].reset_index(drop=True)
        written["user_id"] = pseudonymise(written["user_id"], merchant_key(out / str(folder)))
        write_merchant(out / str(folder), part_items, written)
        report.partitions[str(folder)] = len(part)
        if progress is not None:
            progress.advance(task)
    report.users = int(events["user_id"].nunique())
    report.items = int(events["item_id"].nunique())
    report.events = len(events)
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
