"""One or many merchants' data as one catalog and train / validation / test sets in catalog codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.examples import ExampleConfig, build_examples, split_by_time, validation_start
from ..data.loader import MerchantData, merchant_folders
from ..data.signals import EventLog
from ..evaluation.baskets import BasketTask, build_task, merchant_log
from ..model.errors import ModelConfigError
from .data import Catalog, TrainingSet

SPLITS = ("train", "validation", "test")


@dataclass
class Prepared:
    """The merchants' data as one catalog and three training sets, plus each merchant's catalog rows; for purchase
    logs (no impressions; `implicit`), or when asked for, also the next-basket tasks at the validation and test cuts
    (`evaluation/baskets.py`); `logs[k]`: merchant k's events in catalog codes, for the signals of ranked candidates
    (`data/signals.py`)."""

    names: list[str]
    catalog: Catalog
    splits: dict[str, TrainingSet]
    candidates: dict[int, np.ndarray]
    logs: dict[int, EventLog]
    baskets: dict[str, BasketTask] = field(default_factory=dict)
    implicit: bool = False
    """Purchase logs: ranked by next basket (`baskets`), not by each purchase."""


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


def prepare(merchants: list[MerchantData], example_config: ExampleConfig, next_basket: bool = False) -> Prepared:
    """The merchants' examples, split by time, in one catalog; next-basket tasks for purchase logs, and for logs
    with impressions too when `next_basket` (the shoppers' purchases after the cut, ranked from all before it)."""
    catalog = Catalog.from_items([m.items for m in merchants])
    if len(catalog) == 0:
        raise ModelConfigError("the merchants' items tables hold zero items: there is nothing to encode or rank")
    parts: dict[str, list] = {s: [] for s in SPLITS}
    tasks: dict[str, list[BasketTask]] = {"validation": [], "test": []}
    implicit, offset, logs = True, 0, {}
    built = [build_examples(m, example_config) for m in merchants]
    # with a test date, merchants prepared together share one validation cut (their pooled examples' quantile), so
    # that a baseline fitted on their pooled purchases is fitted once per cut
    t_val = (validation_start(np.concatenate([e.timestamp for e in built]), example_config)
             if example_config.test_from and built else None)
    for k, (m, examples) in enumerate(zip(merchants, built, strict=True)):
        split = split_by_time(examples, example_config, t_val)
        for name in SPLITS:
            parts[name].append(getattr(split, name))
        implicit = implicit and examples.implicit
        logs[k] = merchant_log(m, catalog, offset)
        if implicit or next_basket:
            for name, cut, end in (("validation", split.validation_start, split.test_start),
                                   ("test", split.test_start, None)):
                if cut is not None:
                    tasks[name].append(build_task(m, catalog, k, offset, cut.value, None if end is None else end.value,
                                                  example_config.history_length, logs[k]))
        offset += len(examples.user_ids)
    splits = {name: TrainingSet.build(parts[name], catalog) for name in SPLITS}
    if len(splits["train"]) == 0:
        raise ModelConfigError("the training split is empty: the merchants' events yield no examples")
    candidates = {k: np.unique(catalog.codes(m.items["item_id"].to_numpy())) for k, m in enumerate(merchants)}
    baskets = ({name: BasketTask.concat(found) for name, found in tasks.items() if found}
               if implicit or next_basket else {})
    return Prepared([m.name for m in merchants], catalog, splits, candidates, logs, baskets, implicit)
