"""`fedcvr report RESULTS_DIR`: a Markdown report with PNG plots from an experiment's tidy table.

Reads `<dir>/results.parquet` and `<dir>/experiment.json` (written by `fedcvr experiment`) and writes
`<dir>/report.md` with:
- privacy_utility.png: test CTCVR AUC and NDCG@10 against ε (log axis; no DP at the right), mean and standard
  deviation over seeds, one line per setting, centralized training as a horizontal line;
- convergence.png: validation CTCVR AUC per round of each federated setting, one panel per ε;
- merchant_gain.png: per merchant, test CTCVR AUC of the federated model minus that of the merchant alone, against
  the merchant's training examples;
- cost.png: MB sent per round and wall time per round of each federated setting;
and tables of the same numbers, the ordering check (more ε, more utility?) and the machine, wall time and seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

NO_DP = "no DP"
SETTING_ORDER = ("centralized", "local-only", "fedavg", "fedprox", "fedadam")
COLOR = {"centralized": "black", "local-only": "tab:blue", "fedavg": "tab:orange", "fedprox": "tab:green",
         "fedadam": "tab:red"}  # the same colour for a setting in every plot


class ReportError(ValueError):
    """The folder holds no experiment results; the message says what to run."""


def load(results: Path) -> tuple[pd.DataFrame, dict]:
    table_path = results / "results.parquet"
    if not table_path.is_file():
        raise ReportError(f"{table_path} does not exist: run `fedcvr experiment CONFIG --out {results}` first.")
    table = pd.read_parquet(table_path)
    if table.empty:
        raise ReportError(f"{table_path} holds no finished run: run the experiment (again) first.")
    meta_path = results / "experiment.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return table, meta


def _eps_x(epsilon: float | None, top: float) -> float:
    return top if epsilon is None or (isinstance(epsilon, float) and math.isnan(epsilon)) else float(epsilon)


def final_metric(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean and std over seeds of a final test metric (all merchants) per setting and ε."""
    rows = table[(table.split == "test") & (table.merchant == "all") & (table.metric == metric)].copy()
    rows["eps"] = rows["epsilon"].map(lambda e: NO_DP if e is None or pd.isna(e) else f"{e:g}")
    grouped = rows.groupby(["setting", "eps"], sort=False)["value"]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    out["epsilon"] = out["eps"].map(lambda e: None if e == NO_DP else float(e))
    return out


def ordering(curve: pd.DataFrame) -> dict[str, bool]:
    """Per setting: does the mean never fall as ε grows (no DP counted as the largest)?"""
    out = {}
    for setting, rows in curve.groupby("setting"):
        if setting == "centralized" or len(rows) < 2:
            continue
        rows = rows.assign(x=rows["epsilon"].map(lambda e: math.inf if e is None else e)).sort_values("x")
        out[str(setting)] = bool(np.all(np.diff(rows["mean"].to_numpy()) >= -1e-9))
    return out


def plot_privacy_utility(table: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    eps = sorted({float(e) for e in table["epsilon"].dropna().unique()})
    top = (max(eps) * 4) if eps else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, metric, label in zip(axes, ("ctcvr.auc", "ndcg@10"), ("test CTCVR AUC", "test NDCG@10"), strict=True):
        curve = final_metric(table, metric)
        for setting in SETTING_ORDER:
            rows = curve[curve.setting == setting]
            if rows.empty:
                continue
            if setting == "centralized":
                axis.axhline(rows["mean"].mean(), color="black", linestyle="--", label="centralized (no DP)")
                continue
            rows = rows.assign(x=rows["epsilon"].map(lambda e: _eps_x(e, top))).sort_values("x")
            axis.errorbar(rows["x"], rows["mean"], yerr=rows["std"].fillna(0.0), marker="o", capsize=3,
                          label=setting, color=COLOR.get(setting))
        axis.set_xscale("log")
        ticks = [*eps, top]
        axis.set_xticks(ticks)
        axis.set_xticklabels([f"{e:g}" for e in eps] + [NO_DP])
        axis.minorticks_off()
        axis.set_xlabel("privacy budget ε of the whole run, per merchant (at its δ)")
        axis.set_ylabel(f"{label} (mean ± std over seeds)")
        axis.grid(alpha=0.3)
    for axis in axes:
        axis.legend(loc="best")
    fig.suptitle("Privacy-utility: conversion quality against ε")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_convergence(table: pd.DataFrame, path: Path) -> bool:
    import matplotlib.pyplot as plt

    rows = table[(table.split == "validation") & (table.metric == "ctcvr.auc") & (table.merchant == "all")].copy()
    if rows.empty:
        return False
    rows["eps"] = rows["epsilon"].map(lambda e: NO_DP if e is None or pd.isna(e) else f"{e:g}")
    panels = sorted(rows["eps"].unique(), key=lambda e: math.inf if e == NO_DP else float(e))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True)
    for axis, eps in zip(axes[0], panels, strict=True):
        for setting, group in rows[rows.eps == eps].groupby("setting"):
            mean = group.groupby("round")["value"].mean()
            axis.plot(mean.index, mean.to_numpy(), marker="o", label=str(setting), color=COLOR.get(str(setting)))
        axis.set_title(f"ε = {eps}")
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation CTCVR AUC (mean over seeds)")
    axes[0][0].legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def merchant_gains(table: pd.DataFrame) -> pd.DataFrame:
    """Per federated run and merchant: federated minus local-only test CTCVR AUC (same ε and seed)."""
    test = table[(table.split == "test") & (table.merchant != "all")]
    auc = test[test.metric == "ctcvr.auc"]
    size = test[test.metric == "train-examples"].groupby("merchant")["value"].max()
    alone = auc[auc.setting == "local-only"].set_index(["epsilon", "seed", "merchant"])["value"]
    rows = []
    for _, row in auc[auc.setting != "local-only"].iterrows():
        key = (row["epsilon"], row["seed"], row["merchant"])
        match = alone[[k == key or (pd.isna(k[0]) and pd.isna(key[0]) and k[1:] == key[1:])
                       for k in alone.index]]
        if len(match):
            rows.append({"setting": row["setting"], "epsilon": row["epsilon"], "seed": row["seed"],
                         "merchant": row["merchant"], "train_examples": size.get(row["merchant"], np.nan),
                         "gain": row["value"] - match.iloc[0]})
    return pd.DataFrame(rows, columns=["setting", "epsilon", "seed", "merchant", "train_examples", "gain"])


def plot_merchant_gain(gains: pd.DataFrame, path: Path) -> bool:
    import matplotlib.pyplot as plt

    if gains.empty:
        return False
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for setting, group in gains.groupby("setting"):
        mean = group.groupby("merchant").agg(gain=("gain", "mean"), size=("train_examples", "first"))
        axis.scatter(mean["size"], mean["gain"], label=str(setting), s=40, color=COLOR.get(str(setting)))
    axis.axhline(0.0, color="grey", linewidth=1)
    axis.set_xscale("log")
    axis.set_xlabel("merchant's training examples")
    axis.set_ylabel("test CTCVR AUC: federated − alone\n(mean over ε and seeds)")
    axis.set_title("Who gains from federating?")
    axis.grid(alpha=0.3)
    axis.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def cost_table(table: pd.DataFrame) -> pd.DataFrame:
    rows = table[(table.split == "validation") & (table.merchant == "all") &
                 table.metric.isin(["bytes-sent", "bytes-received", "seconds"])]
    if rows.empty:
        return pd.DataFrame(columns=["setting", "MB sent / round", "MB received / round", "s / round"])
    wide = rows.pivot_table(index="setting", columns="metric", values="value", aggfunc="mean")
    return pd.DataFrame({"setting": wide.index, "MB sent / round": wide.get("bytes-sent", np.nan) / 1e6,
                         "MB received / round": wide.get("bytes-received", np.nan) / 1e6,
                         "s / round": wide.get("seconds", np.nan)}).reset_index(drop=True)


def plot_cost(costs: pd.DataFrame, path: Path) -> bool:
    import matplotlib.pyplot as plt

    if costs.empty:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(costs["setting"], costs["MB sent / round"], label="sent")
    axes[0].bar(costs["setting"], costs["MB received / round"], bottom=costs["MB sent / round"], label="received")
    axes[0].set_ylabel("MB per round (10^6 bytes)")
    axes[0].legend()
    axes[1].bar(costs["setting"], costs["s / round"], color="tab:green")
    axes[1].set_ylabel("wall time per round (s)")
    for axis in axes:
        axis.grid(alpha=0.3, axis="y")
    fig.suptitle("Communication and time per round (mean over ε and seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    cells = frame.copy()
    for column in cells.columns:
        if pd.api.types.is_float_dtype(cells[column]):
            cells[column] = cells[column].map(lambda v: "" if pd.isna(v) else f"{v:.{digits}f}")
    lines = ["| " + " | ".join(map(str, cells.columns)) + " |", "|" + " --- |" * len(cells.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def _planned(meta: dict, finished: int) -> str:
    """' of N planned' from the grid's description (empty when unknown), and a warning while runs are missing."""
    settings, epsilons, seeds = meta.get("settings"), meta.get("epsilons"), meta.get("seeds")
    if not settings or not epsilons or not seeds:
        return ""
    per_seed = len(epsilons) * len([s for s in settings if s != "centralized"]) + ("centralized" in settings)
    planned = per_seed * len(seeds)
    missing = " (PARTLY RUN: the command below finishes it; finished runs are kept)" if finished < planned else ""
    return f" of {planned} planned{missing}"


def _shown(path: str | Path) -> str:
    """A path as a user in the working directory would type it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_report(results: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    table, meta = load(results)
    plot_privacy_utility(table, results / "privacy_utility.png")
    has_convergence = plot_convergence(table, results / "convergence.png")
    gains = merchant_gains(table)
    has_gain = plot_merchant_gain(gains, results / "merchant_gain.png")
    costs = cost_table(table)
    has_cost = plot_cost(costs, results / "cost.png")
    auc, ndcg = final_metric(table, "ctcvr.auc"), final_metric(table, "ndcg@10")
    summary = auc[["setting", "eps", "mean", "std", "count"]].rename(
        columns={"eps": "ε", "mean": "CTCVR AUC", "std": "± std", "count": "seeds"})
    summary = summary.merge(ndcg[["setting", "eps", "mean"]].rename(columns={"eps": "ε", "mean": "NDCG@10"}),
                            on=["setting", "ε"], how="left")
    checks = ordering(auc)
    wall = table[table.metric == "wall-seconds"]["value"].sum()
    sessions = meta.get("sessions", [])
    machine = sessions[-1]["machine"] if sessions else {}
    lines = [
        f"# Experiment report: {meta.get('name', table['experiment'].iloc[0])}", "",
        f"- data: {meta.get('data', '?')} ({_shown(meta.get('data_root', ''))}); settings: "
        f"{', '.join(meta.get('settings', sorted(table.setting.unique())))}; ε: "
        f"{', '.join(map(str, meta.get('epsilons', [])))}; seeds: "
        f"{meta.get('seeds', sorted(int(s) for s in table.seed.unique()))}; "
        f"rounds: {meta.get('rounds', '?')}; run config overrides: {meta.get('run_config', {})}",
        f"- runs finished: {table.run_id.nunique()}{_planned(meta, table.run_id.nunique())}; total wall time of "
        f"the runs: {wall / 60:.1f} min",
        f"- machine: {machine.get('platform', '?')}, {machine.get('cpus', '?')} CPUs, torch "
        f"{machine.get('torch', '?')}, CUDA: {machine.get('cuda') or 'none'}",
        f"- regenerate: `fedcvr experiment {_shown(meta.get('config') or 'CONFIG')} --out {_shown(results)}` then "
        f"`fedcvr report {_shown(results)}`", "",
        "## Privacy-utility", "", "![privacy-utility](privacy_utility.png)", "",
        "Test metrics of the final model over all merchants' test splits (pooled sums); mean and standard deviation "
        "over seeds.", "", _markdown(summary), "",
    ]
    for setting, monotone in checks.items():
        if monotone:
            lines.append(f"- {setting}: more ε never lowered the mean test CTCVR AUC (the expected ordering).")
        else:
            lines.append(f"- {setting}: NOT monotone in ε: the mean test CTCVR AUC falls somewhere as ε grows. Where "
                         "the fall is smaller than the spread over seeds (± std) it is noise, not an effect; more "
                         "seeds would tell.")
    if has_convergence:
        lines += ["", "## Convergence", "", "![convergence](convergence.png)"]
    if has_gain:
        per = gains.groupby("merchant").agg(train_examples=("train_examples", "first"), gain=("gain", "mean"))
        per["train_examples"] = per["train_examples"].astype(int)
        lines += ["", "## Who gains from federating", "", "![merchant gain](merchant_gain.png)", "",
                  _markdown(per.sort_values("train_examples").reset_index())]
    if has_cost:
        lines += ["", "## Cost per round", "", "![cost](cost.png)", "", _markdown(costs, 2)]
    path = results / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
