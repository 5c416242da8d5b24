"""The next-basket section of an experiment report: the model of every setting beside the classic baselines."""

from __future__ import annotations

import pandas as pd

from fedcvr.shared.evaluation import BASELINES, tables
from fedcvr.shared.evaluation.basket_metrics import PREFIX
from fedcvr.shared.evaluation.next_basket import params_text

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
            label += ": " + params_text({m.removeprefix("param."): float(v)
                                         for m, v in zip(chosen["metric"], chosen["value"], strict=True)})
        entry = (label, metrics)
        (baselines if _is_baseline(str(setting)) else models).append(entry)
    return models + sorted(baselines, key=lambda e: (BASELINES.index(e[0].split(" (", 1)[0]), e[0]))


def standing(entries: list[tuple[str, dict]]) -> list[str]:
    """Where the model stands: the model setting with the best NDCG@10 over every item (mean over its seeds)
    against the best baseline row, and whether the difference is within the 95% intervals."""
    by_setting: dict[str, list[dict]] = {}
    for label, m in entries:
        if not _is_baseline(label) and m.get(KEY) is not None:
            by_setting.setdefault(label.split(", seed ")[0], []).append(m)
    baselines = [(label, m) for label, m in entries if _is_baseline(label) and m.get(KEY) is not None]
    if not by_setting or not baselines:
        return []
    mean = {name: sum(m[KEY] for m in ms) / len(ms) for name, ms in by_setting.items()}
    model = max(mean, key=mean.get)
    label, best = max(baselines, key=lambda e: e[1][KEY])
    beaten = sum(1 for _, m in baselines if m[KEY] > mean[model])
    seeds = len(by_setting[model])
    overlap = any(m.get(f"{KEY}.lo", 1) <= best[KEY] <= m.get(f"{KEY}.hi", 0) for m in by_setting[model]) or \
        best.get(f"{KEY}.lo", 1) <= mean[model] <= best.get(f"{KEY}.hi", 0)
    verdict = (f"the best model setting, {model} (NDCG@10 {mean[model]:.4f}"
               f"{f', mean of {seeds} seeds' if seeds > 1 else ''}), "
               + (f"loses to {beaten} of the {len(baselines)} baseline rows" if beaten
                  else "is above every baseline row")
               + f"; the best baseline is {label} ({best[KEY]:.4f})"
               + ("; the difference is within the 95% intervals" if overlap else
                  "; the 95% intervals do not reach the other's mean"))
    return [f"- Where the model stands today: {verdict}."]


def per_merchant(table: pd.DataFrame) -> pd.DataFrame:
    """Test next-basket NDCG@10 of each merchant's shoppers (rows, largest merchant first by test shoppers): every
    model setting (mean over seeds) and the best baseline that merchant fits alone, with its name."""
    rows = table[(table["split"] == "test") & (table["merchant"] != "all")]
    ndcg = rows[rows["metric"] == KEY]
    if ndcg.empty:
        return pd.DataFrame()
    size = rows[rows["metric"] == f"{PREFIX}.all.n"].groupby("merchant")["value"].max()
    out: dict[str, dict[str, object]] = {}
    for merchant, group in ndcg.groupby("merchant", sort=False):
        entry: dict[str, object] = {"merchant": merchant, "shoppers": int(size.get(merchant, 0))}
        models = group[~group["setting"].map(_is_baseline)]
        for (setting, epsilon), cell in models.groupby(["setting", "epsilon"], dropna=False, sort=False):
            entry[_label(str(setting), epsilon, 0, 1)] = float(cell["value"].mean())
        local = group[group["setting"].map(_is_baseline)]
        if len(local):
            means = local.groupby("setting")["value"].mean()
            entry["best local baseline"] = f"{means.idxmax()} {means.max():.4f}"
        out[str(merchant)] = entry
    frame = pd.DataFrame(out.values())
    return frame.sort_values("shoppers", ascending=False, kind="stable").reset_index(drop=True)


def _markdown(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" if c in ("merchant", "best local baseline") else "---:" for c in frame.columns) + "|"
    body = ["| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


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
    merchants = per_merchant(table)
    if not merchants.empty:
        lines += ["### Per merchant", "", "NDCG@10 over each merchant's own test shoppers (every item; shoppers = "
                  "those asked): each model setting, mean over seeds (local-only: the merchant's own model), and "
                  "the best of the baselines the merchant fits on its own purchases.", "", _markdown(merchants), ""]
    return lines
