"""The experiment report's plots (PNG, matplotlib): privacy-utility, convergence, who gains, cost."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from fedcvr.simulations.report_basics import NO_DP, SETTING_ORDER, final_metric

COLOR = {"centralized": "black", "local-only": "tab:blue", "fedavg": "tab:orange", "fedprox": "tab:green",
         "fedadam": "tab:red"}  # the same colour for a setting in every plot


def _eps_x(epsilon: float | None, top: float) -> float:
    return top if epsilon is None or (isinstance(epsilon, float) and math.isnan(epsilon)) else float(epsilon)


def plot_privacy_utility(table: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    eps = sorted({float(e) for e in table["epsilon"].dropna().unique()})
    top = (max(eps) * 4) if eps else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # purchase logs rank each shopper's next basket (with the baselines as lines); impression logs each purchase
    basket = not final_metric(table, "nb.all.ndcg@10").empty
    ranking = ("nb.all.ndcg@10", "next-basket NDCG@10") if basket else ("ndcg@10", "test NDCG@10")
    for axis, metric, label in zip(axes, ("ctcvr.auc", ranking[0]), ("test CTCVR AUC", ranking[1]), strict=True):
        curve = final_metric(table, metric)
        if metric.startswith("nb."):
            _baseline_lines(axis, curve)
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
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle("Privacy-utility: conversion quality against ε")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _baseline_lines(axis, curve: pd.DataFrame) -> None:
    """The best baseline of each scope as a dotted line, labelled on the axis (its legend is the models')."""
    from fedcvr.shared.evaluation import BASELINES

    rows = curve[curve.setting.map(lambda s: s.split(" (", 1)[0] in BASELINES)]
    for scope, style, offset in (("pooled", ":", 2), ("local", "-.", -9)):  # one label above, one below
        mine = rows[rows.setting.str.endswith(f"({scope})")]
        if mine.empty:
            continue
        best = mine.loc[mine["mean"].idxmax()]
        axis.axhline(best["mean"], color="grey", linestyle=style, linewidth=1)
        axis.annotate(f"best baseline: {best.setting} {best['mean']:.3f}", (0.01, best["mean"]),
                      xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(0, offset), fontsize=7,
                      color="grey")


def plot_convergence(table: pd.DataFrame, path: Path) -> bool:
    import matplotlib.pyplot as plt

    rows = table[(table.split == "validation") & (table.metric == "ctcvr.auc") & (table.merchant == "all")].copy()
    if rows.empty:
        return False
    rows["eps"] = rows["epsilon"].map(lambda e: NO_DP if e is None or pd.isna(e) else f"{e:g}")
    panels = sorted(rows["eps"].unique(), key=lambda e: math.inf if e == NO_DP else float(e))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True)
    from matplotlib.ticker import MaxNLocator

    for axis, eps in zip(axes[0], panels, strict=True):
        panel = rows[rows.eps == eps]
        for setting in [s for s in SETTING_ORDER if s in set(panel.setting)]:
            mean = panel[panel.setting == setting].groupby("round")["value"].mean()
            axis.plot(mean.index, mean.to_numpy(), marker="o", label=setting, color=COLOR.get(setting))
        axis.set_title(NO_DP if eps == NO_DP else f"ε = {eps}")
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation CTCVR AUC (mean over seeds)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), frameon=False)
    fig.suptitle("Convergence: validation CTCVR AUC of the global model after each round")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_merchant_gain(gains: pd.DataFrame, path: Path) -> bool:
    import matplotlib.pyplot as plt

    if gains.empty:
        return False
    fig, axis = plt.subplots(figsize=(7, 4.5))
    means = gains.groupby(["merchant", "setting"]).agg(gain=("gain", "mean"), size=("train_examples", "first"))
    for setting in [s for s in SETTING_ORDER if s in set(gains.setting)]:
        mean = means.xs(setting, level="setting")
        axis.scatter(mean["size"], mean["gain"], label=setting, s=40, color=COLOR.get(setting))
    merchants = means.groupby("merchant").agg(top=("gain", "max"), bottom=("gain", "min"), size=("size", "first"))
    if len(merchants) <= 12:  # few enough to name each: above its points, or below them for every other one
        for k, (name, point) in enumerate(merchants.sort_values("size").iterrows()):
            above = k % 2 == 0
            axis.annotate(str(name), (point["size"], point["top"] if above else point["bottom"]),
                          textcoords="offset points", xytext=(0, 8 if above else -8), ha="center",
                          va="bottom" if above else "top", fontsize="small", color="dimgrey")
    axis.axhline(0.0, color="grey", linewidth=1)
    axis.set_xscale("log")
    axis.margins(x=0.1, y=0.12)  # room for the names
    axis.set_xlabel("merchant's training examples")
    axis.set_ylabel("test CTCVR AUC: federated − alone\n(mean over ε and seeds)")
    axis.set_title("Who gains from federating?")
    axis.grid(alpha=0.3)
    axis.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_cost(costs: pd.DataFrame, path: Path) -> bool:
    import matplotlib.pyplot as plt

    if costs.empty:
        return False
    settings = list(dict.fromkeys(costs["setting"]))
    budgets = list(dict.fromkeys(costs["ε"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    traffic = costs.groupby("setting", sort=False)[["MB sent / round", "MB received / round"]].mean()
    x = np.arange(len(settings))
    axes[0].bar(x - 0.2, traffic["MB sent / round"], 0.4, label="coordinator → nodes", color="tab:purple")
    axes[0].bar(x + 0.2, traffic["MB received / round"], 0.4, label="nodes → coordinator", color="tab:gray")
    axes[0].set_xticks(x, settings)
    axes[0].set_ylabel("MB per round, all nodes (10^6 bytes)")
    axes[0].set_title("Communication per round")
    axes[0].legend(loc="upper right")
    width = 0.8 / max(1, len(budgets))
    for k, eps in enumerate(budgets):
        part = costs[costs["ε"] == eps].set_index("setting").reindex(settings)
        axes[1].bar(x - 0.4 + width * (k + 0.5), part["s / round"], width,
                    label=NO_DP if eps == NO_DP else f"ε = {eps}", color=plt.cm.viridis(k / max(1, len(budgets))))
    axes[1].set_xticks(x, settings)
    axes[1].set_ylabel("wall time per round (s)")
    axes[1].set_title("Wall time per round (training, aggregation, evaluation)")
    axes[1].legend(loc="upper right", fontsize="small")
    for axis in axes:
        axis.grid(alpha=0.3, axis="y")
        axis.set_ylim(0, axis.get_ylim()[1] * 1.3)  # room for the legend above the bars
    fig.suptitle("Cost per round (means over rounds and seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
