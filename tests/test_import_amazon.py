"""The Amazon Reviews importer on small hand-written files of both releases (2018 and 2023), gzipped and plain;
titles and descriptions cleaned of HTML with their fallbacks; the real Magazine Subscriptions 2018 files."""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedcvr.cli import app
from fedcvr.shared.data.importers.amazon import first_sentence, import_amazon, parse_price
from fedcvr.shared.data.importers.markup import clean_markup, looks_like_markup
from fedcvr.shared.data.importers.report import ImportInputError
from fedcvr.shared.data.loader import load_merchant, merchant_folders
from fedcvr.shared.data.pseudonym import merchant_key, pseudonym

MAGAZINE = Path(__file__).resolve().parents[1].parent / "shared/data/amazon-magazine"
MARKUP_LEFT = re.compile(r"<[A-Za-z]|&(?:#\d+|#x[0-9a-f]+|[a-z][a-z0-9]*);", re.IGNORECASE)


def flat(text: str) -> str:
    return "".join(text.split())


def write_lines(path: Path, lines: list[str], gzipped: bool) -> Path:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if gzipped else data)
    return path


def load_all(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    merchants = [load_merchant(folder) for folder in merchant_folders(out)]
    events = pd.concat([m.events.assign(partition=m.name) for m in merchants], ignore_index=True)
    items = pd.concat([m.items.assign(partition=m.name) for m in merchants], ignore_index=True)
    return events, items


@pytest.fixture
def files_2018(tmp_path):
    reviews = [
        json.dumps({"reviewerID": "U1", "asin": "A1", "unixReviewTime": 1500000000, "overall": 5.0}),
        "{'reviewerID': 'U2', 'asin': 'A2', 'unixReviewTime': 1500000100, 'overall': 4.0}",  # python literal
        json.dumps({"reviewerID": "U1", "asin": "A1", "unixReviewTime": 1500000000, "overall": 5.0}),  # repeat
        json.dumps({"reviewerID": "U3", "asin": "A9", "unixReviewTime": 1500000200}),  # no meta for A9
        json.dumps({"reviewerID": "U3", "asin": "A3", "unixReviewTime": 1500000300}),  # A3 has no title
        "this line is neither JSON nor a Python literal",
        "",
        json.dumps({"asin": "A1", "unixReviewTime": 1500000400}),  # no reviewer
        json.dumps({"reviewerID": "U1", "asin": "A5", "unixReviewTime": 1500000500}),
        json.dumps({"reviewerID": "U2", "asin": "A1", "unixReviewTime": 1500000600}),
    ]
    meta = [
        json.dumps({"asin": "A1", "title": " Red  Mug ", "description": ["Red", "ceramic mug."], "brand": "Acme",
                    "category": ["Home & Kitchen", "Kitchen", "Mugs"], "main_cat": "Home", "price": "$12.99"}),
        ("{'asin': 'A2', 'title': 'Pen', 'description': 'Blue pen', 'brand': '', 'category': [], "
         "'main_cat': 'Office Products', 'price': '$5.99 - $9.99'}"),  # python literal
        json.dumps({"asin": "A3", "title": "", "main_cat": "Home", "price": "$1.00"}),
        json.dumps({"asin": "A4", "title": "Never reviewed", "main_cat": "Toys", "price": ""}),
        json.dumps({"asin": "A5", "title": "Piano", "brand": "Zed", "category": ["Music"], "main_cat": "",
                    "price": "$1,299.00"}),
        json.dumps({"asin": "A1", "title": "Duplicate record: ignored", "main_cat": "Toys"}),
    ]
    return (write_lines(tmp_path / "reviews_2018.json.gz", reviews, gzipped=True),
            write_lines(tmp_path / "meta_2018.json", meta, gzipped=False))


@pytest.fixture
def files_2023(tmp_path):
    reviews = [
        json.dumps({"user_id": "X1", "asin": "B1a", "parent_asin": "P1", "timestamp": 1600000000000, "rating": 5}),
        json.dumps({"user_id": "X2", "asin": "B2", "parent_asin": "P2", "timestamp": 1600000001000, "rating": 3}),
        json.dumps({"user_id": "X2", "asin": "B1b", "parent_asin": "P1", "timestamp": 1600000002000, "rating": 4}),
        json.dumps({"user_id": "X3", "asin": "B9", "parent_asin": "P9", "timestamp": 1600000003000, "rating": 1}),
    ]
    meta = [
        json.dumps({"parent_asin": "P1", "title": "Lamp", "description": ["Bright", "LED lamp"], "store": "Lumen",
                    "categories": ["Home", "Lighting"], "main_category": "Home", "price": 19.5,
                    "details": {"Brand": "Other"}}),
        json.dumps({"parent_asin": "P2", "title": "Stapler", "description": [], "store": None,
                    "categories": [], "main_category": "Office Products", "price": None,
                    "details": {"Brand": "Brandy"}}),
    ]
    # the meta file is gzipped although its name does not say so: detected by the magic bytes
    return (write_lines(tmp_path / "reviews_2023.jsonl", reviews, gzipped=False),
            write_lines(tmp_path / "meta_2023.jsonl", meta, gzipped=True))


def test_2018_counts_fields_and_default_partitions(tmp_path, files_2018):
    reviews, meta = files_2018
    report = import_amazon(reviews, meta, tmp_path / "out")
    assert report.rows_read == 9  # non-empty lines, the unreadable one included
    assert report.rows_read - sum(report.dropped.values()) == report.events
    assert report.dropped == {
        "reviews: lines that are neither JSON nor a Python literal (first: line 6)": 1,
        "reviews without user, item or time": 1,
        "reviews of items without metadata": 1,
        "reviews of items without a title": 1,
        "repeated reviews (same user, item and timestamp)": 1,
    }
    assert (report.users, report.items, report.events) == (2, 3, 4)
    assert report.partitions == {"home": 2, "office-products": 1, "unknown": 1}
    events, items = load_all(tmp_path / "out")
    assert set(events.event) == {"purchase"}
    hidden = {(pseudonym(user, merchant_key(tmp_path / "out" / folder)), item) for user, item, folder in
              [("U1", "A1", "home"), ("U2", "A2", "office-products"), ("U1", "A5", "unknown"), ("U2", "A1", "home")]}
    assert set(zip(events.user_id, events.item_id)) == hidden
    assert events.timestamp.min() == pd.Timestamp("2017-07-14 02:40:00")
    item = items.set_index("item_id")
    assert list(item.index.sort_values()) == ["A1", "A2", "A5"]  # A3 (no title), A4 (no review) are not written
    assert item.loc["A1", "title"] == "Red Mug"
    assert item.loc["A1", "description"] == "Red ceramic mug."
    assert item.loc["A1", "brand"] == "Acme"
    assert item.loc["A1", "category"] == "Home & Kitchen > Kitchen > Mugs"
    assert item.loc["A1", "price"] == 12.99
    assert item.loc["A2", "description"] == "Blue pen" and item.loc["A2", "brand"] == ""
    assert item.loc["A2", "category"] == "Office Products"  # empty category list: the main category
    assert math.isnan(item.loc["A2", "price"])  # a price range
    assert item.loc["A5", "price"] == 1299.0 and item.loc["A5", "partition"] == "unknown"


def test_2018_partition_by_brand(tmp_path, files_2018):
    reviews, meta = files_2018
    report = import_amazon(reviews, meta, tmp_path / "out", partition_by="brand")
    assert report.partitions == {"acme": 2, "unknown": 1, "zed": 1}
    assert sorted(p.name for p in merchant_folders(tmp_path / "out")) == ["acme", "unknown", "zed"]


def test_2018_partition_by_brand_names_the_one_item_folders(tmp_path, files_2018):
    reviews, meta = files_2018
    report = import_amazon(reviews, meta, tmp_path / "out", partition_by="brand")
    (single,) = [note for note in report.notes if "single item" in note]
    # every brand here sold one item (acme's two reviews are of A1): all are written, named, and warned about
    assert single.startswith("3 of 3 folder(s) hold a single item (acme, unknown, zed)")
    assert "training refuses" in single
    for merchant in map(load_merchant, merchant_folders(tmp_path / "out")):
        assert ["holds 1 item" in w.message for w in merchant.warnings] == [True], merchant.name


def test_implausible_source_values_are_made_to_fit_and_counted(tmp_path):
    reviews = [json.dumps({"user_id": f"X{k}", "asin": "B1", "parent_asin": f"P{k % 2}", "timestamp": when,
                           "rating": 5}) for k, when in enumerate([1600000000000, 1600000001000, 7258118400000,
                                                                    -8520336000000, 1600000002000])]
    meta = [
        '{"parent_asin": "P0", "title": "%s", "main_category": "Home", "price": Infinity}' % ("Lamp " * 4_000),
        json.dumps({"parent_asin": "P1", "title": "Stapler", "main_category": "Home", "price": 1e300}),
    ]
    out = tmp_path / "out"
    report = import_amazon(write_lines(tmp_path / "r.jsonl", reviews, False),
                           write_lines(tmp_path / "m.jsonl", meta, False), out)
    # the reviews dated 2200 and 1700 are dropped and counted; the rest validates against the contract
    assert report.dropped["events dated before 1990-01-01 or more than a day ahead of the import"] == 2
    assert report.events == 3 and report.rows_read - sum(report.dropped.values()) == report.events
    assert any("item title(s) longer than 10,000 characters were cut" in note for note in report.notes)
    (home,) = [load_merchant(folder) for folder in merchant_folders(out)]
    assert home.warnings == []
    items = home.items.set_index("item_id")
    assert math.isnan(items.loc["P0", "price"]) and items.loc["P1", "price"] == 1e300
    assert len(items.loc["P0", "title"]) <= 10_000 and items.loc["P0", "title"].startswith("Lamp Lamp")


def test_2023_fields_join_via_parent_asin(tmp_path, files_2023):
    reviews, meta = files_2023
    report = import_amazon(reviews, meta, tmp_path / "out")
    assert report.rows_read == 4
    assert report.dropped["reviews of items without metadata"] == 1
    assert (report.users, report.items, report.events) == (2, 2, 3)
    assert report.partitions == {"home": 2, "office-products": 1}
    events, items = load_all(tmp_path / "out")
    first = events.sort_values("timestamp").iloc[0]
    assert (first.user_id, first.item_id, first.timestamp) == (
        pseudonym("X1", merchant_key(tmp_path / "out" / first.partition)), "P1", pd.Timestamp("2020-09-13 12:26:40"))
    item = items.set_index("item_id")
    assert item.loc["P1", "title"] == "Lamp" and item.loc["P1", "description"] == "Bright LED lamp"
    assert item.loc["P1", "brand"] == "Lumen"  # store wins over details["Brand"]
    assert item.loc["P1", "category"] == "Home > Lighting" and item.loc["P1", "price"] == 19.5
    assert item.loc["P2", "brand"] == "Brandy"  # no store: details["Brand"]
    assert item.loc["P2", "category"] == "Office Products" and math.isnan(item.loc["P2", "price"])


def test_2023_partition_by_store_through_cli(tmp_path, files_2023):
    reviews, meta = files_2023
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "import", "amazon", "--reviews", str(reviews), "--meta", str(meta),
                                      "--out", str(out), "--partition-by", "store"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in merchant_folders(out)) == ["lumen", "unknown"]
    assert "reviews of items without metadata" in result.output
    assert flat(f"fedcvr data validate {out}") in flat(result.output)


def test_mixed_formats_and_unknown_partition_field_are_clear_errors(tmp_path, files_2018, files_2023):
    with pytest.raises(ImportInputError, match="same release"):
        import_amazon(files_2018[0], files_2023[1], tmp_path / "o1")
    with pytest.raises(ImportInputError, match="swap"):
        import_amazon(files_2018[1], files_2018[0], tmp_path / "o2")
    with pytest.raises(ImportInputError, match="'colour'"):
        import_amazon(*files_2023, tmp_path / "o3", partition_by="colour")


def test_cli_missing_file_exit_2(tmp_path, files_2023):
    missing = tmp_path / "no_such_reviews.json.gz"
    result = CliRunner().invoke(app, ["data", "import", "amazon", "--reviews", str(missing), "--meta",
                                      str(files_2023[1]), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert flat(str(missing)) in flat(result.output) and "--reviews" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("raw", "expected"), [
    ("$12.99", 12.99), ("12.99", 12.99), ("$1,299.00", 1299.0), (7, 7.0), (19.5, 19.5),
    ("", None), (None, None), ("$5.99 - $9.99", None), (".a-box-inner{background-color:#fff;}", None), (-1.0, None),
    (float("inf"), None), (float("nan"), None), (10**400, None), ("$" + "9" * 400, None),
])
def test_parse_price(raw, expected):
    value = parse_price(raw)
    assert math.isnan(value) if expected is None else value == expected


# ------------------------------------------------------------------ titles and descriptions holding HTML

@pytest.mark.parametrize(("raw", "expected"), [
    ("Canoe &amp; Kayak", "Canoe & Kayak"),
    ("Nursery D&eacute;cor &ndash; &quot;Kids&quot; &#233;t&#xE9;", "Nursery Décor – \"Kids\" été"),
    ("Tom &amp;amp; Jerry", "Tom & Jerry"),  # double-escaped
    ("&lt;b&gt;Bold&lt;/b&gt; News", "Bold News"),  # escaped tags
    ("<b>Bold</b>   <i>News</i>", "Bold News"),
    ('<span class="a-size-medium a-color-secondary"', ""),  # an unterminated tag
    ("<script>var a = '<b>';</script>Daily <span>Planet</span>", "Daily Planet"),
    ("<style>.a-box{color:#fff;}</style>Planet<!-- hidden -->", "Planet"),
    ("One<br/>Two<p>Three</p>", "One\nTwo\nThree"),
    ("5 < 6 & 7 > 2", "5 < 6 & 7 > 2"),
    ("  plain   text  ", "plain text"),
])
def test_clean_markup(raw, expected):
    assert clean_markup(raw) == expected


@pytest.mark.parametrize(("text", "markup"), [
    ("Canoe & Kayak", False), ("5 < 6", False), ("I <3 NY", False), ("Issues: 12; price: $5", False),
    ("a <b> tag", True), ("</div>", True), ("&amp;", True), ("&#38;", True),
    (".a-box-inner{background-color:#fff;}", True),
    ("var aPageStart = (new Date()).getTime();", True), ("function(e){}", True), ("window.ue_ihb = 1", True),
])
def test_looks_like_markup(text, markup):
    assert looks_like_markup(text) is markup


@pytest.mark.parametrize(("text", "expected"), [
    ("Wired Weekly brings you technology. Every week.", "Wired Weekly brings you technology."),
    ("Inc. is the business magazine for owners. More.", "Inc. is the business magazine for owners."),  # too early
    ("First line\nSecond line", "First line"),
    ("word " * 30, "word " * 15 + "word..."),  # 80 characters at a word boundary
    ("x" * 100, "x" * 80 + "..."),  # no space to cut at
])
def test_first_sentence(text, expected):
    assert first_sentence(text) == expected


@pytest.fixture
def files_html(tmp_path):
    span = '<span class="a-size-medium a-color-secondary"'
    meta = [
        {"asin": "H1", "title": "Canoe &amp; Kayak", "description": ["Paddling."]},
        {"asin": "H2", "title": "<b>Bold</b>  <i>News</i>"},
        {"asin": "H3", "title": "<script>var a = '<b>';</script>Daily <span>Planet</span>"},
        {"asin": "H4", "title": span, "description": [
            "", "<i>Wired Weekly</i> brings the news of technology &amp; science to you. Every week."]},
        {"asin": "H5", "title": ".a-box-inner{background-color:#fff;}", "description": ["A" + " long" * 30]},
        {"asin": "H6", "title": span, "description": ["<div></div>"], "brand": "Meredith",
         "category": ["Magazine Subscriptions", "Home &amp; Garden"]},
        {"asin": "H7", "title": span, "brand": "", "category": []},  # nothing gives a title: dropped
    ]
    meta = [json.dumps({"main_cat": "Magazine Subscriptions", **record}) for record in meta]
    reviews = [json.dumps({"reviewerID": f"U{k % 2}", "asin": f"H{k}", "unixReviewTime": 1500000000 + k})
               for k in range(1, 8)]
    return write_lines(tmp_path / "reviews.json", reviews, False), write_lines(tmp_path / "meta.json", meta, True)


def test_titles_and_descriptions_are_cleaned_fall_back_and_are_counted(tmp_path, files_html):
    report = import_amazon(*files_html, tmp_path / "out")
    assert report.dropped["reviews of items without a title"] == 1  # H7
    assert report.events == 6
    assert [note for note in report.notes if "imported items" in note] == [
        "titles cleaned of HTML (tags, entities, script/style content): 3 of 6 imported items",
        "titles taken from the description (the title was empty or markup): 2 of 6 imported items",
        "titles made of brand and category (no usable title or description): 1 of 6 imported items",
        "descriptions cleaned of HTML: 2 of 6 imported items",  # H4, and H6's lone empty <div>
    ]
    _, items = load_all(tmp_path / "out")
    item = items.set_index("item_id")
    assert item.title.to_dict() == {
        "H1": "Canoe & Kayak",  # entity unescaped
        "H2": "Bold News",  # tags stripped
        "H3": "Daily Planet",  # script content dropped
        "H4": "Wired Weekly brings the news of technology & science to you.",  # the description's first sentence
        "H5": "A" + " long" * 15 + "...",  # code-like title; the description cut to 80 characters at a word
        "H6": "Meredith - Home & Garden",  # brand and the last category
    }
    assert item.loc["H4", "description"] == "Wired Weekly brings the news of technology & science to you. Every week."
    assert item.loc["H6", "description"] == ""
    assert item.loc["H6", "category"] == "Magazine Subscriptions > Home & Garden"
    assert item.loc["H1", "description"] == "Paddling."


def test_cli_prints_the_cleaning_counts(tmp_path, files_html):
    reviews, meta = files_html
    result = CliRunner().invoke(app, ["data", "import", "amazon", "--reviews", str(reviews), "--meta", str(meta),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert flat("titles taken from the description (the title was empty or markup): 2 of 6 imported items") in flat(
        result.output)


def test_real_magazine_titles_hold_no_markup(tmp_path):
    reviews, meta = MAGAZINE / "Magazine_Subscriptions_5.json.gz", MAGAZINE / "meta_Magazine_Subscriptions.json.gz"
    if not (reviews.is_file() and meta.is_file()):
        pytest.skip(f"the shared Amazon Reviews 2018 Magazine Subscriptions files are not in {MAGAZINE}")
    report = import_amazon(reviews, meta, tmp_path / "out")
    # 148 of the 151 reviewed items are titled '<span class="a-size-medium a-color-secondary"' in the meta file
    notes = "\n".join(report.notes)
    assert "titles taken from the description (the title was empty or markup): 145 of 151 imported items" in notes
    assert "titles made of brand and category (no usable title or description): 3 of 151 imported items" in notes
    assert report.dropped["reviews of items without a title"] == 0 and report.events == 2_267
    _, items = load_all(tmp_path / "out")
    assert len(items) == 151
    for column in ("title", "description", "category", "brand"):
        left = items[items[column].str.contains(MARKUP_LEFT)]
        assert left.empty, (column, left[column].head().tolist())
    assert items.title.str.len().between(1, 83).all()
