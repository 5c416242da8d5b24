"""Find and read a merchant folder's tables (CSV or Parquet) without checking their content, and find the merchant
folders of a marketplace."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from .contract import TABLE_FORMATS, DataProblem


def find_table(folder: Path, name: str) -> Path | DataProblem:
    """The file holding table `name` in `folder`, or the problem that it is missing or ambiguous."""
    found = [folder / f"{name}{ext}" for ext in TABLE_FORMATS if (folder / f"{name}{ext}").is_file()]
    if len(found) == 1:
        return found[0]
    if not found:
        return DataProblem(
            file=str(folder / f"{name}.parquet"),
            column=None,
            message=f"the '{name}' table is missing",
            fix=f"put the {name} table into the folder as {name}.parquet or {name}.csv",
        )
    return DataProblem(
        file=str(found[0]),
        column=None,
        message=f"both {found[0].name} and {found[1].name} exist; it is unclear which to read",
        fix="keep one of the two files and remove or rename the other",
    )


def _read_csv(path: Path) -> tuple[pd.DataFrame | None, DataProblem | None]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        snippet = raw[max(0, err.start - 20) : err.start + 20]
        return None, DataProblem(
            file=str(path),
            column=None,
            message=f"the file is not UTF-8 text: byte 0x{raw[err.start]:02x} at line {line} cannot be decoded",
            fix="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`)",
            rows=((f"line {line}", repr(snippet)),),
            count=1,
        )
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        return None, DataProblem(
            file=str(path),
            column=None,
            message=f"the file cannot be read as CSV: {str(err).strip()}",
            fix="write a comma-separated file with one header row and the same number of fields on every line; "
            "quote fields that contain commas",
        )
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame, None


def _read_parquet(path: Path) -> tuple[pd.DataFrame | None, DataProblem | None]:
    try:
        frame = pq.read_table(path).to_pandas()
    except Exception as err:  # pyarrow raises several unrelated types for corrupt files
        return None, DataProblem(
            file=str(path),
            column=None,
            message=f"the file cannot be read as Parquet: {err}",
            fix="re-export the table as Parquet (e.g. pandas `DataFrame.to_parquet`) or as UTF-8 CSV",
        )
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame, None


def read_table(path: Path) -> tuple[pd.DataFrame | None, DataProblem | None]:
    """Read a CSV or Parquet table without validating its content."""
    return _read_csv(path) if path.suffix == ".csv" else _read_parquet(path)


def is_merchant_folder(folder: Path) -> bool:
    return any((folder / f"items{ext}").is_file() for ext in TABLE_FORMATS)


def merchant_folders(root: str | Path) -> list[Path]:
    """The merchant folders under `root`: `root` itself when it holds a merchant's tables, else its sub-folders
    that do, in sorted order. Raises FileNotFoundError naming the folder when there are none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder. Pass a merchant folder (items + events tables) "
                                "or a marketplace folder with one sub-folder per merchant.")
    if is_merchant_folder(root):
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and is_merchant_folder(p))
    if not found:
        raise FileNotFoundError(
            f"{root}: holds no merchant data. A merchant folder has items.parquet|csv and events.parquet|csv; "
            "a marketplace folder has one such sub-folder per merchant. Create one with `fedcvr data synth` "
            "or `fedcvr data import`.")
    return found
