"""The next-basket section of an experiment report: the model of every setting beside the classic baselines."""

from __future__ import annotations

import pandas as pd

from fedcvr.shared.evaluation import BASELINES, tables
from fedcvr.shared.evaluation.basket_metrics import PREFIX

KEY = f"{PREFIX}.all.ndcg@10"
SCOPE_WORDS = {"pooled": "fitted on every merchant's purchases", "local": "each merchant fits its own"}


def _label(setting: str, epsilon: float | None, seed: int, seeds: int) -> str:
    eps = "" if epsilon is None or pd.isna(epsilon) else f", ε {float(epsilon):g}"
    return f"{setting}{eps}{f', seed {int(seed)}' if seeds > 1 else ''}"


def _is_baseline(setting: str) -> bool:
    return setting.split(" (", 1)[0] in BASELINES


def rankers(table: pd.DataFrame, merchant: str = "all") -> list[tuple[str, dict]]:
    """(label, test next-basket metrics) of every run's model and every baseline; models first, then baselines."""
    rows = table[(table["split"] == "test") & (table["merchant"] == merchant)
                 & table["metric"].str.startswith(f"{PREFIX}.")]
    if rows.empty:
        return []
    seeds = rows["seed"].nunique()
    models, baselines = [], []
    for (setting, epsilon, seed), group in rows.groupby(["setting", "epsilon", "seed"], dropna=False, sort=False):
        metrics = dict(zip(group["metric"], group["value"], strict=True))
        label = _label(str(setting), epsilon, seed, seeds)
        chosen = table[(table["setting"] == setting) & (table["seed"] == seed) & (table["merchant"] == merchant)
                       & table["metric"].str.startswith("param.")]
        if len(chosen):
            label += ": " + ", ".join(f"{m[6:].replace('_', '-')} {v:g}" for m, v in zip(chosen["metric"],
                                                                                        chosen["value"], strict=True))
        entry = (label, metrics)
        (baselines if _is_baseline(str(setting)) else models).append(entry)
    return models + sorted(baselines, key=lambda e: (BASELINES.index(e[0].split(" (", 1)[0]), e[0]))


def standing(entries: list[tuple[str, dict]]) -> list[str]:
    """Where the model stands: the best model row against the best baseline, by NDCG@10 over every item."""
    models = [(label, m[KEY]) for label, m in entries if not _is_baseline(label) and m.get(KEY) is not None]
    baselines = [(label, m[KEY]) for label, m in entries if _is_baseline(label) and m.get(KEY) is not None]
    if not models or not baselines:
        return []
    best_model, best_baseline = max(models, key=lambda e: e[1]), max(baselines, key=lambda e: e[1])
    beaten = [label for label, value in baselines if value > best_model[1]]
    verdict = (f"the best model ({best_model[0]}, NDCG@10 {best_model[1]:.4f}) "
               + (f"loses to {len(beaten)} of the {len(baselines)} baseline rows; the best baseline is "
                  f"{best_baseline[0]} ({best_baseline[1]:.4f})" if beaten else
                  f"beats every baseline row; the best baseline is {best_baseline[0]} ({best_baseline[1]:.4f})"))
    return [f"- Where the model stands today: {verdict}."]


def next_basket_lines(table: pd.DataFrame) -> list[str]:
    """The report section (empty when no run ranked next baskets)."""
    entries = rankers(table)
    if not entries:
        return []
    lines = ["", "## Next basket (purchase logs)", "",
             "Each shopper with history before the test cut is asked for its next basket: the relevant items are "
             "the distinct items of its first basket at or after the cut; its merchant's whole catalog is ranked "
             "(no sampled negatives) from everything before the cut. Mean over shoppers [bootstrap 95% interval]. "
             "Baselines: (pooled) = " + SCOPE_WORDS["pooled"] + "; (local) = " + SCOPE_WORDS["local"] + "; each "
             "baseline's setting tuned on the validation cut only (formulas: shared/evaluation/baselines.py).", "",
             *standing(entries), ""]
    for variant, words in tables.VARIANT_TITLES.items():
        lines += [f"### {words[0].upper() + words[1:]}", "", tables.markdown(entries, variant), ""]
    return lines
