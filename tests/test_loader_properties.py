"""Property-based tests of the data loader: whatever a merchant's tables hold, loading either returns every row
or raises the project's DataValidationError that lists the problems; never another exception, never a silently
dropped row."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedcvr.shared.data.contract import EVENT_TYPES, DataValidationError
from fedcvr.shared.data.loader import load_merchant

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.text(alphabet="abcdefghij0123456789-_", min_size=1, max_size=6)
titles = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=40).filter(str.strip)
stamps = st.one_of(
    st.datetimes(min_value=pd.Timestamp("2000-01-01").to_pydatetime(),
                 max_value=pd.Timestamp("2025-01-01").to_pydatetime()).map(lambda d: d.isoformat()),
    st.integers(min_value=946_684_800, max_value=1_735_689_600).map(str),
)
junk = st.one_of(
    st.none(), st.just(""), st.just("   "), st.just(float("nan")), st.text(max_size=20), st.integers(), st.floats(),
    st.booleans(), st.just("x" * 20_000), st.binary(max_size=8), st.just("\x00\ufffd\U0001f600"),
    st.just(float("inf")), st.just("1e400"), st.just("2200-01-01"), st.just("1700-01-01T00:00:00Z"),
)


@st.composite
def valid_tables(draw) -> tuple[pd.DataFrame, pd.DataFrame]:
    item_ids = draw(st.lists(ids, min_size=1, max_size=8, unique_by=lambda s: s.strip()))
    items = pd.DataFrame({"item_id": item_ids, "title": draw(st.lists(titles, min_size=len(item_ids),
                                                                      max_size=len(item_ids)))})
    if draw(st.booleans()):
        items["price"] = draw(st.lists(st.floats(min_value=0, max_value=1e6), min_size=len(item_ids),
                                       max_size=len(item_ids)))
    n = draw(st.integers(min_value=1, max_value=12))
    events = pd.DataFrame({
        "user_id": draw(st.lists(ids, min_size=n, max_size=n)),
        "item_id": draw(st.lists(st.sampled_from(item_ids), min_size=n, max_size=n)),
        "event": draw(st.lists(st.sampled_from(EVENT_TYPES), min_size=n, max_size=n)),
        "timestamp": draw(st.lists(stamps, min_size=n, max_size=n)),
    })
    if draw(st.booleans()):
        events["position"] = draw(st.lists(st.integers(min_value=0, max_value=50), min_size=n, max_size=n))
    return items, events


MUTATIONS = ("drop-column", "extra-column", "junk-cell", "junk-column", "duplicate-item", "none")


@st.composite
def mutated_tables(draw):
    items, events = draw(valid_tables())
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        table = draw(st.sampled_from(["items", "events"]))
        frame = items if table == "items" else events
        kind = draw(st.sampled_from(MUTATIONS))
        column = draw(st.sampled_from(list(frame.columns)))
        if kind == "drop-column" and len(frame.columns) > 1:
            frame = frame.drop(columns=column)
        elif kind == "extra-column":
            frame = frame.assign(**{draw(st.sampled_from(["note", "Title ", "user_id2"])): draw(junk)})
        elif kind == "junk-cell":
            frame = frame.astype(object)
            frame.iat[draw(st.integers(0, len(frame) - 1)), list(frame.columns).index(column)] = draw(junk)
        elif kind == "junk-column":
            frame = frame.assign(**{column: [draw(junk) for _ in range(len(frame))]})
        elif kind == "duplicate-item":
            frame = pd.concat([frame, frame.iloc[:1]], ignore_index=True)
        if table == "items":
            items = frame
        else:
            events = frame
    return items, events


def _write(folder: Path, items: pd.DataFrame, events: pd.DataFrame, fmt: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("items", items), ("events", events)):
        if fmt == "csv":
            text = frame.map(lambda v: v.decode("latin-1") if isinstance(v, bytes) else v)
            text.to_csv(folder / f"{name}.csv", index=False)
        else:
            try:
                frame.to_parquet(folder / f"{name}.parquet", index=False)
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                assume(False)  # pyarrow cannot store this mix of types: nothing for the loader to read


def _load(items, events, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shop"
        _write(folder, items, events, fmt)
        try:
            return load_merchant(folder), None
        except DataValidationError as err:
            return None, err


@SETTINGS
@given(valid_tables(), st.sampled_from(["csv", "parquet"]))
def test_valid_tables_load_with_every_row(tables, fmt):
    items, events = tables
    data, err = _load(items, events, fmt)
    assert err is None, str(err)
    assert len(data.items) == len(items) and len(data.events) == len(events)
    assert sorted(data.events["user_id"]) == sorted(events["user_id"].str.strip())


@SETTINGS
@given(mutated_tables(), st.sampled_from(["csv", "parquet"]))
def test_any_table_loads_whole_or_fails_with_the_validation_error(tables, fmt):
    items, events = tables
    data, err = _load(items, events, fmt)  # any other exception fails the test
    if err is not None:
        assert err.problems and all(p.message and p.fix for p in err.problems)
        text = str(err)
        assert "problem(s) in the data folder" in text and "fix:" in text
    else:
        assert len(data.items) == len(items) and len(data.events) == len(events)  # no row silently dropped
        assert data.items["item_id"].is_unique
        assert set(data.events["event"]) <= set(EVENT_TYPES)
        assert not data.events["timestamp"].isna().any()
        # nothing a model cannot use gets through: finite prices, plausible dates, bounded titles
        assert not np.isinf(data.items["price"]).any()
        latest = pd.Timestamp.now() + pd.Timedelta(days=2)
        assert data.events["timestamp"].between(pd.Timestamp("1990-01-01"), latest).all()
        assert (data.items["title"].str.len() <= 10_000).all()


@SETTINGS
# the bytes stay on line 2: no line break among them (b"\n\x80" puts the bad byte on line 3, as the loader says)
@given(valid_tables(), st.binary(min_size=1, max_size=4).filter(lambda b: _not_utf8(b) and not set(b) & {10, 13}))
def test_non_utf8_bytes_in_a_csv_are_a_validation_error_naming_the_line(tables, raw):
    items, events = tables
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shop"
        _write(folder, items, events, "csv")
        path = folder / "events.csv"
        lines = path.read_bytes().split(b"\n")
        lines[1] = lines[1] + raw
        path.write_bytes(b"\n".join(lines))
        try:
            load_merchant(folder)
        except DataValidationError as err:
            assert "is not UTF-8 text" in str(err) and "line 2" in str(err)
        else:
            raise AssertionError("non-UTF-8 bytes were accepted")


def _not_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_huge_strings_and_many_duplicates_are_reported_not_crashed(tmp_path):
    items = pd.DataFrame({"item_id": ["a", "a", "b"], "title": ["x" * 1_000_000, "y", "z"]})
    events = pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "event": ["impression"] * 3,
                           "timestamp": ["2024-01-01"] * 3})
    data, err = _load(items, events, "parquet")
    assert data is None
    assert "1 item id(s) that occur more than once" in str(err)
    assert "refers to 1 item id(s) not in the items table" in str(err)


def test_implausible_values_are_reported_with_every_other_problem(tmp_path):
    items = pd.DataFrame({"item_id": ["a", "b"], "title": ["x" * 1_000_000, "ok"], "price": [np.inf, 1e400]})
    events = pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"], "event": ["purchase", "purchase"],
                           "timestamp": ["1700-01-01", "2200-01-01"]})
    for fmt in ("csv", "parquet"):
        data, err = _load(items, events, fmt)
        assert data is None
        assert {p.column for p in err.problems} == {"title", "price", "timestamp"}
        assert next(p for p in err.problems if p.column == "price").count == 2


def test_float_ids_and_nan_in_required_columns(tmp_path):
    items = pd.DataFrame({"item_id": [1.5, np.nan], "title": ["a", None]})
    events = pd.DataFrame({"user_id": [np.nan], "item_id": ["1.5"], "event": ["view"], "timestamp": [np.nan]})
    data, err = _load(items, events, "parquet")
    assert data is None
    text = str(err)
    for needle in ("has type float64, but text is expected", "unknown event names ('view')",
                   "cannot be read as a date and time"):
        assert needle in text
