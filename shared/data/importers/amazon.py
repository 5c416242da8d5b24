"""Import Amazon Reviews (2018 or 2023 release) into the data contract, one merchant folder per partition.

Input: a reviews file and a meta file, JSON lines, gzipped (detected by the magic bytes) or plain, read
streaming. The format is detected from the keys of each file's first record; both files must be the same one.
  2018: reviews {reviewerID, asin, unixReviewTime (s), ...}; meta {asin, title, description, brand, category,
        main_cat, price ("$12.99")}; reviews join meta via asin. Lines that are not JSON are read as Python
        literals (single quotes); lines that are neither are skipped and counted.
  2023: reviews {user_id, asin, parent_asin, timestamp (ms), ...}; meta {parent_asin, title, description,
        store, categories, main_category, price (float), details {"Brand"}}; reviews join meta via parent_asin.

Rules: each review is one purchase event (implicit feedback: a review means a purchase). user_id = reviewerID /
user_id; item_id = asin (2018) / parent_asin (2023); timestamp = review time (UTC). Item texts are cleaned of HTML
(markup.clean_markup: tags stripped, entities decoded, script/style content dropped, whitespace collapsed; list
elements that still look like markup or code by markup.looks_like_markup are left out). description = the cleaned
description list joined with " "; brand = 2018 brand, 2023 store or else details["Brand"]; category = category list
joined with " > " (2018 `category`, 2023 `categories`), the main category when empty; price = the number in
"$12.99" / the 2023 float, NaN for "", ranges ("$5.99 - $9.99"), other text or missing.
Title: the cleaned title, unless it is empty or still looks like markup or code (looks_like_markup); then
  1. the first line of the first description element, cut after its first sentence (the first ".", "!" or "?"
     followed by a space at character FALLBACK_SENTENCE_MIN or later) and to FALLBACK_TITLE_CHARS characters at a
     word boundary ("..." appended when cut there);
  2. else brand and the last element of the category list (not the main category: it names the partition,
     shared by all its items), joined with " - ", either alone when the other is empty;
  3. else none: the item has no title. (Real 2018 meta files hold titles such as `<span class="a-size-medium
     a-color-secondary"`, an unterminated tag, and entity-escaped ones such as `Canoe &amp; Kayak`.)
The import report's notes count, among the imported items, the titles cleaned of HTML, those taken from the
description, those made of brand and category, and the descriptions cleaned of HTML.
Meta records repeating an item id: the first counts. Dropped and counted: reviews without user, item or
time; reviews of items without metadata; reviews of items without a title; repeated (user, item, timestamp).
Partition: the main category (2018 main_cat, 2023 main_category) or `partition_by`, a meta field (a list is
joined with " > "; `brand` and `category` mean the item columns above); empty values go to "unknown".
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import re
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from .markup import clean_markup, looks_like_markup
from .report import ImportInputError, ImportReport, make_progress, write_partitions

FORMATS = {
    "2018": {"user": "reviewerID", "item": "asin", "time": "unixReviewTime", "unit": "s", "meta_id": "asin",
             "category": "category", "main": "main_cat"},
    "2023": {"user": "user_id", "item": "parent_asin", "time": "timestamp", "unit": "ms", "meta_id": "parent_asin",
             "category": "categories", "main": "main_category"},
}
_HELP = ("Amazon Reviews 2018 (reviews: reviewerID, asin, unixReviewTime; meta: asin, title, ...) or 2023 "
         "(reviews: user_id, parent_asin, timestamp; meta: parent_asin, title, ...) JSON lines")
_PRICE = re.compile(r"\$?\s*(\d[\d,]*(?:\.\d+)?)")
_IMG_ALT = re.compile(r'<img[^>]*\balt="([^"]*)"', re.IGNORECASE)
_CHUNK = 500_000
_SENTENCE_END = re.compile(r"[.!?](?=\s)")
FALLBACK_TITLE_CHARS = 80
FALLBACK_SENTENCE_MIN = 20
FIXES = {  # item flag -> the note counting it
    "title_html": "titles cleaned of HTML (tags, entities, script/style content)",
    "title_description": "titles taken from the description (the title was empty or markup)",
    "title_brand_category": "titles made of brand and category (no usable title or description)",
    "description_html": "descriptions cleaned of HTML",
}


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        try:
            record = ast.literal_eval(line.decode("utf-8", errors="replace"))
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            return None
    return record if isinstance(record, dict) else None


def iter_records(path: Path, label: str, report: ImportReport, progress, stats: dict | None = None
                 ) -> Iterator[dict]:
    """Yield each line of a JSON-lines file (gzipped or plain) as a dict; count lines that are neither JSON
    nor a Python literal dict, and name the first one in the report. `stats["lines"]` counts non-empty lines."""
    stats = {} if stats is None else stats
    stats["lines"] = 0
    if not path.is_file():
        raise ImportInputError(f"{path}: no such file (given as {label}). fix: pass the path of the downloaded "
                               f"{label} file (.json, .jsonl or .gz).")
    size = path.stat().st_size
    task = progress.add_task(f"reading {path.name}", total=size)
    bad = first_bad = number = 0
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if gzipped else raw
        try:
            for number, line in enumerate(stream, 1):
                if number % 50_000 == 0:
                    progress.update(task, completed=raw.tell())
                line = line.strip()
                if not line:
                    continue
                stats["lines"] += 1
                record = _parse(line)
                if record is None:
                    bad += 1
                    first_bad = first_bad or number
                    continue
                yield record
        except (OSError, EOFError, zlib.error) as err:
            raise ImportInputError(f"{path}: cannot be read after line {number:,} ({err}). fix: the file is "
                                   "damaged or its download was cut short; download it again.") from err
    progress.update(task, completed=size)
    if bad:
        reason = f"{label}: lines that are neither JSON nor a Python literal (first: line {first_bad:,})"
        if label == "reviews":
            report.drop(reason, bad)
        else:
            report.notes.append(f"{reason}: {bad:,} skipped")


def _detect(record: dict, path: Path, kind: str) -> str:
    keys = set(record)
    is_review = {"reviewerID", "user_id"} & keys
    if kind == "reviews" and is_review:
        return "2018" if "reviewerID" in keys else "2023"
    if kind == "meta" and not is_review and ({"parent_asin", "asin"} & keys):
        return "2023" if "parent_asin" in keys else "2018"
    other = "meta" if kind == "reviews" else "reviews"
    hint = (f" It looks like a {other} file: did you swap --reviews and --meta?"
            if (kind == "meta" and is_review) or (kind == "reviews" and "title" in keys) else "")
    shown = ", ".join(sorted(keys)[:12]) or "none"
    raise ImportInputError(f"{path}: the first record (keys: {shown}) is not an Amazon {kind} record.{hint} "
                           f"fix: pass {_HELP}.")


def _text(value: object, sep: str = " ") -> str:
    """A field as one line of text: lists are joined with `sep`, None is ""."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, list | tuple):
        return sep.join(t for t in (_text(v, sep) for v in value) if t)
    return " ".join(str(value).split())


def _texts(value: object) -> list[str]:
    """A field's texts cleaned of markup (clean_markup, lines kept), one per list element; empty elements and those
    that still look like markup or code (looks_like_markup) are left out."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, list | tuple):
        return [text for v in value for text in _texts(v)]
    text = clean_markup(str(value))
    return [text] if text and not looks_like_markup(text) else []


def _plain(value: object, sep: str = " ") -> str:
    """A field as one line of cleaned text (`_texts`, whitespace collapsed), list elements joined with `sep`."""
    return sep.join(" ".join(text.split()) for text in _texts(value))


def first_sentence(text: str) -> str:
    """The first line of `text`, cut after its first sentence (".", "!" or "?" followed by a space, at character
    FALLBACK_SENTENCE_MIN or later) and to FALLBACK_TITLE_CHARS characters at a word boundary, "..." appended there."""
    line = text.split("\n", 1)[0].strip()
    ends = (m.end() for m in _SENTENCE_END.finditer(line) if m.start() >= FALLBACK_SENTENCE_MIN)
    line = line[:next(ends, len(line))]
    if len(line) <= FALLBACK_TITLE_CHARS:
        return line
    cut = line[:FALLBACK_TITLE_CHARS + 1].rsplit(" ", 1)[0]
    if len(cut) > FALLBACK_TITLE_CHARS:  # no space to cut at
        cut = line[:FALLBACK_TITLE_CHARS]
    return cut.rstrip(" ,;:-") + "..."


def _title(value: object, descriptions: list[str], brand: str, categories: list[str]) -> tuple[str, str | None]:
    """The item's title and the FIXES flag saying where it came from (None: the title as given), by the title rule
    of the module docstring; ("", None) when nothing gives one."""
    title = _plain(value)
    if title:
        return title, (None if title == _text(value) else "title_html")
    if descriptions:
        return first_sentence(descriptions[0]), "title_description"
    named = " - ".join(text for text in (brand, categories[-1] if categories else "") if text)
    return (named, "title_brand_category") if named else ("", None)


def parse_price(value: object) -> float:
    """12.99 for 12.99 or "$12.99" / "$1,299.00"; NaN for "", None, ranges, any other text, negative or infinite
    numbers (JSON lines may hold `Infinity`) and numbers too large for a float."""
    if isinstance(value, bool) or value is None:
        return float("nan")
    if isinstance(value, int | float):
        number = float(value) if abs(value) < 1e308 else float("inf")
    else:
        match = _PRICE.fullmatch(str(value).strip())
        number = float(match.group(1).replace(",", "")) if match else float("nan")
    return number if math.isfinite(number) and number >= 0 else float("nan")


def _main_category(value: object) -> str:
    text = _text(value)
    alt = _IMG_ALT.search(text)  # some 2018 main_cat values are an <img ... alt="Digital Music"> tag
    return _plain(alt.group(1) if alt else text)


def _item(record: dict, fmt: str, partition_by: str | None) -> tuple:
    spec = FORMATS[fmt]
    brand = _plain(record.get("brand"))
    if fmt == "2023":
        details = record.get("details")
        if isinstance(details, str):
            try:
                details = json.loads(details)
            except ValueError:
                details = None
        brand = _plain(record.get("store")) or (_plain(details.get("Brand")) if isinstance(details, dict) else "")
    main = _main_category(record.get(spec["main"]))
    categories = [" ".join(text.split()) for text in _texts(record.get(spec["category"]))]
    descriptions = _texts(record.get("description"))
    description = " ".join(" ".join(text.split()) for text in descriptions)
    title, title_fix = _title(record.get("title"), descriptions, brand, categories)
    description_fix = None if description == _text(record.get("description")) else "description_html"
    item = {"title": title, "description": description, "category": " > ".join(categories) or main,
            "brand": brand, "price": parse_price(record.get("price"))}
    if partition_by is None:
        partition = main
    elif partition_by in ("brand", "category"):
        partition = item[partition_by]
    else:
        partition = _plain(record.get(partition_by), " > ")
    return (*item.values(), partition, tuple(f for f in (title_fix, description_fix) if f))


def read_meta(path: Path, report: ImportReport, progress, partition_by: str | None) -> tuple[str, dict]:
    """The meta file's format and item id -> (title, description, category, brand, price, partition, fixes), where
    fixes holds the FIXES flags of the item's cleaned texts."""
    fmt, items, keys_seen, records, repeated = None, {}, set(), 0, 0
    for record in iter_records(path, "meta", report, progress):
        records += 1
        if fmt is None:
            fmt = _detect(record, path, "meta")
        keys_seen.update(record)
        item_id = _text(record.get(FORMATS[fmt]["meta_id"]))
        if not item_id:
            continue
        if item_id in items:
            repeated += 1
            continue
        items[item_id] = _item(record, fmt, partition_by)
    if fmt is None:
        raise ImportInputError(f"{path}: holds no records. fix: pass the meta file of {_HELP}.")
    if partition_by is not None and partition_by not in keys_seen | {"brand", "category"}:
        raise ImportInputError(f"{path}: no meta record has the field '{partition_by}' (given to --partition-by). "
                               f"fix: pick one of {', '.join(sorted(keys_seen | {'brand', 'category'}))}.")
    report.notes.append(f"meta: {records:,} records, {len(items):,} items"
                        + (f" ({repeated:,} records repeating an item id were ignored)" if repeated else ""))
    return fmt, items


def read_reviews(path: Path, meta_path: Path, meta_fmt: str, items: dict, report: ImportReport,
                 progress) -> pd.DataFrame:
    """The reviews whose item has metadata with a title, as user_id, item_id, timestamp."""
    fmt, chunks, rows, stats = None, [], ([], [], []), {}
    missing = no_meta = no_title = 0
    for record in iter_records(path, "reviews", report, progress, stats):
        if fmt is None:
            fmt = _detect(record, path, "reviews")
            if fmt != meta_fmt:
                raise ImportInputError(f"{path} is an Amazon Reviews {fmt} file but {meta_path} is {meta_fmt} meta. "
                                       "fix: pass the reviews and meta files of the same release.")
            spec = FORMATS[fmt]
        user, item, when = record.get(spec["user"]), record.get(spec["item"]), record.get(spec["time"])
        try:
            when = int(when)
        except (TypeError, ValueError):
            when = None
        if not user or not item or when is None:
            missing += 1
            continue
        info = items.get(str(item))
        if info is None:
            no_meta += 1
            continue
        if not info[0]:
            no_title += 1
            continue
        for column, value in zip(rows, (str(user), str(item), when)):
            column.append(value)
        if len(rows[0]) >= _CHUNK:
            chunks.append(pd.DataFrame({"user_id": rows[0], "item_id": rows[1], "time": rows[2]}))
            rows = ([], [], [])
    if fmt is None:
        raise ImportInputError(f"{path}: holds no records. fix: pass the reviews file of {_HELP}.")
    chunks.append(pd.DataFrame({"user_id": rows[0], "item_id": rows[1], "time": np.array(rows[2], dtype="int64")}))
    report.rows_read = stats["lines"]  # non-empty lines, unreadable ones included
    report.drop("reviews without user, item or time", missing)
    report.drop("reviews of items without metadata", no_meta)
    report.drop("reviews of items without a title", no_title)
    reviews = pd.concat(chunks, ignore_index=True)
    reviews["timestamp"] = pd.to_datetime(reviews.pop("time"), unit=FORMATS[fmt]["unit"]).astype("datetime64[ns]")
    return reviews


def import_amazon(reviews: str | Path, meta: str | Path, out: str | Path, *, partition_by: str | None = None,
                  show_progress: bool = False) -> ImportReport:
    """Read both files, apply the rules above and write one merchant folder per partition under `out`."""
    start = time.perf_counter()
    reviews, meta = Path(reviews), Path(meta)
    report = ImportReport(source=str(reviews), out=Path(out))
    for path, label in ((reviews, "reviews"), (meta, "meta")):
        if not path.is_file():
            raise ImportInputError(f"{path}: no such file (given as --{label}). fix: pass the path of the "
                                   f"downloaded {label} file (.json, .jsonl or .gz).")
    with make_progress(show_progress, bytes_total=True) as progress:
        fmt, items = read_meta(meta, report, progress, partition_by)
        events = read_reviews(reviews, meta, fmt, items, report, progress)
    n = len(events)
    events = events.drop_duplicates(["user_id", "item_id", "timestamp"], ignore_index=True)
    report.drop("repeated reviews (same user, item and timestamp)", n - len(events))
    if events.empty:
        raise ImportInputError(f"{reviews}: no review is left to import (see the counts of dropped reviews). fix: "
                               f"pass the reviews and meta files of the same category ({meta}).")
    used = pd.unique(events["item_id"])
    table = pd.DataFrame.from_records([items[i] for i in used], columns=[
        "title", "description", "category", "brand", "price", "partition", "fixes"])
    table.insert(0, "item_id", used)
    fixed = Counter(flag for flags in table.pop("fixes") for flag in flags)
    report.notes.extend(f"{label}: {fixed[flag]:,} of {len(used):,} imported items" for flag, label in FIXES.items()
                        if fixed[flag])
    table["price"] = table["price"].astype("float64")
    events["partition"] = events["item_id"].map(table.set_index("item_id")["partition"])
    events["event"] = "purchase"
    report.notes.insert(0, f"format: Amazon Reviews {fmt}")
    with make_progress(show_progress) as progress:
        write_partitions(Path(out), table.drop(columns="partition"), events, report, progress)
    report.seconds = time.perf_counter() - start
    return report
