"""Shopper ids are pseudonymised at import with a keyed hash, so raw ids never reach fedcvr's tables, models,
logs or messages.

pseudonym(id) = the first 32 hex digits (128 bits) of HMAC-SHA256(key, UTF-8 bytes of the id), computed with the
`cryptography` package. The key is 32 random bytes kept per merchant in the merchant's folder (`pseudonym.key`,
file mode 0600, created at the first import and reused by later ones, so a shopper keeps one pseudonym across
imports). Merchants' keys differ: the same shopper gets unrelated pseudonyms at two merchants, so their tables
cannot be joined on user_id. Without the key a pseudonym cannot be traced back to the id, nor an id guessed
and checked against it (as a plain, unkeyed hash of a short customer number could be). Keep the key file with
the merchant's data and out of anything shared; deleting it makes later imports assign new pseudonyms.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.hazmat.primitives import hashes, hmac

from ..private_files import create_private, read_private

KEY_FILE = "pseudonym.key"
KEY_BYTES = 32
PSEUDONYM_HEX = 32


class PseudonymKeyError(ValueError):
    """The merchant's pseudonym key cannot be used; the message names the file and the fix."""


def merchant_key(folder: Path) -> bytes:
    """The merchant's pseudonym key from `folder/pseudonym.key`, created (0600) when the folder has none."""
    path = Path(folder) / KEY_FILE
    if path.exists():
        return _read_key(path)
    key = os.urandom(KEY_BYTES)
    if create_private(path, key):
        return key
    return _read_key(path)  # another import created it meanwhile


def _read_key(path: Path) -> bytes:
    key = read_private(path, "the pseudonym key", PseudonymKeyError)
    if len(key) != KEY_BYTES:
        raise PseudonymKeyError(
            f"{path}: holds {len(key)} bytes, a pseudonym key has {KEY_BYTES}; the file is damaged. fix: restore it "
            "from a backup (pseudonyms of earlier imports depend on it), or delete it and import all of the "
            "merchant's data again to get new pseudonyms")
    return key


def pseudonym(value: str, key: bytes) -> str:
    """The pseudonym of one id under `key`."""
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(value.encode("utf-8"))
    return mac.finalize().hex()[:PSEUDONYM_HEX]


def pseudonymise(ids: pd.Series, key: bytes) -> pd.Series:
    """Each id replaced by its pseudonym (each distinct id hashed once)."""
    text = ids.astype(str)
    mapping = {value: pseudonym(value, key) for value in pd.unique(text)}
    return text.map(mapping).astype(object)


LOOKS_PSEUDONYMOUS = re.compile(rf"[0-9a-f]{{{PSEUDONYM_HEX}}}")


class PseudonymiseError(ValueError):
    """A folder's events cannot be pseudonymised; the message names the file, the column and the fix."""


@dataclass
class Pseudonymised:
    """What `pseudonymise_folder` did to one merchant folder."""

    table: Path
    rows: int
    shoppers: int
    key_created: bool


def pseudonymise_folder(folder: Path, force: bool = False) -> Pseudonymised:
    """Replace the shopper ids in `folder`'s events table (`events.parquet` or `events.csv`) by their pseudonyms
    under the folder's key (created when it has none), in place and in the table's own format; every other column
    and row is kept as it was. Ids are trimmed of surrounding spaces first (as the loader reads them); blank ids stay
    blank (`fedcvr data validate` reports them).

    A table whose ids all look like pseudonyms already (32 lowercase hex digits: an import wrote it, or this ran
    before) is refused unless `force`: hashing pseudonyms again would give every shopper a new id that later
    imports of the same shoppers would not match. The new table is written beside the old one and renamed over it,
    so an interruption leaves the old table whole."""
    from .loader import find_table, read_table

    folder = Path(folder)
    found = find_table(folder, "events")
    if not isinstance(found, Path):
        raise PseudonymiseError(f"{found.file}: {found.message}. fix: {found.fix}")
    if found.suffix == ".csv":
        frame, problem = read_table(found)
        if problem is not None:
            raise PseudonymiseError(str(problem))
        columns = list(frame.columns)
    else:
        try:
            arrow = pq.read_table(found)
        except Exception as err:  # pyarrow raises several unrelated types for corrupt files
            raise PseudonymiseError(f"{found}: cannot be read as Parquet: {err}. fix: re-export the table as "
                                    "Parquet or as UTF-8 CSV") from err
        columns = [str(name).strip() for name in arrow.column_names]
    if "user_id" not in columns:
        raise PseudonymiseError(f"{found}, column 'user_id': the column is missing; the table has "
                                f"{', '.join(columns[:8]) or 'no columns'}. fix: name the shopper id column user_id")
    position = columns.index("user_id")
    ids = frame["user_id"] if found.suffix == ".csv" else arrow.column(position).to_pandas()
    text = ids.astype(object).map(lambda v: None if pd.isna(v) else str(v).strip())
    present = text[text.notna() & (text != "")]
    if not force and len(present) and present.map(lambda v: bool(LOOKS_PSEUDONYMOUS.fullmatch(v))).all():
        raise PseudonymiseError(
            f"{found}, column 'user_id': every id already looks like a pseudonym (32 hex digits): the table was "
            "imported or pseudonymised before, and hashing it again would give every shopper a new id. fix: "
            "nothing to do; if these are your raw ids, run again with --force")
    key_created = not (folder / KEY_FILE).exists()
    key = merchant_key(folder)
    hashed = text.copy()
    hashed[present.index] = pseudonymise(present, key)
    partial = found.with_name(found.name + ".partial")
    try:
        if found.suffix == ".csv":
            frame["user_id"] = hashed
            frame.to_csv(partial, index=False, encoding="utf-8")
        else:
            column = pa.array([None if pd.isna(v) else v for v in hashed], type=pa.string())
            field = arrow.schema.field(position).with_type(pa.string())
            pq.write_table(arrow.set_column(position, field, column), partial)
        os.replace(partial, found)
    finally:
        partial.unlink(missing_ok=True)
    return Pseudonymised(table=found, rows=len(ids), shoppers=int(present.nunique()), key_created=key_created)
