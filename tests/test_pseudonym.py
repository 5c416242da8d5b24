"""Shopper ids are pseudonymised at import with HMAC-SHA256 under a private per-merchant key."""

from __future__ import annotations

import hashlib
import hmac

import pandas as pd
import pytest

from fedcvr.shared.data.importers.report import ImportReport, write_partitions
from fedcvr.shared.data.loader import load_merchant
from fedcvr.shared.data.pseudonym import KEY_FILE, PseudonymKeyError, merchant_key, pseudonym, pseudonymise


def test_pseudonym_is_hmac_sha256_under_the_merchant_key(tmp_path):
    key = merchant_key(tmp_path / "shop")
    assert len(key) == 32 and (tmp_path / "shop" / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert merchant_key(tmp_path / "shop") == key  # created once, then reused
    expected = hmac.new(key, b"17850", hashlib.sha256).hexdigest()[:32]  # the standard library agrees
    assert pseudonym("17850", key) == expected
    assert pseudonym("17850", merchant_key(tmp_path / "other")) != expected  # unlinkable across merchants
    ids = pd.Series(["b", "a", "b", "ä"])
    out = pseudonymise(ids, key)
    assert list(out) == [pseudonym(v, key) for v in ["b", "a", "b", "ä"]] and out[0] == out[2] != out[1]


def test_a_key_others_can_read_or_a_damaged_key_is_refused(tmp_path):
    merchant_key(tmp_path)
    path = tmp_path / KEY_FILE
    path.chmod(0o644)
    with pytest.raises(PseudonymKeyError, match=f"readable by other users .* chmod 600 {path}"):
        merchant_key(tmp_path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(PseudonymKeyError, match="holds 5 bytes, a pseudonym key has 32"):
        merchant_key(tmp_path)


def test_import_writes_no_raw_id_and_a_reimport_keeps_the_pseudonyms(tmp_path):
    items = pd.DataFrame({"item_id": ["i1", "i2"], "title": ["Mug", "Pen"], "description": "", "category": "",
                          "brand": "", "price": [1.0, 2.0]})
    events = pd.DataFrame({"user_id": ["17850", "13047", "17850"], "item_id": ["i1", "i2", "i2"],
                           "event": "purchase", "timestamp": pd.to_datetime(["2011-01-01", "2011-01-02",
                                                                              "2011-01-03"]),
                           "partition": ["uk", "uk", "uk"]})
    write_partitions(tmp_path, items, events, ImportReport("test", tmp_path))
    first = load_merchant(tmp_path / "uk").events
    raw = (tmp_path / "uk" / "events.parquet").read_bytes()
    assert b"17850" not in raw and b"13047" not in raw
    assert first.user_id.nunique() == 2 and first.user_id.str.fullmatch(r"[0-9a-f]{32}").all()
    write_partitions(tmp_path, items, events, ImportReport("test", tmp_path))
    assert list(load_merchant(tmp_path / "uk").events.user_id) == list(first.user_id)


def shop(folder, fmt: str, user_ids: list) -> None:
    """A merchant folder with three items and one event per user id, an extra column and a position."""
    folder.mkdir(parents=True)
    items = pd.DataFrame({"item_id": ["i1", "i2", "i3"], "title": ["A", "B", "C"]})
    n = len(user_ids)
    events = pd.DataFrame({"user_id": user_ids, "item_id": ["i1", "i2", "i3", "i1"][:n],
                           "event": ["impression", "click", "purchase", "impression"][:n],
                           "timestamp": ["2024-03-01T12:00:00Z"] * n, "position": [0, 1, 2, 3][:n],
                           "campaign": ["x", "y", None, "z"][:n]})
    if fmt == "csv":
        items.to_csv(folder / "items.csv", index=False)
        events.to_csv(folder / "events.csv", index=False)
    else:
        items.to_parquet(folder / "items.parquet", index=False)
        events.to_parquet(folder / "events.parquet", index=False)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_pseudonymise_a_folder_in_place_keeps_everything_else(tmp_path, fmt):
    from fedcvr.shared.data.pseudonym import pseudonymise_folder

    folder = tmp_path / "shop"
    shop(folder, fmt, [" alice ", "bob", "alice", "carol"])
    before = load_merchant(folder).events
    done = pseudonymise_folder(folder)
    assert (done.table.name, done.rows, done.shoppers, done.key_created) == (f"events.{fmt}", 4, 3, True)
    after = load_merchant(folder).events  # still valid data
    key = merchant_key(folder)
    assert list(after["user_id"]) == [pseudonym(v, key) for v in ["alice", "bob", "alice", "carol"]]
    pd.testing.assert_frame_equal(after.drop(columns="user_id"), before.drop(columns="user_id"))
    assert sorted(p.name for p in folder.iterdir()) == sorted([KEY_FILE, f"events.{fmt}", f"items.{fmt}"])


def test_pseudonymise_refuses_ids_that_are_pseudonyms_already_and_names_what_is_missing(tmp_path):
    from fedcvr.shared.data.pseudonym import PseudonymiseError, pseudonymise_folder

    folder = tmp_path / "shop"
    shop(folder, "parquet", ["alice", "bob", None])
    pseudonymise_folder(folder)
    once = pd.read_parquet(folder / "events.parquet")
    assert pd.isna(once["user_id"].iloc[2])  # a blank id stays blank (validation reports it)
    with pytest.raises(PseudonymiseError, match="already looks like a pseudonym .* --force"):
        pseudonymise_folder(folder)
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "events.parquet"), once)  # nothing changed
    done = pseudonymise_folder(folder, force=True)
    assert not done.key_created and done.shoppers == 2
    pd.DataFrame({"shopper": ["a"]}).to_csv(tmp_path / "other.csv", index=False)
    (folder / "events.parquet").unlink()
    pd.DataFrame({"shopper": ["a"], "item_id": ["i1"]}).to_csv(folder / "events.csv", index=False)
    with pytest.raises(PseudonymiseError, match="events.csv, column 'user_id': the column is missing"):
        pseudonymise_folder(folder)
    (folder / "events.csv").unlink()
    with pytest.raises(PseudonymiseError, match="the 'events' table is missing"):
        pseudonymise_folder(folder)


def test_cli_pseudonymises_every_merchant_of_a_marketplace(tmp_path):
    from typer.testing import CliRunner

    from fedcvr.cli import app

    shop(tmp_path / "m" / "a", "csv", ["u1", "u2"])
    shop(tmp_path / "m" / "b", "parquet", ["u1", "u3", "u4"])
    result = CliRunner().invoke(app, ["data", "pseudonymise", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "created" in result.output and "events.parquet" in result.output
    a, b = (load_merchant(tmp_path / "m" / name).events["user_id"] for name in ("a", "b"))
    assert a.iloc[0] != b.iloc[0]  # one shopper, two merchants, unrelated pseudonyms
    again = CliRunner().invoke(app, ["data", "pseudonymise", str(tmp_path / "m")])
    assert again.exit_code == 2 and "2 of 2 merchant folder(s) not pseudonymised" in again.output
