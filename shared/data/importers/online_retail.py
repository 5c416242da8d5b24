"""Import UCI Online Retail / Online Retail II into the data contract, one merchant folder per country.

Input: the published `.xlsx` (all sheets, concatenated), `.csv` (UTF-8; latin-1 is tried next, and said so) or
`.parquet`, with either column schema (names compare ignoring case, spaces and underscores):
  Online Retail:    InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice, CustomerID,  Country
  Online Retail II: Invoice,   StockCode, Description, Quantity, InvoiceDate, Price,     Customer ID, Country

Cleaning rules, applied in this order (every removed row is counted under its rule):
 1. Rows repeated exactly (all eight columns equal) count once (Online Retail II's two sheets overlap).
 2. Rows without a customer id are dropped.
 3. Non-product lines are dropped: stock codes POST, DOT, M, D, C2, CRUK, BANK CHARGES, AMAZONFEE, PADS, S, B,
    ADJUST, ADJUST2, TEST001, TEST002 (stripped, case-insensitive); then non-cancellation lines with
    Quantity <= 0; then non-cancellation lines with unit price <= 0.
 4. Cancellations (invoice number starting with 'C'), taken in time order: each is matched to the most recent
    purchase line of the same customer and stock code with time <= the cancellation's time that still has a
    quantity left; |quantity| is subtracted from that line (an excess is not carried to older lines), and a
    line whose quantity reaches <= 0 is removed. A cancellation without such a line (bought before the data
    starts) is dropped. Cancellation lines never become events.
 5. One purchase event per (invoice, stock code): repeated lines within an invoice merge.

Mapping: user_id = customer id as an integer string ("17850"); item_id = stripped upper-case StockCode;
title = the most frequent non-empty Description of the stock code over the lines left after rule 4 (ties: the
alphabetically first; the stock code itself when it has none); description, category, brand = "";
price = median unit price of those lines; event = "purchase"; timestamp = InvoiceDate; session_id = invoice.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .report import ImportInputError, ImportReport, make_progress, write_partitions

NON_PRODUCT_CODES = frozenset(code.upper() for code in (
    "POST", "DOT", "M", "m", "D", "C2", "CRUK", "BANK CHARGES", "AMAZONFEE", "PADS", "S", "B",
    "ADJUST", "ADJUST2", "TEST001", "TEST002"))

# normalised column -> accepted source names (compared by _key)
SCHEMA = {
    "invoice": ("InvoiceNo", "Invoice"),
    "stock_code": ("StockCode",),
    "description": ("Description",),
    "quantity": ("Quantity",),
    "invoice_date": ("InvoiceDate",),
    "unit_price": ("UnitPrice", "Price"),
    "customer_id": ("CustomerID", "Customer ID"),
    "country": ("Country",),
}
FORMATS = (".xlsx", ".csv", ".parquet")
_SCHEMA_HELP = ("the Online Retail file (InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice, "
                "CustomerID, Country) or the Online Retail II file (Invoice, StockCode, Description, Quantity, "
                "InvoiceDate, Price, Customer ID, Country) as published, with its header row")


def _key(name: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _id_text(values: pd.Series, drop_zero_fraction: bool = False) -> pd.Series:
    """Ids as text: 536365 -> '536365', 17850.0 -> '17850', ' 85123A ' -> '85123A'; missing or blank -> None."""
    codes, uniques = pd.factorize(values.astype(object), use_na_sentinel=True)

    def text(value: object) -> str | None:
        if isinstance(value, float | np.floating) and float(value).is_integer():
            return str(int(value))
        if isinstance(value, int | np.integer):
            return str(int(value))
        out = str(value).strip()
        if drop_zero_fraction and re.fullmatch(r"\d+\.0*", out):
            out = out.split(".")[0]
        return out or None

    converted = np.array([text(u) for u in uniques] + [None], dtype=object)
    return pd.Series(converted[codes], index=values.index, dtype=object)


def _check(bad: pd.Series, raw: pd.Series, where, path: Path, column: str, fix: str) -> None:
    if bad.any():
        rows = np.flatnonzero(bad.to_numpy())
        shown = "; ".join(f"{where(int(i))}: {raw.iloc[int(i)]!r}" for i in rows[:5])
        raise ImportInputError(f"{path}: column '{column}' has {len(rows):,} value(s) that cannot be read "
                               f"({shown}). fix: {fix}")


def _normalise(frame: pd.DataFrame, path: Path, where, part: str = "") -> pd.DataFrame:
    """Rename either schema to the normalised columns and convert types; `where(i)` names row i for errors."""
    by_key = {_key(c): c for c in frame.columns}
    found, missing = {}, []
    for column, names in SCHEMA.items():
        hit = next((by_key[_key(n)] for n in names if _key(n) in by_key), None)
        if hit is None:
            missing.append(" or ".join(names))
        else:
            found[column] = hit
    if missing:
        raise ImportInputError(f"{path}{part}: missing column(s) {', '.join(missing)} (columns found: "
                               f"{', '.join(map(str, frame.columns)) or 'none'}). fix: pass {_SCHEMA_HELP}.")
    src = frame[[found[c] for c in SCHEMA]].set_axis(list(SCHEMA), axis=1).reset_index(drop=True)
    out = pd.DataFrame({
        "invoice": _id_text(src["invoice"]),
        "stock_code": _id_text(src["stock_code"]),
        "description": src["description"].astype(object).map(lambda v: str(v).strip(), na_action="ignore"),
    })
    for column in ("quantity", "unit_price"):
        number = pd.to_numeric(src[column], errors="coerce")
        _check(number.isna(), src[column], where, path, found[column], "write plain numbers (e.g. 6 or 2.55)")
        out[column] = number.astype("float64")
    raw_date = src["invoice_date"]
    if pd.api.types.is_datetime64_any_dtype(raw_date):
        date = pd.to_datetime(raw_date)
    else:  # parse each distinct text once: ISO 8601 first, then US style "12/1/2010 8:26" and other forms
        codes, texts = pd.factorize(raw_date.astype(str).str.strip())
        parsed = pd.to_datetime(pd.Series(texts), errors="coerce", format="ISO8601")
        if parsed.isna().any():
            parsed = pd.to_datetime(pd.Series(texts), errors="coerce", format="mixed")
        date = pd.Series(parsed.to_numpy()[codes], index=raw_date.index)
    if getattr(date.dt, "tz", None) is not None:
        date = date.dt.tz_convert("UTC").dt.tz_localize(None)
    _check(date.isna(), raw_date, where, path, found["invoice_date"], "write dates such as 2010-12-01 08:26:00")
    out["invoice_date"] = date.astype("datetime64[ns]")
    out["customer_id"] = _id_text(src["customer_id"], drop_zero_fraction=True)
    out["country"] = src["country"].astype(object).map(lambda v: str(v).strip() or "Unknown", na_action="ignore")
    out["country"] = out["country"].fillna("Unknown")
    return out


def _read_xlsx(path: Path, progress) -> list[pd.DataFrame]:
    import openpyxl

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # openpyxl raises zipfile, KeyError and its own types for damaged files
        raise ImportInputError(f"{path}: cannot be read as an Excel workbook ({err}). fix: pass the .xlsx file "
                               "as downloaded, or export it as .csv") from err
    parts = []
    try:
        for sheet in book.worksheets:
            task = progress.add_task(f"reading sheet '{sheet.title}'", total=sheet.max_row)
            rows = sheet.iter_rows(values_only=True)
            header = next(rows, None)
            if header is None:
                continue
            records = []
            for n, row in enumerate(rows, 1):
                if any(v is not None for v in row):
                    records.append(row)
                if n % 20_000 == 0:
                    progress.update(task, completed=n)
            frame = pd.DataFrame.from_records(records, columns=[str(h).strip() for h in header])
            parts.append(_normalise(frame, path, lambda i, s=sheet.title: f"sheet '{s}' row {i + 2}",
                                    f" (sheet '{sheet.title}')"))
    finally:
        book.close()
    return parts


def read_online_retail(path: str | Path, report: ImportReport | None = None,
                       show_progress: bool = False) -> pd.DataFrame:
    """Read the source file into the normalised columns (see SCHEMA), before any cleaning."""
    path = Path(path)
    if not path.is_file():
        raise ImportInputError(f"{path}: no such file. fix: pass the path of the downloaded Online Retail "
                               "(.xlsx, .csv or .parquet) file.")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ImportInputError(f"{path}: unknown format '{suffix or '(no extension)'}'. fix: pass an .xlsx, "
                               ".csv or .parquet file (convert .xls files to .xlsx first).")
    with make_progress(show_progress) as progress:
        if suffix == ".xlsx":
            parts = _read_xlsx(path, progress)
        elif suffix == ".csv":
            progress.add_task(f"reading {path.name}", total=None)
            options = {"dtype": str, "keep_default_na": False, "na_values": [""]}
            try:
                frame = pd.read_csv(path, encoding="utf-8-sig", **options)
            except UnicodeDecodeError:
                frame = pd.read_csv(path, encoding="latin-1", **options)
                if report is not None:
                    report.notes.append(f"{path.name} is not UTF-8; it was read as latin-1")
            except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
                raise ImportInputError(f"{path}: cannot be read as CSV ({str(err).strip()}). fix: {_SCHEMA_HELP}"
                                       ) from err
            parts = [_normalise(frame, path, lambda i: f"line {i + 2}")]
        else:
            progress.add_task(f"reading {path.name}", total=None)
            try:
                frame = pd.read_parquet(path)
            except Exception as err:  # pyarrow raises several unrelated types for damaged files
                raise ImportInputError(f"{path}: cannot be read as Parquet ({err}). fix: pass the file as "
                                       "downloaded, or the .xlsx / .csv form") from err
            parts = [_normalise(frame, path, lambda i: f"row {i}")]
    if not parts or sum(len(p) for p in parts) == 0:
        raise ImportInputError(f"{path}: holds no data rows. fix: pass {_SCHEMA_HELP}.")
    return pd.concat(parts, ignore_index=True)


def apply_cancellations(lines: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """Rule 4 on lines with an `item_id` column: return (remaining purchase lines with reduced quantity,
    purchases removed, cancellations dropped)."""
    is_cancel = lines["invoice"].str.upper().str.startswith("C").to_numpy()
    purchases = lines[~is_cancel].reset_index(drop=True)
    cancels = lines[is_cancel].sort_values("invoice_date", kind="stable")
    remaining = purchases["quantity"].to_numpy(dtype="float64").copy()
    keys = ["customer_id", "item_id"]
    wanted = pd.MultiIndex.from_frame(purchases[keys]).isin(pd.MultiIndex.from_frame(cancels[keys]))
    candidates = purchases[wanted].sort_values("invoice_date", kind="stable")
    groups = {key: (g["invoice_date"].to_numpy().astype("int64"), g.index.to_numpy())
              for key, g in candidates.groupby(keys, sort=False)}
    dropped = 0
    times = cancels["invoice_date"].to_numpy().astype("int64")
    for key, when, qty in zip(zip(cancels["customer_id"], cancels["item_id"]), times, cancels["quantity"]):
        group = groups.get(key)
        j = -1 if group is None else int(np.searchsorted(group[0], when, side="right")) - 1
        while j >= 0 and remaining[group[1][j]] <= 0:
            j -= 1
        if j < 0:
            dropped += 1
            continue
        remaining[group[1][j]] -= abs(qty)
    keep = remaining > 0
    kept = purchases[keep].assign(quantity=remaining[keep]).reset_index(drop=True)
    return kept, int((~keep).sum()), dropped


def clean(frame: pd.DataFrame, report: ImportReport) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply rules 1-5 to normalised rows; return (events with a `partition` column, items)."""
    n = len(frame)
    frame = frame.drop_duplicates(ignore_index=True)
    report.drop("rule 1: exact duplicate rows", n - len(frame))
    no_customer = frame["customer_id"].isna()
    report.drop("rule 2: no customer id", no_customer.sum())
    frame = frame[~no_customer]
    frame = frame.assign(item_id=frame["stock_code"].fillna("").str.strip().str.upper())
    is_cancel = frame["invoice"].fillna("").str.upper().str.startswith("C")
    for reason, bad in (
        ("rule 3: non-product stock code (postage, fees, ...)", lambda f, c: f["item_id"].isin(NON_PRODUCT_CODES)),
        ("rule 3: quantity <= 0 on a non-cancellation line", lambda f, c: ~c & (f["quantity"] <= 0)),
        ("rule 3: unit price <= 0 on a non-cancellation line", lambda f, c: ~c & (f["unit_price"] <= 0)),
    ):
        mask = bad(frame, is_cancel)
        report.drop(reason, mask.sum())
        frame, is_cancel = frame[~mask], is_cancel[~mask]
    cancellations = int(is_cancel.sum())
    lines, removed, unmatched = apply_cancellations(frame)
    report.drop("rule 4: cancellation lines (applied to earlier purchases, never events)", cancellations - unmatched)
    report.drop("rule 4: cancellations without an earlier purchase", unmatched)
    report.drop("rule 4: purchase lines fully cancelled", removed)
    events = (lines.groupby(["invoice", "item_id"], sort=False)
              .agg(user_id=("customer_id", "first"), timestamp=("invoice_date", "min"), partition=("country", "first"))
              .reset_index().rename(columns={"invoice": "session_id"}))
    report.drop("rule 5: repeated stock code within an invoice (merged)", len(lines) - len(events))
    events["event"] = "purchase"
    return events, _items(lines)


def _items(lines: pd.DataFrame) -> pd.DataFrame:
    text = lines[["item_id", "description"]].dropna()
    text = text[text["description"] != ""]
    counts = text.groupby(["item_id", "description"]).size().reset_index(name="n")
    counts = counts.sort_values(["item_id", "n", "description"], ascending=[True, False, True], kind="stable")
    titles = counts.drop_duplicates("item_id").set_index("item_id")["description"]
    price = lines.groupby("item_id")["unit_price"].median()
    items = pd.DataFrame({"item_id": price.index.astype(str), "price": price.to_numpy(dtype="float64")})
    items["title"] = items["item_id"].map(titles).fillna(items["item_id"]).astype(str)
    for column in ("description", "category", "brand"):
        items[column] = ""
    return items


def import_online_retail(path: str | Path, out: str | Path, *, show_progress: bool = False) -> ImportReport:
    """Read, clean (rules 1-5 above) and write one merchant folder per country under `out`."""
    start = time.perf_counter()
    report = ImportReport(source=str(path), out=Path(out))
    frame = read_online_retail(path, report, show_progress)
    report.rows_read = len(frame)
    events, items = clean(frame, report)
    if events.empty:
        raise ImportInputError(f"{path}: no purchase is left after cleaning (rules 1-5). fix: pass the full "
                               "Online Retail file; rows need a customer id, a product stock code and a quantity > 0.")
    with make_progress(show_progress) as progress:
        write_partitions(Path(out), items, events, report, progress)
    report.seconds = time.perf_counter() - start
    return report
