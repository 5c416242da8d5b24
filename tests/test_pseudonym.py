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
