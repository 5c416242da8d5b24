"""The Online Retail importer: readers (xlsx/csv/parquet, both schemas), cleaning rules 1-5, CLI errors and the
full UCI data set (recomputed independently with plain pandas)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedcvr.cli import app
from fedcvr.shared.data.importers.online_retail import import_online_retail
from fedcvr.shared.data.loader import load_merchant, merchant_folders
from fedcvr.shared.data.pseudonym import KEY_FILE, merchant_key, pseudonym
from fedcvr.shared.data.writer import safe_folder_name

SOURCE = Path(__file__).resolve().parents[1].parent / "shared/data/online-retail/online_retail.parquet"
NON_PRODUCT = {"POST", "DOT", "M", "D", "C2", "CRUK", "BANK CHARGES", "AMAZONFEE", "PADS", "S", "B", "ADJUST",
               "ADJUST2", "TEST001", "TEST002"}
RETAIL_II = {"InvoiceNo": "Invoice", "UnitPrice": "Price", "CustomerID": "Customer ID"}


def flat(text: str) -> str:
    return "".join(text.split())


def load_all(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    merchants = [load_merchant(folder) for folder in merchant_folders(out)]
    events = pd.concat([m.events.assign(country=m.name) for m in merchants], ignore_index=True)
    items = pd.concat([m.items for m in merchants], ignore_index=True)
    return events, items


# ------------------------------------------------------------------ tiny hand-made case

def tiny() -> pd.DataFrame:
    t = pd.Timestamp("2011-01-01 10:00")
    h = pd.Timedelta(hours=1)
    rows = [  # InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice, CustomerID, Country
        ("500", "A", "RED MUG", 2, t - h, 2.0, 1.0, "United Kingdom"),       # older A purchase: stays
        ("500", "A", "RED MUG ", 1, t - h, 2.5, 1.0, "United Kingdom"),      # rule 5: merges with the line above
        ("501", "A", "RED MUG", 5, t, 3.0, 1.0, "United Kingdom"),           # fully cancelled by C601
        ("501", "p1", "PEN", 5, t, 1.0, 1.0, "United Kingdom"),              # partly cancelled by C602: stays
        ("501", "p1", "PEN", 5, t, 1.0, 1.0, "United Kingdom"),              # rule 1: exact repeat
        ("C601", "A", "RED MUG", -5, t + h, 3.0, 1.0, "United Kingdom"),
        ("C602", "P1", "PEN", -2, t + h, 1.0, 1.0, "United Kingdom"),
        ("C603", "A", "RED MUG", -3, t - 2 * h, 3.0, 2.0, "France"),          # no earlier purchase: dropped
        ("502", "A", "red mug", 1, t + 2 * h, 4.0, 2.0, "France"),          # after C603: stays
        ("503", "POST", "POSTAGE", 1, t, 18.0, 2.0, "France"),              # rule 3: non-product
        ("504", "m", "Manual", 1, t, 5.0, 2.0, "France"),                   # rule 3: non-product
        ("505", "A", "RED MUG", 0, t, 3.0, 2.0, "France"),                  # rule 3: quantity <= 0
        ("506", "A", "RED MUG", 1, t, 0.0, 2.0, "France"),                  # rule 3: price <= 0
        ("507", "A", "RED MUG", 1, t, 3.0, None, "France"),                 # rule 2: no customer
    ]
    columns = ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID",
               "Country"]
    return pd.DataFrame(rows, columns=columns)


def test_infinite_prices_and_implausible_dates_are_made_to_fit(tmp_path):
    frame = tiny()
    frame.loc[0:1, "UnitPrice"] = float("inf")  # both lines of A in invoice 500: A's median price is infinite
    frame.loc[3:4, "InvoiceDate"] = pd.Timestamp("2200-01-01")  # the PEN purchase (and its repeat) of 2200
    frame.to_parquet(tmp_path / "retail.parquet")
    report = import_online_retail(tmp_path / "retail.parquet", tmp_path / "out")
    assert report.dropped["events dated before 1990-01-01 or more than a day ahead of the import"] == 1
    assert "1 item price(s) were not finite (infinity) and are left empty" in report.notes
    events, items = load_all(tmp_path / "out")  # every folder now passes validation
    assert items["price"].isna().all() and "P1" not in set(events["item_id"])


EXPECTED_DROPS = {
    "rule 1: exact duplicate rows": 1,
    "rule 2: no customer id": 1,
    "rule 3: non-product stock code (postage, fees, ...)": 2,
    "rule 3: quantity <= 0 on a non-cancellation line": 1,
    "rule 3: unit price <= 0 on a non-cancellation line": 1,
    "rule 4: cancellation lines (applied to earlier purchases, never events)": 2,
    "rule 4: cancellations without an earlier purchase": 1,
    "rule 4: purchase lines fully cancelled": 1,
    "rule 5: repeated stock code within an invoice (merged)": 1,
}
EXPECTED_EVENTS = {("1", "A", "500", "united-kingdom"), ("1", "P1", "501", "united-kingdom"),
                   ("2", "A", "502", "france")}


def check_tiny(report, out: Path) -> None:
    assert report.rows_read == 14
    assert report.dropped == EXPECTED_DROPS
    assert report.rows_read - sum(report.dropped.values()) == report.events
    assert (report.users, report.items, report.events) == (2, 2, 3)
    events, items = load_all(out)
    # shopper ids are written as pseudonyms under each country folder's own key
    expected = {(pseudonym(user, merchant_key(out / country)), item, invoice, country)
                for user, item, invoice, country in EXPECTED_EVENTS}
    assert set(zip(events.user_id, events.item_id, events.session_id, events.country)) == expected
    assert set(events.event) == {"purchase"}
    assert events.timestamp.min() == pd.Timestamp("2011-01-01 09:00")
    by_id = items.drop_duplicates("item_id").set_index("item_id")
    assert by_id.loc["A", "title"] == "RED MUG" and by_id.loc["P1", "title"] == "PEN"
    assert by_id.loc["A", "price"] == 2.5  # median of 2.0, 2.5 (500) and 4.0 (502); 501 was cancelled
    assert by_id.loc["P1", "price"] == 1.0
    france = load_merchant(out / "france")
    assert list(france.items.item_id) == ["A"]  # only the items its events refer to


def test_tiny_parquet_online_retail_schema(tmp_path):
    path = tmp_path / "retail.parquet"
    tiny().to_parquet(path)
    check_tiny(import_online_retail(path, tmp_path / "out"), tmp_path / "out")


def test_tiny_csv_online_retail_ii_schema_utf8_and_latin1(tmp_path):
    frame = tiny().rename(columns=RETAIL_II)
    frame.to_csv(tmp_path / "utf8.csv", index=False, encoding="utf-8")
    report = import_online_retail(tmp_path / "utf8.csv", tmp_path / "out1")
    check_tiny(report, tmp_path / "out1")
    assert not any("latin-1" in note for note in report.notes)
    (single,) = report.notes  # the one country that bought a single stock code is named, not skipped
    assert single.startswith("1 of 2 folder(s) hold a single item (france)") and "training refuses" in single
    frame.loc[frame.StockCode == "POST", "Description"] = "POSTAGE £"
    frame.to_csv(tmp_path / "latin1.csv", index=False, encoding="latin-1")
    report = import_online_retail(tmp_path / "latin1.csv", tmp_path / "out2")
    check_tiny(report, tmp_path / "out2")
    assert any("latin-1" in note for note in report.notes)


@pytest.mark.parametrize("schema", ["Online Retail", "Online Retail II"])
def test_tiny_xlsx_reads_all_sheets(tmp_path, schema):
    frame = tiny() if schema == "Online Retail" else tiny().rename(columns=RETAIL_II)
    invoice = frame.columns[0]  # Excel stores invoice numbers as numbers, cancellations as text
    frame[invoice] = pd.Series([int(v) if v.isdigit() else v for v in frame[invoice]], dtype=object)
    path = tmp_path / "retail.xlsx"
    with pd.ExcelWriter(path, engine="openpyxl") as writer:  # two sheets overlapping in one row, like Retail II
        frame.iloc[:8].to_excel(writer, sheet_name="Year 2009-2010", index=False)
        frame.iloc[7:].to_excel(writer, sheet_name="Year 2010-2011", index=False)
    report = import_online_retail(path, tmp_path / "out")
    assert report.rows_read == 15
    assert report.dropped["rule 1: exact duplicate rows"] == 2
    report.rows_read, report.dropped["rule 1: exact duplicate rows"] = 14, 1
    check_tiny(report, tmp_path / "out")


# ------------------------------------------------------------------ CLI errors

def test_cli_missing_column_exit_2(tmp_path):
    path = tmp_path / "no_country.csv"
    tiny().drop(columns="Country").to_csv(path, index=False)
    result = CliRunner().invoke(app, ["data", "import", "online-retail", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    text = flat(result.output)
    assert flat(str(path)) in text and "Country" in text and "fix:" in text
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", ["missing.xlsx", "retail.txt"])
def test_cli_missing_file_or_unknown_format_exit_2(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text("x")
    result = CliRunner().invoke(app, ["data", "import", "online-retail", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert flat(str(path)) in flat(result.output) and "fix:" in result.output


def test_cli_success_prints_counts_and_next_step(tmp_path):
    path = tmp_path / "retail.parquet"
    tiny().to_parquet(path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "import", "online-retail", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "no customer id" in result.output and "countries" in result.output
    assert flat(f"fedcvr data validate {out}") in flat(result.output)


# ------------------------------------------------------------------ the full data set

def expected_from_rules(df: pd.DataFrame) -> pd.DataFrame:
    """Rules 1-5 written out directly: the (customer, item, invoice, country) of every purchase event."""
    df = df.drop_duplicates()
    df = df[df.CustomerID.notna()].copy()
    df["item"] = df.StockCode.astype(str).str.strip().str.upper()
    df["customer"] = df.CustomerID.astype("int64").astype(str)
    df = df[~df.item.isin(NON_PRODUCT)]
    cancel = df.InvoiceNo.astype(str).str.startswith("C")
    df = df[cancel | ((df.Quantity > 0) & (df.UnitPrice > 0))]
    cancel = df.InvoiceNo.astype(str).str.startswith("C")
    purchases = df[~cancel].reset_index(drop=True)
    left = purchases.Quantity.astype(float).tolist()
    times = purchases.InvoiceDate.tolist()
    rows_of = purchases.groupby(["customer", "item"]).indices
    for c in df[cancel].sort_values("InvoiceDate", kind="stable").itertuples():
        earlier = [i for i in rows_of.get((c.customer, c.item), []) if times[i] <= c.InvoiceDate and left[i] > 0]
        if earlier:
            latest = max(earlier, key=lambda i: (times[i], i))
            left[latest] -= abs(c.Quantity)
    purchases = purchases[[q > 0 for q in left]]
    return purchases.drop_duplicates(["InvoiceNo", "item"])[["customer", "item", "InvoiceNo", "Country"]]


@pytest.fixture(scope="module")
def full_import(tmp_path_factory):
    if not SOURCE.is_file():
        pytest.skip(f"the shared Online Retail data set is not at {SOURCE}")
    out = tmp_path_factory.mktemp("online_retail")
    report = import_online_retail(SOURCE, out)
    return report, out


def test_full_data_set_matches_independent_rules(full_import):
    report, out = full_import
    events, items = load_all(out)  # every folder validates
    expected = expected_from_rules(pd.read_parquet(SOURCE))
    assert expected.customer.nunique() == report.users
    folders = expected.Country.map(safe_folder_name)
    keys = {folder: merchant_key(out / folder) for folder in folders.unique()}
    hidden = {(pseudonym(c, keys[f]), f) for c, f in zip(expected.customer, folders)}
    assert set(zip(events.user_id, events.country)) == hidden
    assert events.user_id.str.fullmatch(r"[0-9a-f]{32}").all()
    assert not set(events.user_id) & set(expected.customer)
    assert all((out / folder / KEY_FILE).stat().st_mode & 0o777 == 0o600 for folder in keys)
    assert events.item_id.nunique() == expected.item.nunique() == report.items
    assert events.country.nunique() == expected.Country.nunique() == len(report.partitions)
    assert len(events) == len(expected) == report.events
    assert report.rows_read == 541_909
    assert report.rows_read - sum(report.dropped.values()) == report.events
    assert not events.session_id.str.upper().str.startswith("C").any()
    for merchant in merchant_folders(out):
        data = load_merchant(merchant)
        assert set(data.items.item_id) == set(data.events.item_id)
    assert (items.title.str.strip() != "").all()
