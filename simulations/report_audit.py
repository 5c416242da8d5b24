"""The experiment report's membership-inference audit: its table, the spread of a guessing AUC and the lines that
read it."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from fedcvr.simulations.report_basics import NO_DP, _eps_label, _markdown

AUDIT_COLUMNS = {"mia.loss.auc": "loss attack AUC", "mia.loss.tpr@1%fpr": "loss TPR @ 1% FPR",
                 "mia.lr.auc": "LR attack AUC", "mia.lr.tpr@1%fpr": "LR TPR @ 1% FPR"}


def audit_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per audit budget (no DP first, then ε from large to small): the attacks' AUC and TPR at 1% FPR, mean and
    std over seeds, with the ε spent and the members."""
    rows = table[(table.setting == "audit") & (table.metric != "wall-seconds")].copy()
    if rows.empty:
        return pd.DataFrame()
    rows["ε"] = rows["epsilon"].map(_eps_label)
    budget = rows.groupby("ε")["epsilon"].first()
    order = sorted(budget.index, key=lambda e: -math.inf if e == NO_DP else -float(budget[e]))
    out = []
    for eps in order:
        group = rows[rows["ε"] == eps]
        record: dict[str, Any] = {"ε": eps, "merchant": ", ".join(sorted(group.merchant.unique())),
                                  "seeds": group.seed.nunique()}
        spent = group[group.metric == "max-epsilon"]["value"]
        record["ε spent"] = f"{spent.mean():.2f}" if len(spent) else "—"
        record["members"] = int(group[group.metric == "members"]["value"].mean())
        for metric, label in AUDIT_COLUMNS.items():
            values = group[group.metric == metric]["value"]
            record[label] = values.mean()
            if metric.endswith(".auc"):
                record[f"{label} ± std"] = values.std() if len(values) > 1 else float("nan")
        out.append(record)
    return pd.DataFrame(out)


def null_auc_std(n: int, m: int) -> float:
    """The standard deviation of the AUC of a guessing attack (no signal) with n members and m non-members:
    sqrt((n + m + 1) / (12 n m)), the Mann-Whitney U statistic's under the null hypothesis, divided by n m."""
    return math.sqrt((n + m + 1) / (12 * n * m))


def audit_lines(audits: pd.DataFrame, overrides: dict | None = None) -> list[str]:
    """The report's privacy-audit section: the table and what it shows against the expectation."""
    extra = (" and, for the audit, " + ", ".join(f"{key} = {value}" for key, value in overrides.items())
             if overrides else "")
    lines = ["", "## Privacy audit: membership inference", "",
             "One merchant trains alone on half of its training examples (the members) with this grid's settings"
             f"{extra}; "
             "an attacker who holds the model and an example guesses whether the example was trained on. Loss "
             "attack: a lower loss means member. LR attack: the loss under the initial model minus the loss under "
             "the trained one (a likelihood ratio against a reference model, no shadow models). AUC 0.5 and TPR "
             "0.01 at 1% FPR are guessing; the non-members are the other half of the same training split "
             "(simulations/audit.py).", "", _markdown(audits), ""]
    for _, row in audits.iterrows():
        aucs = [row["loss attack AUC"], row["LR attack AUC"]]
        farthest = max(aucs, key=lambda a: abs(a - 0.5))
        tpr = max(row["loss TPR @ 1% FPR"], row["LR TPR @ 1% FPR"])
        noise = 2 * null_auc_std(int(row["members"]), int(row["members"]))
        within = abs(farthest - 0.5) <= noise
        if row["ε"] == NO_DP:
            verdict = ("above guessing, as expected without DP" if not within else
                       "within the noise of guessing even without DP: the model does not fit single examples "
                       "closely enough for these attacks to tell")
        else:
            verdict = "within the noise of guessing, as DP promises" if within else "NOT within the noise of guessing"
        lines.append(f"- {row['ε']}: the attack AUC farthest from 0.5 is {farthest:.4f} (guessing gives 0.5 ± "
                     f"{noise:.4f}, 2 standard deviations for {int(row['members'])} members and as many non-members), "
                     f"the best TPR at 1% FPR {tpr:.4f}: {verdict}.")
    return lines
