"""The catalog as the recommendation service sees it: one immutable snapshot per request (`CatalogSnapshot`), the
merchant's items merged with those added while serving, the filters a request may set, and how a shopper id given
by a user matched the events table. Plain data, used by `recommender.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .item_index import ItemIndex

ITEM_FIELDS = ("item_id", "title", "description", "category", "brand", "price")


class UnknownItems(KeyError):
    """Item ids not in the catalog; `ids` lists them."""

    def __init__(self, ids: list[str]):
        super().__init__(ids)
        self.ids = ids

    def __str__(self) -> str:
        return f"unknown item id(s): {', '.join(self.ids[:20])}" + (" ..." if len(self.ids) > 20 else "")


@dataclass
class Filters:
    category: str | None = None
    min_price: float | None = None
    max_price: float | None = None
    exclude_bought: bool = True


@dataclass(frozen=True, eq=False)
class CatalogSnapshot:
    """The catalog as one request sees it: the item index and, row for row, titles, casefolded categories,
    prices and cold-start popularity. Never changed once made (its arrays are read-only)."""

    items: pd.DataFrame
    index: ItemIndex
    titles: np.ndarray
    categories: np.ndarray
    prices: np.ndarray
    popularity: np.ndarray

    def rows_of(self, item_ids: list[str]) -> np.ndarray:
        """Index rows of item ids; UnknownItems names those not in the catalog."""
        missing = [i for i in item_ids if i not in self.index.position]
        if missing:
            raise UnknownItems(missing)
        return np.asarray([self.index.position[i] for i in item_ids], dtype=np.int64)

    def title_of(self, item_id: str) -> str:
        return str(self.titles[self.index.position[item_id]])


@dataclass(frozen=True)
class ShopperMatch:
    """How a shopper id given by a user matched the events table: `user_id` as stored there (None: no match),
    `form` in words ("as given", "as the pseudonym of the raw id ..."), `checked` what was tried when nothing
    matched."""

    user_id: str | None
    form: str
    checked: str = ""


def model_version(model_dir: Path, settings: dict) -> str:
    version_file = model_dir / "VERSION"
    if version_file.is_file():
        return version_file.read_text().strip()
    return str(settings.get("version") or "unversioned")


def merged_items(base: pd.DataFrame, added: pd.DataFrame | None) -> pd.DataFrame:
    """The catalog: the merchant's items with added ones replacing those of the same id, new ones at the end."""
    base = base.reindex(columns=[c for c in ITEM_FIELDS if c in base.columns or c in ("item_id", "title")])
    if added is None or added.empty:
        return base.reset_index(drop=True)
    added = added.drop_duplicates("item_id", keep="last").set_index("item_id")
    merged = base.set_index("item_id")
    for column in added.columns:
        if column not in merged.columns:
            merged[column] = np.nan if column == "price" else ""
    merged = merged.astype({c: object for c in merged.columns if c != "price"})
    known = added.index.intersection(merged.index)
    merged.loc[known, added.columns] = added.loc[known].to_numpy()
    new = added.loc[added.index.difference(merged.index, sort=False)]
    return pd.concat([merged, new]).rename_axis("item_id").reset_index()
