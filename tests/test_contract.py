"""The data contract: every bad input gives one clear problem naming file, column, rows and fix."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import good_events, good_items, write_tables
from fedcvr.cli import app
from fedcvr.shared.data.contract import DataValidationError
from fedcvr.shared.data.loader import load_merchant, merchant_folders


def problems_of(folder) -> list:
    with pytest.raises(DataValidationError) as info:
        load_merchant(folder)
    return info.value.problems


def only(problems, column):
    found = [p for p in problems if p.column == column]
    assert len(found) == 1, [str(p) for p in problems]
    return found[0]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_good_folder_loads_with_normalised_types(tmp_path, fmt):
    data = load_merchant(write_tables(tmp_path / "m", good_items(), good_events(), fmt))
    assert list(data.items["item_id"]) == ["a", "b", "c"]
    assert data.items["description"].tolist() == ["Warm", "", "Boils fast"]
    assert data.items["price"].isna().tolist() == [False, False, True]
    assert str(data.events["timestamp"].dtype) == "datetime64[ns]"
    assert data.events["timestamp"].is_monotonic_increasing
    # "1709287200" is epoch seconds = 2024-03-01T10:00:00Z; "2024-03-01 10:01" is read as UTC
    stamps = set(data.events["timestamp"].astype(str))
    assert "2024-03-01 10:00:00" in stamps and "2024-03-01 10:01:00" in stamps
    assert data.events["position"].dtype == "Int64"


def test_event_names_are_normalised_for_case_and_spaces(tmp_path):
    events = good_events()
    events.loc[1, "event"] = " Click "
    data = load_merchant(write_tables(tmp_path / "m", good_items(), events))
    assert "click" in set(data.events["event"])


def test_missing_tables(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    problems = problems_of(folder)
    assert {p.message for p in problems} == {"the 'items' table is missing", "the 'events' table is missing"}
    assert all("items.parquet or items.csv" in p.fix or "events.parquet or events.csv" in p.fix for p in problems)


def test_two_formats_of_one_table_are_ambiguous(tmp_path):
    folder = write_tables(tmp_path / "m", good_items(), good_events())
    good_items().to_parquet(folder / "items.parquet")
    (problem,) = problems_of(folder)
    assert "both items.parquet and items.csv exist" in problem.message


def test_missing_required_column_names_it_and_the_columns_found(tmp_path):
    problems = problems_of(write_tables(tmp_path / "m", good_items().drop(columns="title"), good_events()))
    problem = only(problems, "title")
    assert problem.file.endswith("items.csv")
    assert "required column 'title' is missing" in problem.message and "item_id" in problem.message


def test_empty_tables(tmp_path):
    problems = problems_of(write_tables(tmp_path / "m", good_items().iloc[:0], good_events().iloc[:0]))
    messages = {p.message for p in problems}
    assert "the items table has no rows" in messages and "the events table has no rows" in messages


def test_duplicate_item_ids_list_the_rows_as_file_lines(tmp_path):
    items = pd.concat([good_items(), good_items().iloc[[1]]], ignore_index=True)
    problem = only(problems_of(write_tables(tmp_path / "m", items, good_events())), "item_id")
    assert "1 item id(s) that occur more than once" in problem.message
    assert problem.count == 2 and [loc for loc, _ in problem.rows] == ["line 3", "line 5"]
    assert "keep one row per item_id" in problem.fix


def test_events_for_unknown_items(tmp_path):
    events = good_events()
    events.loc[4, "item_id"] = "zzz"
    problem = only(problems_of(write_tables(tmp_path / "m", good_items(), events)), "item_id")
    assert problem.file.endswith("events.csv")
    assert "not in the items table" in problem.message and problem.rows == (("line 6", "'zzz'"),)


def test_unknown_event_names_say_which_names_are_allowed(tmp_path):
    events = good_events()
    events.loc[0, "event"] = "view"
    problem = only(problems_of(write_tables(tmp_path / "m", good_items(), events)), "event")
    assert "'view'" in problem.message and problem.rows[0][0] == "line 2"
    assert "impression, click, cart, purchase" in problem.fix


def test_unparsable_timestamps(tmp_path):
    events = good_events()
    events.loc[[1, 3], "timestamp"] = ["yesterday", "2024-13-45"]
    problem = only(problems_of(write_tables(tmp_path / "m", good_items(), events)), "timestamp")
    assert problem.count == 2 and [v for _, v in problem.rows] == ["'yesterday'", "'2024-13-45'"]
    assert "ISO 8601" in problem.fix


def test_wrong_encoding_names_the_line_and_the_fix(tmp_path):
    folder = write_tables(tmp_path / "m", None, good_events())
    (folder / "items.csv").write_bytes("item_id,title\na,Crème brûlée set\n".encode("latin-1"))
    (problem,) = problems_of(folder)
    assert problem.file.endswith("items.csv") and "not UTF-8" in problem.message and "line 2" in problem.message
    assert "UTF-8" in problem.fix


def test_bad_prices_and_positions(tmp_path):
    items = good_items()
    items["price"] = items["price"].astype(object)
    items.loc[0, "price"] = "$12"
    items.loc[1, "price"] = -3
    events = good_events()
    events["position"] = events["position"].astype(object)
    events.loc[0, "position"] = 1.5
    problems = problems_of(write_tables(tmp_path / "m", items, events))
    price = [p for p in problems if p.column == "price"]
    assert {p.message for p in price} == {"has values that are not numbers", "has negative prices"}
    assert only(problems, "position").rows == (("line 2", "'1.5'"),)


def test_float_ids_in_parquet_are_a_type_problem(tmp_path):
    events = good_events()
    events["user_id"] = [17850.0, 17850.0, 17850.0, 13047.0, 13047.0]
    problem = only(problems_of(write_tables(tmp_path / "m", good_items(), events, "parquet")), "user_id")
    assert "float64" in problem.message and "'17850'" in problem.fix


def test_corrupt_parquet(tmp_path):
    folder = write_tables(tmp_path / "m", good_items(), None, "parquet")
    (folder / "events.parquet").write_bytes(b"not parquet at all")
    (problem,) = problems_of(folder)
    assert "cannot be read as Parquet" in problem.message


def test_all_problems_are_collected_before_raising(tmp_path):
    items = good_items()
    items.loc[2, "title"] = ""
    events = good_events()
    events.loc[0, "event"] = "view"
    events.loc[1, "timestamp"] = "soon"
    events.loc[2, "user_id"] = None
    events.loc[3, "item_id"] = "nope"
    with pytest.raises(DataValidationError) as info:
        load_merchant(write_tables(tmp_path / "m", items, events))
    columns = {(p.file.rsplit("/", 1)[-1], p.column) for p in info.value.problems}
    # the events are still checked against the items table's ids although that table has its own problem
    assert columns == {("items.csv", "title"), ("events.csv", "event"), ("events.csv", "timestamp"),
                       ("events.csv", "user_id"), ("events.csv", "item_id")}
    text = str(info.value)
    assert text.startswith("5 problem(s) in the data folder") and "fix:" in text


def test_marketplace_discovery(tmp_path):
    write_tables(tmp_path / "b", good_items(), good_events())
    write_tables(tmp_path / "a", good_items(), good_events())
    (tmp_path / "notes").mkdir()
    assert [p.name for p in merchant_folders(tmp_path)] == ["a", "b"]
    assert merchant_folders(tmp_path / "a") == [tmp_path / "a"]
    with pytest.raises(FileNotFoundError, match="holds no merchant data"):
        merchant_folders(tmp_path / "notes")


def test_cli_validate_prints_summary_with_funnel_rates(tmp_path):
    write_tables(tmp_path / "shop", good_items(), good_events())
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "click rate" in result.output and "1 merchant folder(s) match" in result.output
    # 3 impressions, 1 click, 1 purchase: click rate 33.33%, purchase rate 100%, conversion rate 33.33%
    assert "33.33%" in result.output and "100.00%" in result.output


def test_cli_validate_bad_data_exits_2_with_the_problems(tmp_path):
    events = good_events()
    events.loc[0, "event"] = "view"
    write_tables(tmp_path / "shop", good_items(), events)
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path / "shop")])
    assert result.exit_code == 2
    assert "unknown event names ('view')" in result.output and "failed validation" in result.output
    assert "Traceback" not in result.output


def test_cli_validate_total_counts_distinct_users_and_items(tmp_path):
    write_tables(tmp_path / "a", good_items(), good_events())
    write_tables(tmp_path / "b", good_items(), good_events())
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path)])
    assert result.exit_code == 0, result.output
    total = next(line for line in result.output.splitlines() if "│ all" in line)
    # both shops have the same 2 shoppers and 3 items; 6 impressions, 2 clicks, 2 purchases in all
    assert [cell.strip() for cell in total.split("│")[1:8]] == ["all", "2", "3", "6", "2", "0", "2"]


# ---------------------------------------------------------------- implausible values and unlearnable folders


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_infinite_prices_are_an_error_naming_row_and_item(tmp_path, fmt):
    items = good_items()
    items["price"] = [float("inf"), 59.5, float("-inf")]
    problem = only(problems_of(write_tables(tmp_path / "m", items, good_events(), fmt)), "price")
    assert problem.message == "has prices that are not finite (infinity)" and problem.count == 2
    first = "line 2" if fmt == "csv" else "row 0"
    assert problem.rows[0][0] == first and "item_id 'a'" in problem.rows[0][1] and "inf" in problem.rows[0][1]
    assert "finite number" in problem.fix


@pytest.mark.parametrize("stamp", ["1700-01-01T00:00:00Z", "2200-01-01T00:00:00Z", "1989-12-31", "-86400"])
def test_timestamps_outside_the_plausible_window_are_an_error(tmp_path, stamp):
    events = good_events()
    events.loc[2, "timestamp"] = stamp
    problem = only(problems_of(write_tables(tmp_path / "m", good_items(), events)), "timestamp")
    assert "outside 1990-01-01" in problem.message and problem.rows == (("line 4", repr(stamp)),)
    assert "epoch seconds" in problem.fix


def test_a_timestamp_within_a_day_ahead_is_accepted(tmp_path):
    events = good_events()
    events.loc[2, "timestamp"] = (pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=12)).isoformat()
    load_merchant(write_tables(tmp_path / "m", good_items(), events))


def test_a_megabyte_title_is_an_error_that_does_not_repeat_the_text(tmp_path):
    items = good_items()
    items.loc[1, "title"] = "x" * 1_000_000
    items.loc[2, "description"] = "y" * 100_001
    problems = problems_of(write_tables(tmp_path / "m", items, good_events(), "parquet"))
    title = only(problems, "title")
    assert title.message == "has values longer than 10,000 characters"
    assert title.rows == (("row 1", "item_id 'b': 1,000,000 characters"),)
    assert "description" in {p.column for p in problems} and len(str(title)) < 1_000


def _folder_warnings(tmp_path, n_items, rows):
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)], "title": [f"Item {k}" for k in range(n_items)]})
    events = pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                           "event": [r[2] for r in rows],
                           "timestamp": pd.date_range("2024-03-01", periods=len(rows), freq="min")})
    return load_merchant(write_tables(tmp_path / "m", items, events)).warnings


def test_a_good_folder_has_no_warnings(tmp_path):
    assert load_merchant(write_tables(tmp_path / "m", good_items(), good_events())).warnings == []


def test_one_item_no_clicks_and_no_purchases_are_warnings(tmp_path):
    (one,) = _folder_warnings(tmp_path / "a", 1, [("u1", "i0", "purchase"), ("u2", "i0", "purchase")])
    assert one.column == "item_id" and "holds 1 item" in one.message and one.file.endswith("items.csv")
    (no_clicks,) = _folder_warnings(tmp_path / "b", 2, [("u1", "i0", "impression"), ("u1", "i1", "impression")])
    assert "no click or purchase" in no_clicks.message and no_clicks.column == "event"
    (no_buys,) = _folder_warnings(tmp_path / "c", 2, [("u1", "i0", "impression"), ("u1", "i0", "click")])
    assert "no purchase" in no_buys.message
    (nothing,) = _folder_warnings(tmp_path / "d", 2, [("u1", "i0", "click"), ("u1", "i1", "cart")])
    assert "neither impressions nor purchases" in nothing.message
    # a purchase log (implicit feedback) has no clicks by nature: no warning
    assert _folder_warnings(tmp_path / "e", 2, [("u1", "i0", "purchase"), ("u2", "i1", "purchase")]) == []


def test_cli_validate_shows_warnings_and_still_passes(tmp_path):
    write_tables(tmp_path / "good", good_items(), good_events())
    items = good_items().iloc[:1]
    events = good_events().assign(item_id="a", event="purchase")
    write_tables(tmp_path / "tiny", items, events)
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: tiny:" in text and "holds 1 item" in text and "warning: good" not in text
    assert "2 merchant folder(s) match the data contract; 1 warning(s) above" in text


def test_cli_validate_reports_an_infinite_price(tmp_path):
    items = good_items()
    items.loc[0, "price"] = float("inf")
    write_tables(tmp_path / "shop", items, good_events())
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path / "shop")])
    assert result.exit_code == 2 and "not finite" in result.output


def test_simulate_prints_the_warnings_before_it_starts(tmp_path, capsys):
    """`fedcvr simulate` checks the data as `data validate` does and shows the same warnings (the run goes on)."""
    from fedcvr.cli.common import _validate_for_run

    write_tables(tmp_path / "good", good_items(), good_events())
    write_tables(tmp_path / "tiny", good_items().iloc[:1], good_events().assign(item_id="a", event="purchase"))
    folders = _validate_for_run(tmp_path)
    assert [f.name for f in folders] == ["good", "tiny"]
    text = " ".join(capsys.readouterr().err.split())
    assert "warning: tiny:" in text and "holds 1 item" in text and "warning: good" not in text
