"""Write one merchant's tables in the contract's layout (Parquet)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def write_merchant(folder: str | Path, items: pd.DataFrame, events: pd.DataFrame) -> Path:
    """Write `items.parquet` and `events.parquet` into `folder` (created if needed) and return it.

    Writes to temporary names first and renames, so an interrupted write never leaves a half table behind.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("items", items), ("events", events)):
        tmp = folder / f".{name}.parquet.tmp"
        frame.to_parquet(tmp, index=False)
        tmp.replace(folder / f"{name}.parquet")
    return folder


def safe_folder_name(name: str) -> str:
    """A folder name for a merchant or region: lower case, words joined by '-', only [a-z0-9-]."""
    cleaned = "".join(ch.lower() if ch.isalnum() else "-" for ch in str(name).strip())
    cleaned = "-".join(part for part in cleaned.split("-") if part)
    return cleaned or "unnamed"
