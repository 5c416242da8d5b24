"""Load one merchant's data folder, validating it against the contract.

`load_merchant(folder)` reads `items` and `events` (Parquet or CSV), runs every check, and raises one
`DataValidationError` listing all problems; on success it returns tables with normalised types:

items:  item_id, title, description, category, brand (str, "" where absent), price (float64, NaN where absent)
events: user_id, item_id, event (str), timestamp (datetime64[ns], UTC, naive), session_id (str, if given),
        position (Int64, if given), and any extra columns as they were; sorted by timestamp (stable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .contract import (
    EVENT_REQUIRED,
    EVENT_TYPES,
    ITEM_REQUIRED,
    ITEM_TEXT_OPTIONAL,
    MAX_ROWS_SHOWN,
    TABLE_NAMES,
    TEXT_LIMITS,
    DataProblem,
    DataValidationError,
    timestamp_window,
)
from .learnable import folder_warnings
from .tables import find_table, is_merchant_folder, merchant_folders, read_table

__all__ = ["MerchantData", "find_table", "is_merchant_folder", "load_merchant", "merchant_folders", "read_table"]

_ID_COLUMNS = ("item_id", "user_id", "session_id")
_TEXT_COLUMNS = ("title", *ITEM_TEXT_OPTIONAL, "event")


@dataclass
class MerchantData:
    """One merchant's validated catalog and behaviour log."""

    name: str
    folder: Path
    items: pd.DataFrame
    events: pd.DataFrame
    warnings: list[DataProblem] = field(default_factory=list)
    """What the contract allows but training may not learn from (see `learnable.folder_warnings`)."""


class _Checker:
    """Collects problems for one file, naming rows the way the file's format counts them."""

    def __init__(self, path: Path, problems: list[DataProblem]):
        self.path = path
        self.is_csv = path.suffix == ".csv"
        self.problems = problems

    def location(self, index: int) -> str:
        return f"line {index + 2}" if self.is_csv else f"row {index}"

    def add(self, column: str | None, message: str, fix: str, bad: pd.Series | None = None,
            values: pd.Series | None = None, described: bool = False) -> None:
        """Add a problem; `values` are shown by their repr, or as they are when `described` (labels made here)."""
        rows: tuple[tuple[str, str], ...] = ()
        count = 0
        if bad is not None:
            positions = np.flatnonzero(bad.to_numpy())
            count = len(positions)
            shown = positions[:MAX_ROWS_SHOWN]
            if values is not None:
                show = str if described else repr
                rows = tuple((self.location(int(i)), show(values.iloc[int(i)])) for i in shown)
            else:
                rows = tuple((self.location(int(i)), "") for i in shown)
        self.problems.append(DataProblem(str(self.path), column, message, fix, rows, count))


def _as_text(frame: pd.DataFrame, column: str, check: _Checker) -> pd.Series | None:
    """The column as str with missing values as None, or None (and a problem) when its type is not text."""
    series = frame[column]
    if pd.api.types.is_integer_dtype(series) and column in _ID_COLUMNS:
        return series.astype("int64").astype(str)
    if isinstance(series.dtype, pd.StringDtype):
        return series.astype(object).where(series.notna(), None)
    if pd.api.types.is_object_dtype(series):
        non_str = series.map(lambda v: not (v is None or isinstance(v, str) or (isinstance(v, float) and v != v)))
        non_str = non_str.astype(bool)
        if non_str.any():
            check.add(column, "holds values that are not text", f"store '{column}' as a string column",
                      non_str, series)
            return None
        return series.where(series.notna(), None)
    check.add(column, f"has type {series.dtype}, but text is expected",
              f"store '{column}' as a string column (ids such as 17850.0 should be written as '17850')")
    return None


def _blank(series: pd.Series) -> pd.Series:
    """Missing or whitespace-only values of a text column (str or None only, as `_as_text` returns)."""
    return series.isna() | (series.astype(str).str.strip() == "")


def _blank_raw(series: pd.Series) -> pd.Series:
    """Missing or whitespace-only values of a column as read, whatever its values' types (bytes included)."""
    return series.astype(object).map(
        lambda v: v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())
    ).astype(bool)


def _missing_columns(frame: pd.DataFrame, required: tuple[str, ...], check: _Checker, table: str) -> list[str]:
    missing = [c for c in required if c not in frame.columns]
    for column in missing:
        found = ", ".join(map(str, frame.columns))
        check.add(column, f"required column '{column}' is missing (columns found: {found})",
                  f"add a '{column}' column to the {table} table, or rename the column that holds it")
    return missing


def _validate_items(frame: pd.DataFrame, check: _Checker) -> pd.DataFrame | None:
    missing = _missing_columns(frame, ITEM_REQUIRED, check, "items")
    if len(frame) == 0:
        check.add(None, "the items table has no rows", "add at least one item to the catalog")
        return None
    out = pd.DataFrame(index=frame.index)
    ok = not missing
    for column in ("item_id", "title", *ITEM_TEXT_OPTIONAL):
        if column not in frame.columns:
            out[column] = ""
            continue
        text = _as_text(frame, column, check)
        if text is None:
            ok = False
            continue
        out[column] = text
    if "item_id" in frame.columns and "item_id" in out and out["item_id"].dtype == object:
        ids = out["item_id"]
        blank = _blank(ids)
        if blank.any():
            check.add("item_id", "has empty item ids", "give every item a non-empty item_id", blank, ids)
            ok = False
        stripped = ids.astype(str).str.strip()
        dup = stripped.duplicated(keep=False) & ~blank
        if dup.any():
            check.add("item_id", f"has {stripped[dup].nunique()} item id(s) that occur more than once",
                      "keep one row per item_id (merge or drop the duplicates)", dup, ids)
            ok = False
        out["item_id"] = stripped
    if "title" in frame.columns and "title" in out:
        blank = _blank(out["title"])
        if blank.any():
            check.add("title", "has empty titles", "give every item a title (the product name shoppers see)",
                      blank, out["item_id"] if "item_id" in out else None)
            ok = False
    for column in ("title", *ITEM_TEXT_OPTIONAL):
        if column in out:
            out[column] = out[column].fillna("").astype(str).str.strip()
            ok = _check_length(out, column, check) and ok
    if "price" in frame.columns:
        raw = frame["price"]
        price = pd.to_numeric(raw, errors="coerce")
        unparsable = price.isna() & ~_blank_raw(raw)
        if unparsable.any():
            check.add("price", "has values that are not numbers",
                      "write prices as plain numbers with a dot for decimals (e.g. 12.99), no currency signs",
                      unparsable, raw)
            ok = False
        infinite = pd.Series(np.isinf(price.to_numpy(dtype="float64")), index=price.index)
        if infinite.any():
            check.add("price", "has prices that are not finite (infinity)",
                      "write the item's price as a finite number >= 0, or leave it empty when it is unknown",
                      infinite, _with_item(out, raw.map(repr)), described=True)
            ok = False
        negative = (price < 0) & ~infinite
        if negative.any():
            check.add("price", "has negative prices", "prices must be >= 0", negative, raw)
            ok = False
        out["price"] = price.astype("float64")
    else:
        out["price"] = np.nan
    return out.reset_index(drop=True) if ok else None


def _with_item(out: pd.DataFrame, shown: pd.Series) -> pd.Series:
    """Each row's shown value labelled with its item id, for problems whose value alone does not say which item."""
    ids = out["item_id"].astype(str) if "item_id" in out else pd.Series("?", index=shown.index)
    return pd.Series([f"item_id {i!r}: {v}" for i, v in zip(ids, shown)], index=shown.index)


def _check_length(out: pd.DataFrame, column: str, check: _Checker) -> bool:
    """Whether every value of an item text column is within its limit; adds the problem when not (the values
    themselves are not repeated: they can be megabytes)."""
    limit = TEXT_LIMITS[column]
    length = out[column].str.len()
    long = length > limit
    if not long.any():
        return True
    shown = _with_item(out, length.map(lambda n: f"{n:,} characters"))
    check.add(column, f"has values longer than {limit:,} characters",
              f"keep '{column}' to what shoppers read (at most {limit:,} characters): a longer value is usually "
              "a whole page or file pasted into one cell", long, shown, described=True)
    return False


def _parse_timestamps(raw: pd.Series) -> pd.Series:
    """Parse timestamps to naive UTC datetime64[ns]; unparsable values become NaT."""
    if pd.api.types.is_datetime64_any_dtype(raw):
        parsed = pd.to_datetime(raw, utc=True)
    elif pd.api.types.is_numeric_dtype(raw):
        parsed = pd.to_datetime(raw, unit="s", utc=True, errors="coerce")
    else:
        text = raw.astype(object).where(raw.notna(), None)
        as_str = text.astype(str).str.strip()
        numeric = as_str.str.fullmatch(r"-?\d+(\.\d+)?")
        parsed = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns, UTC]")
        if numeric.any():
            parsed[numeric] = pd.to_datetime(pd.to_numeric(as_str[numeric]), unit="s", utc=True, errors="coerce")
        rest = ~numeric & text.notna()
        if rest.any():
            try:
                parsed[rest] = pd.to_datetime(as_str[rest], utc=True, errors="coerce", format="ISO8601")
            except (ValueError, TypeError):
                pass
            retry = rest & parsed.isna()
            if retry.any():
                parsed[retry] = pd.to_datetime(as_str[retry], utc=True, errors="coerce", format="mixed")
    return parsed.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[ns]")


def _validate_events(frame: pd.DataFrame, check: _Checker, item_ids: set[str] | None) -> pd.DataFrame | None:
    missing = _missing_columns(frame, EVENT_REQUIRED, check, "events")
    if len(frame) == 0:
        check.add(None, "the events table has no rows", "add the merchant's behaviour log (at least one event)")
        return None
    ok = not missing
    out = pd.DataFrame(index=frame.index)
    for column in ("user_id", "item_id", "event", "session_id"):
        if column not in frame.columns:
            continue
        text = _as_text(frame, column, check)
        if text is None:
            ok = False
            continue
        if column != "session_id":
            blank = _blank(text)
            if blank.any():
                check.add(column, f"has empty {column} values", f"fill in {column} on every event or drop those rows",
                          blank, text)
                ok = False
        out[column] = text.fillna("").astype(str).str.strip()
    if "event" in out:
        names = out["event"].str.lower()
        unknown = ~names.isin(EVENT_TYPES) & ~_blank(out["event"])
        if unknown.any():
            seen = ", ".join(repr(v) for v in out["event"][unknown].unique()[:MAX_ROWS_SHOWN])
            check.add("event", f"has unknown event names ({seen})",
                      f"use only {', '.join(EVENT_TYPES)} (map e.g. 'view' to impression, 'add_to_cart' to cart)",
                      unknown, out["event"])
            ok = False
        out["event"] = names
    if "item_id" in out and item_ids is not None:
        unknown_item = ~out["item_id"].isin(item_ids) & ~_blank(out["item_id"])
        if unknown_item.any():
            n_unknown = out["item_id"][unknown_item].nunique()
            check.add("item_id", f"refers to {n_unknown} item id(s) not in the items table",
                      "add those items to the items table or drop their events", unknown_item, out["item_id"])
            ok = False
    if "timestamp" in frame.columns:
        raw = frame["timestamp"]
        try:
            parsed = _parse_timestamps(raw)
        except (ValueError, TypeError, OverflowError):
            parsed = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns]")
        bad = parsed.isna()
        if bad.any():
            check.add("timestamp", "has values that cannot be read as a date and time",
                      "write ISO 8601 timestamps such as 2024-03-01T12:30:00Z, or Unix epoch seconds", bad, raw)
            ok = False
        earliest, latest = timestamp_window()
        outside = ~bad & ((parsed < earliest) | (parsed > latest))
        if outside.any():
            check.add("timestamp", f"has dates outside {earliest:%Y-%m-%d} .. {latest:%Y-%m-%d %H:%M} UTC (before "
                      "1990 or more than a day ahead of now: a typo or a wrong unit)",
                      "correct those dates; write Unix epoch seconds (not milliseconds) since "
                      "1970-01-01 UTC", outside, raw)
            ok = False
        out["timestamp"] = parsed
    if "position" in frame.columns:
        raw = frame["position"]
        number = pd.to_numeric(raw, errors="coerce")
        blank = _blank_raw(raw)
        bad = (~blank) & (number.isna() | (number < 0) | (number.fillna(0) % 1 != 0))
        if bad.any():
            check.add("position", "has values that are not whole numbers >= 0",
                      "write the slot where the item was shown as 0, 1, 2, ... (or leave it empty)", bad, raw)
            ok = False
        else:
            out["position"] = number.astype("Int64")
    if not ok:
        return None
    for column in frame.columns:
        if column not in out and column not in EVENT_REQUIRED:
            out[column] = frame[column]
    return out.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _readable_item_ids(path: Path) -> set[str] | None:
    """Item ids of an items table that failed validation, so events can still be checked against them."""
    frame, problem = read_table(path)
    if problem or frame is None or "item_id" not in frame.columns:
        return None
    ids = frame["item_id"]
    if not (pd.api.types.is_integer_dtype(ids) or pd.api.types.is_string_dtype(ids)
            or pd.api.types.is_object_dtype(ids)):
        return None
    if pd.api.types.is_integer_dtype(ids):
        return set(ids.astype("int64").astype(str))
    return {v.strip() for v in ids.dropna() if isinstance(v, str)}


def load_merchant(folder: str | Path) -> MerchantData:
    """Read and validate one merchant folder; raise `DataValidationError` with every problem found."""
    folder = Path(folder)
    problems: list[DataProblem] = []
    if not folder.is_dir():
        raise DataValidationError(str(folder), [DataProblem(
            str(folder), None, "the folder does not exist",
            "pass a folder holding items.parquet|csv and events.parquet|csv")])
    paths = {}
    for name in TABLE_NAMES:
        found = find_table(folder, name)
        if isinstance(found, DataProblem):
            problems.append(found)
        else:
            paths[name] = found
    items = events = None
    if "items" in paths:
        frame, problem = read_table(paths["items"])
        if problem:
            problems.append(problem)
        else:
            items = _validate_items(frame, _Checker(paths["items"], problems))
    if "events" in paths:
        frame, problem = read_table(paths["events"])
        if problem:
            problems.append(problem)
        else:
            known = set(items["item_id"]) if items is not None else (
                _readable_item_ids(paths["items"]) if "items" in paths else None)
            events = _validate_events(frame, _Checker(paths["events"], problems), known)
    if problems:
        raise DataValidationError(str(folder), problems)
    return MerchantData(name=folder.name, folder=folder, items=items, events=events,
                        warnings=folder_warnings(paths["items"], paths["events"], items, events))
