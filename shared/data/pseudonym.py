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
import stat
from pathlib import Path

import pandas as pd
from cryptography.hazmat.primitives import hashes, hmac

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
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(KEY_BYTES)
    try:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another import created it meanwhile
        return _read_key(path)
    with os.fdopen(handle, "wb") as out:
        out.write(key)
    return key


def _read_key(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PseudonymKeyError(
            f"{path}: the pseudonym key is readable by other users (mode {mode:04o}); it must be private to its "
            f"owner. fix: chmod 600 {path}")
    key = path.read_bytes()
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
