"""Turn a merchant's events into examples for conversion modelling, and split them by time.

One example per impression: the shopper's behaviour history strictly before it, the target item, and the labels
`clicked` and `purchased`.

Explicit feedback (the events hold impressions)
  An impression of item i to shopper u at time t is `clicked` when u clicks i at a time in
  [t, min(t + attribution window, next impression of i to u)); when the data has session ids, only in the same
  session. `purchased` likewise with purchase events. A purchase implies a click (`clicked` is set with it), as the
  ESMM click -> purchase funnel requires.
Implicit feedback (no impressions at all: purchase logs, reviews)
  Each purchase (u, i, t) becomes a positive example (clicked = purchased = 1) and K negatives
  (clicked = purchased = 0) at the same time and with the same history, drawn from plausible items: the shopper's
  own past purchases (`examples.history-negatives`), the shop's past sales (`examples.popular-negatives`), else
  uniformly; each example carries log_q, the sampling correction that keeps the learned score a ranking of the
  whole catalog (`negatives.py` states both).
History
  The shopper's events with timestamp < t (strictly), the last L of them with their event types, oldest first,
  right-aligned and padded on the left with item -1 / event -1 / age 0. Ages are in hours. Impressions are part
  of the history, with their own event type: what a shopper was shown (and did not click) tells about them too,
  and the model learns how much each event type weighs.
Split
  Per merchant by time: with cut points t_val and t_test at the (1 - val - test) and (1 - test) quantiles of the
  example times, train has t < t_val, validation t_val <= t < t_test, test t >= t_test. With `examples.test-from`
  (a date), t_test is that date for every merchant and t_val the (1 - val) quantile of the example times before it:
  of all the merchants' examples together where several are prepared together (one validation cut for all).
  Since histories hold only earlier events, no example sees events later than itself, and no training example
  sees events after t_val.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from ..settings import Section, SettingsError
from .contract import EVENT_TYPES
from .loader import MerchantData
from .negatives import implicit_targets
from .signals import EventLog

_NS_PER_HOUR = 3_600 * 1_000_000_000


@dataclass(frozen=True)
class ExampleConfig(Section):
    """How examples are built; read from `examples.*` in the run config."""

    history_length: int
    negatives: int
    popular_negatives: float
    history_negatives: float
    attribution_window_hours: float
    validation_fraction: float
    test_fraction: float
    test_from: str
    seed: int

    KEYS = {"examples.history-length": "history_length", "examples.negatives": "negatives",
            "examples.popular-negatives": "popular_negatives", "examples.history-negatives": "history_negatives",
            "examples.attribution-window-hours": "attribution_window_hours",
            "examples.validation-fraction": "validation_fraction", "examples.test-fraction": "test_fraction",
            "examples.test-from": "test_from", "seed": "seed"}

    def __post_init__(self) -> None:
        if self.history_length < 1:
            raise SettingsError(f"examples.history-length must be >= 1, got {self.history_length}")
        if self.negatives < 1:
            raise SettingsError(f"examples.negatives must be >= 1, got {self.negatives}")
        if not 0.0 <= self.popular_negatives <= 1.0:
            raise SettingsError(f"examples.popular-negatives must be a share in [0, 1], got {self.popular_negatives}")
        if not 0.0 <= self.history_negatives <= 1.0 - self.popular_negatives:
            raise SettingsError("examples.history-negatives must be a share in [0, 1 - examples.popular-negatives], "
                                f"got {self.history_negatives} (popular-negatives {self.popular_negatives})")
        if self.attribution_window_hours <= 0:
            raise SettingsError(f"examples.attribution-window-hours must be > 0, got {self.attribution_window_hours}")
        for name, value in (("validation-fraction", self.validation_fraction),
                            ("test-fraction", self.test_fraction)):
            if not 0.0 <= value < 1.0:
                raise SettingsError(f"examples.{name} must be in [0, 1), got {value}")
        if self.test_from:
            parse_test_from(self.test_from)  # raises on a date it cannot read
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise SettingsError("examples.validation-fraction + examples.test-fraction must be < 1, got "
                             f"{self.validation_fraction} + {self.test_fraction}")


def parse_test_from(text: str) -> pd.Timestamp:
    """`examples.test-from` (a date or date and time, UTC) as a timestamp; ValueError naming the key and the fix."""
    try:
        stamp = pd.Timestamp(text)
    except (ValueError, TypeError) as err:
        raise SettingsError(f"examples.test-from = {text!r} is not a date ({err}); write a date such as "
                         "\"2011-11-01\" or \"2011-11-01 12:00\", or \"\" to cut at the test-fraction "
                         "quantile") from None
    if stamp is pd.NaT:
        raise SettingsError(f"examples.test-from = {text!r} is not a date; write a date such as \"2011-11-01\"")
    return stamp.tz_convert("UTC").tz_localize(None) if stamp.tzinfo else stamp


@dataclass(kw_only=True)
class ExampleColumns:
    """The per-example labels, histories and signals that one merchant's `Examples` and a pooled training set
    (`training/data.py`) both hold, N examples and L history slots (see `Examples` for each column)."""

    clicked: np.ndarray
    purchased: np.ndarray
    history_item: np.ndarray
    history_event: np.ndarray
    history_age_hours: np.ndarray
    true_p_click: np.ndarray
    true_p_purchase: np.ndarray
    signals: np.ndarray
    log_q: np.ndarray


@dataclass(kw_only=True)
class Examples(ExampleColumns):
    """Examples of one merchant as aligned arrays; N examples, L history slots.

    item_ids (I,) catalog item ids, row order of the items table: item codes index into it
    user_ids (U,) shopper ids: user codes index into it
    user (N,) int32, item (N,) int32 target item code, timestamp (N,) int64 ns since epoch (UTC)
    position (N,) int32 slot where shown (-1 unknown), clicked (N,) int8, purchased (N,) int8
    history_item (N, L) int32 (-1 padding), history_event (N, L) int8 code in EVENT_TYPES (-1 padding),
    history_age_hours (N, L) float32 (0 at padding)
    true_p_click, true_p_purchase (N,) float32 ground truth where the data has it (synthetic), else NaN
    signals (N, N_SIGNALS) float32: what the merchant's log says of (user, item) strictly before the example's
    time (`signals.py`: the item in the shopper's whole history, the item's recent clicks and purchases)
    log_q (N,) float32: the negative sampler's correction log(I x Q(item | user, t)) (`negatives.py`); 0 for
    explicit feedback and for uniform negatives
    implicit: built from purchases with sampled negatives
    """

    item_ids: np.ndarray
    user_ids: np.ndarray
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    position: np.ndarray
    implicit: bool

    _PER_EXAMPLE = ("user", "item", "timestamp", "position", "clicked", "purchased", "history_item",
                    "history_event", "history_age_hours", "true_p_click", "true_p_purchase", "signals", "log_q")

    def __len__(self) -> int:
        return len(self.item)

    def subset(self, mask: np.ndarray) -> Examples:
        """The examples where `mask` is true (or at the given indices), sharing the vocabularies."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self._PER_EXAMPLE:
            values[name] = values[name][mask]
        return Examples(**values)


@dataclass
class Split:
    train: Examples
    validation: Examples
    test: Examples
    validation_start: pd.Timestamp | None
    test_start: pd.Timestamp | None


def _attribute(impressions: pd.DataFrame, actions: pd.DataFrame, by: list[str], window_ns: int) -> np.ndarray:
    """For each impression (sorted by time), whether an action on the same (user, item[, session]) falls in
    [t, min(t + window, next impression of the same pair))."""
    if actions.empty:
        return np.zeros(len(impressions), dtype=bool)
    left = impressions[["_row", "_t", "_next", *by]].sort_values("_t", kind="stable")
    right = actions[["_t", *by]].rename(columns={"_t": "_ta"}).sort_values("_ta", kind="stable")
    merged = pd.merge_asof(left, right, left_on="_t", right_on="_ta", by=by, direction="forward",
                           allow_exact_matches=True)
    hit = merged["_ta"].notna() & (merged["_ta"] < merged["_t"] + window_ns) & (merged["_ta"] < merged["_next"])
    out = np.zeros(len(impressions), dtype=bool)
    out[merged["_row"].to_numpy()] = hit.to_numpy()
    return out


def histories(user: np.ndarray, t: np.ndarray, b_user: np.ndarray, b_t: np.ndarray, b_item: np.ndarray,
               b_event: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Last `length` behaviour events of each (user, t) strictly before t. Behaviour arrays: any order."""
    order = np.lexsort((b_t, b_user))
    b_user, b_t, b_item, b_event = b_user[order], b_t[order], b_item[order], b_event[order]
    # one sortable key per (user, time): dense time ranks keep the product far from int64 overflow
    times, inverse = np.unique(np.concatenate([b_t, t]), return_inverse=True)
    rank_b, rank_q = inverse[: len(b_t)], inverse[len(b_t):]
    stride = len(times) + 1
    key_b = b_user.astype(np.int64) * stride + rank_b
    key_q = user.astype(np.int64) * stride + rank_q
    end = np.searchsorted(key_b, key_q, side="left")  # first behaviour at or after (user, t)
    start = np.searchsorted(b_user, user, side="left")  # first behaviour of the user
    idx = end[:, None] - length + np.arange(length)[None, :]
    valid = idx >= start[:, None]
    safe = np.where(valid, idx, 0)
    if len(b_t) == 0:
        valid[:] = False
        safe = np.zeros_like(idx)
        b_item, b_event, b_t = np.zeros(1, np.int32), np.zeros(1, np.int8), np.zeros(1, np.int64)
    hist_item = np.where(valid, b_item[safe], -1).astype(np.int32)
    hist_event = np.where(valid, b_event[safe], -1).astype(np.int8)
    hist_age = np.where(valid, (t[:, None] - b_t[safe]) / _NS_PER_HOUR, 0.0).astype(np.float32)
    return hist_item, hist_event, hist_age


def event_codes(data: MerchantData) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The events as codes: user (index into the sorted shopper ids, also returned), item (row of the items
    table), event (index into EVENT_TYPES) and t (ns since epoch), in the events table's order."""
    events = data.events
    user_codes, user_ids = pd.factorize(events["user_id"], sort=True)
    codes = {
        "user": user_codes.astype(np.int32),
        "item": pd.Index(data.items["item_id"].to_numpy(dtype=object)).get_indexer(events["item_id"]).astype(np.int32),
        "event": pd.Index(EVENT_TYPES).get_indexer(events["event"]).astype(np.int8),
        "t": events["timestamp"].to_numpy("datetime64[ns]").astype(np.int64),
    }
    return codes, np.asarray(user_ids, dtype=object)


def build_examples(data: MerchantData, config: ExampleConfig | None = None) -> Examples:
    """Examples of one merchant (explicit when it logs impressions, implicit otherwise); see the module doc."""
    config = config or ExampleConfig.defaults()
    events = data.events
    item_ids = data.items["item_id"].to_numpy(dtype=object)
    codes, user_ids = event_codes(data)
    b = codes  # every event, impressions included, can be part of a later example's history
    has_impressions = bool((events["event"] == "impression").any())
    if has_impressions:
        frame = _explicit_targets(events, codes, config)
    else:
        frame = implicit_targets(codes, len(item_ids), config.negatives, config.popular_negatives,
                                 config.history_negatives, config.seed)
    hist_item, hist_event, hist_age = histories(frame["user"], frame["t"], b["user"], b["t"], b["item"],
                                                 b["event"], config.history_length)
    signals = EventLog.build(b["user"], b["item"], b["event"], b["t"]).signals(frame["user"], frame["item"], frame["t"])
    return Examples(
        item_ids=item_ids, user_ids=user_ids,
        user=frame["user"], item=frame["item"], timestamp=frame["t"], position=frame["position"],
        clicked=frame["clicked"], purchased=frame["purchased"], history_item=hist_item,
        history_event=hist_event, history_age_hours=hist_age, true_p_click=frame["true_p_click"],
        true_p_purchase=frame["true_p_purchase"], signals=signals,
        log_q=frame.get("log_q", np.zeros(len(frame["item"]), np.float32)), implicit=not has_impressions,
    )


def _float_column(events: pd.DataFrame, name: str, mask: np.ndarray) -> np.ndarray:
    if name not in events.columns:
        return np.full(int(mask.sum()), np.nan, dtype=np.float32)
    return pd.to_numeric(events[name], errors="coerce").to_numpy(dtype=np.float32)[mask]


def _explicit_targets(events: pd.DataFrame, codes: dict, config: ExampleConfig) -> dict[str, np.ndarray]:
    by = ["_u", "_i"] + (["_s"] if "session_id" in events.columns else [])
    table = pd.DataFrame({"_u": codes["user"], "_i": codes["item"], "_t": codes["t"], "_e": events["event"]})
    if "_s" in by:
        table["_s"] = events["session_id"].fillna("").to_numpy()
    is_imp = (table["_e"] == "impression").to_numpy()
    imps = table[is_imp].copy()
    imps["_row"] = np.arange(len(imps))
    never = np.iinfo(np.int64).max
    imps["_next"] = (imps.sort_values("_t", kind="stable").groupby(["_u", "_i"])["_t"]
                     .shift(-1, fill_value=never).reindex(imps.index).astype(np.int64))
    window = int(config.attribution_window_hours * _NS_PER_HOUR)
    purchased = _attribute(imps, table[(table["_e"] == "purchase").to_numpy()], by, window)
    clicked = _attribute(imps, table[(table["_e"] == "click").to_numpy()], by, window) | purchased
    if "position" in events.columns:
        position = events["position"].to_numpy(dtype="float64", na_value=-1)[is_imp].astype(np.int32)
    else:
        position = np.full(len(imps), -1, dtype=np.int32)
    return {
        "user": codes["user"][is_imp], "item": codes["item"][is_imp], "t": codes["t"][is_imp],
        "position": position, "clicked": clicked.astype(np.int8), "purchased": purchased.astype(np.int8),
        "true_p_click": _float_column(events, "true_p_click", is_imp),
        "true_p_purchase": _float_column(events, "true_p_purchase", is_imp),
    }


def validation_start(times: np.ndarray, config: ExampleConfig) -> int | None:
    """With `examples.test-from`: the (1 - validation-fraction) quantile of the example times `times` (ns) before
    the test cut (None when there are none, or no validation)."""
    before = times[times < int(parse_test_from(config.test_from).value)]
    if not config.validation_fraction or not len(before):
        return None
    return int(np.quantile(before, 1.0 - config.validation_fraction, method="lower"))


def split_by_time(examples: Examples, config: ExampleConfig | None = None, t_val: int | None = None) -> Split:
    """Train / validation / test of one merchant by time; see the module doc for the cut points. With
    `examples.test-from`, `t_val` (ns) sets the validation cut (e.g. one cut for several merchants together,
    `validation_start` of their pooled times); by default it is the merchant's own."""
    config = config or ExampleConfig.defaults()
    t = examples.timestamp
    if len(t) == 0:
        empty = examples.subset(np.zeros(0, dtype=bool))
        return Split(empty, empty, empty, None, None)
    if config.test_from:
        t_test = int(parse_test_from(config.test_from).value)
        t_val = validation_start(t, config) if t_val is None else t_val
    else:
        train_q = 1.0 - config.validation_fraction - config.test_fraction
        t_val = int(np.quantile(t, train_q, method="lower")) if config.validation_fraction else None
        t_test = int(np.quantile(t, 1.0 - config.test_fraction, method="lower")) if config.test_fraction else None
    end_train = t_val if t_val is not None else t_test
    train = t < end_train if end_train is not None else np.ones(len(t), bool)
    test = t >= t_test if t_test is not None else np.zeros(len(t), bool)
    validation = ~train & ~test
    stamp = lambda v: pd.Timestamp(v) if v is not None else None  # noqa: E731
    return Split(examples.subset(train), examples.subset(validation), examples.subset(test), stamp(t_val),
                 stamp(t_test))
