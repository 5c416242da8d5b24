"""One or many merchants' data as one catalog and train / validation / test sets in catalog codes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.examples import ExampleConfig, build_examples, split_by_time
from ..data.loader import MerchantData, merchant_folders
from ..model.errors import ModelConfigError
from .data import Catalog, TrainingSet

SPLITS = ("train", "validation", "test")


@dataclass
class Prepared:
    """The merchants' data as one catalog and three training sets, plus each merchant's catalog rows."""

    names: list[str]
    catalog: Catalog
    splits: dict[str, TrainingSet]
    candidates: dict[int, np.ndarray]


def select_merchants(data_root: Path, names: list[str] | None) -> list[Path]:
    folders = merchant_folders(data_root)
    if not names:
        return folders
    by_name = {f.name: f for f in folders}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ModelConfigError(f"--merchants: {', '.join(unknown)} not found in {data_root}; the merchants there are "
                               f"{', '.join(sorted(by_name))}")
    return [by_name[n] for n in names]


def prepare(merchants: list[MerchantData], example_config: ExampleConfig) -> Prepared:
    catalog = Catalog.from_items([m.items for m in merchants])
    if len(catalog) == 0:
        raise ModelConfigError("the merchants' items tables hold zero items: there is nothing to encode or rank")
    parts: dict[str, list] = {s: [] for s in SPLITS}
    for m in merchants:
        split = split_by_time(build_examples(m, example_config), example_config)
        for name in SPLITS:
            parts[name].append(getattr(split, name))
    splits = {name: TrainingSet.build(parts[name], catalog) for name in SPLITS}
    if len(splits["train"]) == 0:
        raise ModelConfigError("the training split is empty: the merchants' events yield no examples")
    candidates = {k: np.unique(catalog.codes(m.items["item_id"].to_numpy())) for k, m in enumerate(merchants)}
    return Prepared([m.name for m in merchants], catalog, splits, candidates)
