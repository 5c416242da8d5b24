"""The data contract of one merchant: an `items` table and an `events` table in one folder.

items:  item_id (str), title (str, at most 10,000 characters); optional description (at most 100,000), category,
        brand (str, at most 10,000), price (finite float >= 0)
events: user_id (str), item_id (str), event (impression | click | cart | purchase), timestamp (from 1990-01-01 to
        one day after now); optional session_id (str), position (int >= 0)

Each table is `items.parquet` or `items.csv` (likewise `events`). CSV files are UTF-8 with a header row.
Timestamps are ISO 8601 text (`2024-03-01T12:30:00Z`, `2024-03-01 12:30`) or Unix epoch seconds; they are read as UTC.
Extra columns are kept (the synthetic marketplace stores its ground-truth probabilities that way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

EVENT_TYPES: tuple[str, ...] = ("impression", "click", "cart", "purchase")
"""Event names in funnel order; their index is the event code used in examples."""

TABLE_NAMES: tuple[str, ...] = ("items", "events")
TABLE_FORMATS: tuple[str, ...] = (".parquet", ".csv")

ITEM_REQUIRED: tuple[str, ...] = ("item_id", "title")
ITEM_TEXT_OPTIONAL: tuple[str, ...] = ("description", "category", "brand")
EVENT_REQUIRED: tuple[str, ...] = ("user_id", "item_id", "event", "timestamp")

MAX_ROWS_SHOWN = 5

TEXT_LIMITS: dict[str, int] = {"title": 10_000, "description": 100_000, "category": 10_000, "brand": 10_000}
"""Most characters an item text may hold: longer values are an export error (a whole page pasted into a cell)."""
EARLIEST_TIMESTAMP = "1990-01-01"
FUTURE_TOLERANCE_HOURS = 24
"""Timestamps before EARLIEST_TIMESTAMP or more than this many hours after now are typos or wrong units."""


@dataclass(frozen=True)
class DataProblem:
    """One problem found in a merchant's data, with where it is and how to fix it.

    `rows` holds (location, value) pairs of a few offending rows; `count` is how many rows are affected in all.
    A location is a file line number for CSV (the header is line 1) and a 0-based row index for Parquet.
    """

    file: str
    column: str | None
    message: str
    fix: str
    rows: tuple[tuple[str, str], ...] = ()
    count: int = 0

    def __str__(self) -> str:
        where = self.file if self.column is None else f"{self.file}, column '{self.column}'"
        text = f"{where}: {self.message}"
        if self.rows:
            shown = "; ".join(f"{loc}: {val}" for loc, val in self.rows)
            more = f" (and {self.count - len(self.rows)} more)" if self.count > len(self.rows) else ""
            text += f"\n    offending rows: {shown}{more}"
        return f"{text}\n    fix: {self.fix}"


@dataclass
class DataValidationError(ValueError):
    """All problems found in one data folder, raised once after every check has run."""

    folder: str
    problems: list[DataProblem] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"{len(self.problems)} problem(s) in the data folder {self.folder}:"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def timestamp_window(now: datetime | None = None) -> tuple[datetime, datetime]:
    """The (earliest, latest) plausible event time as naive UTC: EARLIEST_TIMESTAMP and now + the tolerance."""
    now = now or datetime.now(UTC).replace(tzinfo=None)
    return datetime.fromisoformat(EARLIEST_TIMESTAMP), now + timedelta(hours=FUTURE_TOLERANCE_HOURS)
