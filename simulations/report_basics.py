"""What every part of the experiment report reads the tidy table with: the order of settings, the label of runs
without DP, final test metrics per setting and ε, and Markdown tables."""

from __future__ import annotations

import pandas as pd

from fedcvr.simulations.experiment_config import SETTINGS

NO_DP = "no DP"


SETTING_ORDER = SETTINGS


def final_metric(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean and std over seeds of a final test metric (all merchants) per setting and ε."""
    rows = table[(table.split == "test") & (table.merchant == "all") & (table.metric == metric)].copy()
    rows["eps"] = rows["epsilon"].map(lambda e: NO_DP if e is None or pd.isna(e) else f"{e:g}")
    grouped = rows.groupby(["setting", "eps"], sort=False)["value"]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    out["epsilon"] = out["eps"].map(lambda e: None if e == NO_DP else float(e))
    return out


def _eps_label(epsilon: float | None) -> str:
    return NO_DP if epsilon is None or pd.isna(epsilon) else f"ε {epsilon:g}"


def _markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    cells = frame.copy()
    for column in cells.columns:
        if pd.api.types.is_float_dtype(cells[column]):
            cells[column] = cells[column].map(lambda v: "" if pd.isna(v) else f"{v:.{digits}f}")
        else:
            cells[column] = cells[column].astype(object).map(lambda v: "" if v is pd.NA else v)
    lines = ["| " + " | ".join(map(str, cells.columns)) + " |", "|" + " --- |" * len(cells.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)
