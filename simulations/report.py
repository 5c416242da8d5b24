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

from fedcvr.simulations.basket_report import next_basket_lines
from fedcvr.simulations.experiment_config import LOCAL_SUFFIX
from fedcvr.simulations.heterogeneity import overlap_of_results
from fedcvr.simulations.report_audit import audit_lines, audit_table
from fedcvr.simulations.report_basics import NO_DP, SETTING_ORDER, _eps_label, _markdown, final_metric
from fedcvr.simulations.report_cost import _planned, busy_runs, cost_table, machines
from fedcvr.simulations.report_plots import (
    plot_convergence,
    plot_cost,
    plot_merchant_gain,
    plot_privacy_utility,
)


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


def delta_ranges(table: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Per (setting, ε label) of the DP runs: the smallest and largest δ of the merchants' guarantees."""
    rows = table[(table.metric == "delta") & (table.merchant != "all")].copy()
    rows["eps"] = rows["epsilon"].map(lambda e: NO_DP if e is None or pd.isna(e) else f"{e:g}")
    out = {}
    for (setting, eps), group in rows.groupby(["setting", "eps"]):
        low, high = group["value"].min(), group["value"].max()
        out[(str(setting), str(eps))] = f"{low:.1e}" if low == high else f"{low:.1e} – {high:.1e}"
    return out


def largest_falls(curve: pd.DataFrame) -> dict[str, tuple[str, str, float, float] | None]:
    """Per setting: the largest fall of the mean as ε grows, as (from ε, to ε, fall, the larger std of the two
    points, NaN with one seed), or None when the mean never falls (no DP counted as the largest ε)."""
    out: dict[str, tuple[str, str, float, float] | None] = {}
    for setting, rows in curve.groupby("setting"):
        if setting == "centralized" or len(rows) < 2:
            continue
        rows = rows.assign(x=rows["epsilon"].map(lambda e: math.inf if e is None else e)).sort_values("x")
        means, stds, labels = rows["mean"].to_numpy(), rows["std"].to_numpy(), rows["eps"].tolist()
        steps = np.diff(means)
        k = int(np.argmin(steps))
        out[str(setting)] = None if steps[k] >= -1e-9 else (
            labels[k], labels[k + 1], float(-steps[k]), float(np.nanmax(stds[k:k + 2])) if
            np.isfinite(stds[k:k + 2]).any() else float("nan"))
    return out


def ordering_lines(curve: pd.DataFrame, label: str) -> list[str]:
    """Report lines: per setting, whether more ε never lowered `label`, and if it did, where, by how much and
    against what spread over seeds."""
    lines = []
    for setting, fall in largest_falls(curve).items():
        if fall is None:
            lines.append(f"- {setting}: more ε never lowered the mean {label} (the expected ordering).")
            continue
        low, high, size, spread = fall
        name = lambda e: NO_DP if e == NO_DP else f"ε {e}"  # noqa: E731
        if np.isfinite(spread) and size <= spread:
            why = f"smaller than the spread over seeds (std up to {spread:.4f}): noise, not an effect"
        elif np.isfinite(spread):
            why = f"larger than the spread over seeds (std up to {spread:.4f}): more seeds would tell if it holds"
        else:
            why = "one seed so far, so the spread is unknown: more seeds would tell"
        lines.append(f"- {setting}: NOT monotone in ε: the mean {label} falls by {size:.4f} from {name(low)} to "
                     f"{name(high)}; {why}.")
    return lines


def merchant_gains(table: pd.DataFrame) -> pd.DataFrame:
    """Per federated run and merchant: federated minus local-only test CTCVR AUC (same ε and seed); global + local
    ('SETTING + local') against the merchant's lone model with its own local layers ('local-only + local')."""
    test = table[(table.split == "test") & (table.merchant != "all")]
    auc = test[test.metric == "ctcvr.auc"]
    size = test[test.metric == "train-examples"].groupby("merchant")["value"].max()
    rows = []
    for _, row in auc[~auc.setting.str.startswith("local-only")].iterrows():
        suffix = LOCAL_SUFFIX if str(row["setting"]).endswith(LOCAL_SUFFIX) else ""
        alone = auc[auc.setting == "local-only" + suffix].set_index(["epsilon", "seed", "merchant"])["value"]
        key = (row["epsilon"], row["seed"], row["merchant"])
        match = alone[[k == key or (pd.isna(k[0]) and pd.isna(key[0]) and k[1:] == key[1:])
                       for k in alone.index]]
        if len(match):
            rows.append({"setting": row["setting"], "epsilon": row["epsilon"], "seed": row["seed"],
                         "merchant": row["merchant"], "train_examples": size.get(row["merchant"], np.nan),
                         "gain": row["value"] - match.iloc[0]})
    return pd.DataFrame(rows, columns=["setting", "epsilon", "seed", "merchant", "train_examples", "gain"])


def finished_runs(table: pd.DataFrame) -> int:
    """Runs in the table: global + local rows ('SETTING + local') belong to their setting's run."""
    return int(table.loc[~table.setting.str.endswith(LOCAL_SUFFIX), "run_id"].nunique())


def gain_tables(gains: pd.DataFrame, setting: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per merchant (smallest first): the mean gain of each federated setting over ε and seeds; and the mean gain
    of `setting` at each ε over seeds (no DP first, then ε from large to small)."""
    sizes = gains.groupby("merchant")["train_examples"].first()
    by_setting = gains.pivot_table(index="merchant", columns="setting", values="gain", aggfunc="mean")
    by_setting = by_setting[[s for base in SETTING_ORDER for s in (base, base + LOCAL_SUFFIX)
                             if s in by_setting.columns]]
    order = sorted({None if pd.isna(e) else float(e) for e in gains["epsilon"]},
                   key=lambda e: -math.inf if e is None else -e)
    labelled = gains[gains.setting == setting].assign(eps=lambda g: g["epsilon"].map(_eps_label))
    by_eps = labelled.pivot_table(index="merchant", columns="eps", values="gain", aggfunc="mean")
    by_eps = by_eps[[_eps_label(e) for e in order if _eps_label(e) in by_eps.columns]]
    out = []
    for wide in (by_setting, by_eps):
        wide = wide.copy()
        wide.columns = [str(c) for c in wide.columns]
        wide.insert(0, "training examples", sizes.reindex(wide.index).astype(int))
        out.append(wide.sort_values("training examples").reset_index())
    return out[0], out[1]


def _eps_order(labels) -> list[str]:
    """ε labels with no DP first, then from the largest ε to the smallest."""
    return sorted(set(labels), key=lambda e: -math.inf if e == NO_DP else -float(e))


def findings(auc: pd.DataFrame, gains: pd.DataFrame, overlap: pd.DataFrame | None = None) -> list[str]:
    """The report's answers in numbers, each from the tables below it: what privacy costs each setting, whether
    federating beats each merchant training alone, whether the small merchants gain most and (with the clients'
    overlap, `heterogeneity.client_overlap`) whether the merchants most like the others gain most."""
    curve = auc[auc.setting != "centralized"]
    name = lambda e: NO_DP if e == NO_DP else f"ε {e}"  # noqa: E731
    lines = []
    costs = []
    for setting in [s for s in SETTING_ORDER if s in set(curve.setting)]:
        rows = curve[curve.setting == setting].set_index("eps")["mean"]
        budgets = [e for e in _eps_order(rows.index) if e != NO_DP]
        if NO_DP not in rows.index or not budgets:
            continue
        base = rows[NO_DP]
        ends = dict.fromkeys([budgets[0], budgets[-1]])
        costs.append(f"{setting} {base:.4f} without DP, " + ", ".join(
            f"{rows[e]:.4f} at {name(e)} ({rows[e] - base:+.4f})" for e in ends))
    if costs:
        lines.append("- What privacy costs (test CTCVR AUC, mean over seeds): " + "; ".join(costs) + ".")
    central = auc[auc.setting == "centralized"]["mean"]
    plain = curve[(curve.eps == NO_DP) & curve.setting.isin(SETTING_ORDER[2:])]
    if len(central) and len(plain):
        best = plain.loc[plain["mean"].idxmax()]
        lines.append(f"- Centralized training on the union of the data (no DP, no federation; the upper line): "
                     f"{central.iloc[0]:.4f}; the best federated setting without DP, {best['setting']}, reaches "
                     f"{best['mean']:.4f} ({best['mean'] / central.iloc[0]:.1%} of it).")
    federated = curve[curve.setting.isin([s for s in SETTING_ORDER[2:]])]
    alone = curve[curve.setting == "local-only"].set_index("eps")["mean"]
    versus = []
    for eps in _eps_order(federated["eps"]):
        cell = federated[federated.eps == eps]
        if eps not in alone.index or cell.empty:
            continue
        best = cell.loc[cell["mean"].idxmax()]
        versus.append(f"{name(eps)} {best['mean'] - alone[eps]:+.4f} ({best['setting']})")
    if versus:
        lines.append("- Federated against each merchant alone (test CTCVR AUC over all merchants' test splits, the "
                     "best federated setting minus local-only): " + ", ".join(versus) + ".")
    if not gains.empty:
        per_merchant = gains.groupby("merchant").agg(size=("train_examples", "first"), gain=("gain", "mean"))
        per_merchant = per_merchant.sort_values("size")
        if len(per_merchant) >= 3:
            rho = float(per_merchant["size"].rank().corr(per_merchant["gain"].rank()))
            small, large = per_merchant.iloc[0], per_merchant.iloc[-1]
            verdict = ("the smaller the merchant, the more it gains" if rho <= -0.5 else
                       "the larger the merchant, the more it gains" if rho >= 0.5 else
                       "no clear relation between a merchant's size and its gain")
            lines.append(
                f"- Who gains (federated minus alone, per merchant, mean over the federated settings, ε and seeds): "
                f"{verdict} (rank correlation of training examples and gain {rho:+.2f} over {len(per_merchant)} "
                f"merchants); the smallest, {small.name} ({int(small['size']):,} training examples), "
                f"{small['gain']:+.4f}; the largest, {large.name} ({int(large['size']):,}), {large['gain']:+.4f}.")
    if not gains.empty and overlap is not None:
        lines += alike_lines(gains, overlap)
    if lines and (auc["count"] < 2).any():
        lines.append("- Some of these cells have one seed so far: their spread is unknown.")
    return lines


def data_mismatch(table: pd.DataFrame) -> list[str]:
    """The runs of a grid must all have seen the same data. A merchant whose training examples differ between runs
    had other data in some of them (a re-import, another cut): one line naming the merchants and runs, else none."""
    sizes = table[(table.metric == "train-examples") & (table.merchant != "all")]
    found = []
    for merchant, group in sizes.groupby("merchant", sort=True):
        runs = group.groupby("value")["run_id"].agg(lambda ids: sorted(set(ids)))
        if len(runs) > 1:
            found.append(f"{merchant}: " + "; ".join(
                f"{int(value):,} training examples in {len(ids)} run(s) ({', '.join(ids[:2])}"
                f"{', ...' if len(ids) > 2 else ''})" for value, ids in runs.items()))
    if not found:
        return []
    return ["- THE RUNS DID NOT ALL SEE THE SAME DATA, so their comparisons below are not sound: " + " | ".join(found)
            + ". Rerun the grid into a new folder (or delete its runs) so that every run reads one version of the "
            "data."]


def alike_lines(gains: pd.DataFrame, overlap: pd.DataFrame) -> list[str]:
    """Whether the merchants whose best sellers are also the others' gain most from federating (rank correlation
    over the merchants of their best sellers shared and their mean gain); nothing where it is undefined."""
    top = overlap.attrs.get("top", "N")
    shared = overlap.set_index("merchant")["best sellers shared"].astype(float)
    per_merchant = gains.groupby("merchant").agg(gain=("gain", "mean"), size=("train_examples", "first"))
    per_merchant = per_merchant.join(shared, how="inner").dropna(subset=["gain", "best sellers shared"])
    if len(per_merchant) < 3 or per_merchant["best sellers shared"].nunique() < 2:
        return []
    rho = float(per_merchant["best sellers shared"].rank().corr(per_merchant["gain"].rank()))
    tied = float(per_merchant["best sellers shared"].rank().corr(per_merchant["size"].rank()))
    verdict = ("the more a merchant's best sellers are also the others', the more it gains" if rho >= 0.5 else
               "the less a merchant's best sellers are also the others', the more it gains" if rho <= -0.5 else
               "no clear relation between how far a merchant's best sellers are the others' and its gain")
    ordered = per_merchant.sort_values("best sellers shared")
    least, most = ordered.iloc[0], ordered.iloc[-1]
    return [f"- Who gains, by how alike the merchants are (best sellers shared: the mean share of a merchant's "
            f"top {top} items by purchases that are also in another merchant's top {top}; gain as above): "
            f"{verdict} (rank correlation {rho:+.2f} over {len(per_merchant)} merchants); the least alike, "
            f"{least.name} ({least['best sellers shared']:.1%} shared), {least['gain']:+.4f}; the most alike, "
            f"{most.name} ({most['best sellers shared']:.1%}), {most['gain']:+.4f}."
            + (f" Here size and alikeness go together (rank correlation {tied:+.2f}): these merchants cannot tell "
               "the two apart." if abs(tied) >= 0.5 else "")]


def merchant_table(table: pd.DataFrame, overlap: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per merchant (largest first): its training examples and its test CTCVR AUC alone, without DP (mean over
    seeds), as the data the federation is made of; with `overlap`, also its catalog and how much of it and of its
    best sellers the other merchants share."""
    test = table[(table.split == "test") & (table.merchant != "all")]
    size = test[test.metric == "train-examples"].groupby("merchant")["value"].max()
    alone = test[(test.setting == "local-only") & test.epsilon.isna() & (test.metric == "ctcvr.auc")]
    out = pd.DataFrame({"training examples": size.astype(int)})
    out["share of all"] = out["training examples"] / out["training examples"].sum()
    out["CTCVR AUC alone (no DP)"] = alone.groupby("merchant")["value"].mean().reindex(out.index)
    if overlap is not None and not overlap.empty:
        columns = ["catalog items", "catalog shared", "catalog Jaccard", "best sellers shared"]
        out = out.join(overlap.set_index("merchant")[columns])
        out["catalog items"] = out["catalog items"].astype("Int64")
    return out.sort_values("training examples", ascending=False).reset_index()


def _shown(path: str | Path) -> str:
    """A path as a user in the working directory would type it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def refresh_table(results: Path) -> bool:
    """Collect the finished runs into the tidy table again (an interrupted grid has not written it since its last
    runs), when `experiment.json` names a config that can still be read; True when it did."""
    from fedcvr.simulations.experiment import write_table
    from fedcvr.simulations.experiment_config import Experiment, ExperimentError

    meta_path = results / "experiment.json"
    if not meta_path.is_file() or not (results / "runs").is_dir():
        return False
    config = json.loads(meta_path.read_text()).get("config")
    if not config or not Path(config).is_file():
        return False
    try:
        write_table(Experiment.from_toml(Path(config)), results)
    except ExperimentError:
        return False
    return True


def write_report(results: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    refresh_table(results)
    table, meta = load(results)
    plot_privacy_utility(table, results / "privacy_utility.png")
    has_convergence = plot_convergence(table, results / "convergence.png")
    gains = merchant_gains(table)
    has_gain = plot_merchant_gain(gains, results / "merchant_gain.png")
    costs = cost_table(table, busy_runs(results, table))
    has_cost = plot_cost(costs, results / "cost.png")
    auc, ndcg = final_metric(table, "ctcvr.auc"), final_metric(table, "ndcg@10")
    summary = auc[["setting", "eps", "mean", "std", "count"]].rename(
        columns={"eps": "ε", "mean": "CTCVR AUC", "std": "± std", "count": "seeds"})
    summary = summary.merge(ndcg[["setting", "eps", "mean"]].rename(columns={"eps": "ε", "mean": "NDCG@10"}),
                            on=["setting", "ε"], how="left")
    basket = final_metric(table, "nb.all.ndcg@10")
    if not basket.empty:  # purchase logs: each shopper's next basket (section "Next basket" below)
        summary = summary.drop(columns=["NDCG@10"]).merge(
            basket[["setting", "eps", "mean"]].rename(columns={"eps": "ε", "mean": "next-basket NDCG@10"}),
            on=["setting", "ε"], how="left")
    deltas = delta_ranges(table)
    summary["δ per merchant"] = [deltas.get((row.setting, row.ε), "") for row in summary.itertuples()]
    wall = table[table.metric == "wall-seconds"]["value"].sum()
    cuts = [f"{key.replace('_', '-')} = {meta[key]}" for key in ("min_shoppers", "max_shoppers") if meta.get(key)]
    if meta.get("partition") == "dirichlet":
        cuts.append(f"Dirichlet re-partition by category, alpha = {meta.get('alpha')}, {meta.get('clients')} clients")
    lines = [
        f"# Experiment report: {meta.get('name', table['experiment'].iloc[0])}", "",
        f"- data: {meta.get('data', '?')} ({_shown(meta.get('data_root', ''))})"
        f"{'; ' + ', '.join(cuts) if cuts else ''}; settings: "
        f"{', '.join(meta.get('settings', sorted(table.setting.unique())))}; ε: "
        f"{', '.join(map(str, meta.get('epsilons', [])))}; seeds: "
        f"{meta.get('seeds', sorted(int(s) for s in table.seed.unique()))}; "
        f"rounds: {meta.get('rounds', '?')}; run config overrides: {meta.get('run_config', {})}",
        f"- runs finished: {finished_runs(table)}{_planned(meta, finished_runs(table))}; total wall time of "
        f"the runs: {wall / 60:.1f} min",
        *machines(results, table, meta),
        *data_mismatch(table),
        f"- regenerate: `fedcvr experiment {_shown(meta.get('config') or 'CONFIG')} --out {_shown(results)}` "
        f"(runs what is missing, then writes this report; `fedcvr report {_shown(results)}` rewrites the report "
        f"alone)", "",
    ]
    overlap = overlap_of_results(results, meta.get("data_root"))
    answers = findings(auc, gains, overlap)
    if answers:
        lines += ["## Findings", "", *answers, ""]
    merchants = merchant_table(table, overlap)
    if not merchants.empty:
        lines += ["## Clients", "", "One client per merchant folder; training examples = the training split of "
                  "its examples (split by time, the oldest part)."]
        if overlap is not None:
            lines.append("")
            top = overlap.attrs.get("top", "N")
            lines += ["How alike the clients are (items are the same where their item ids are; "
                      "simulations/heterogeneity.py): catalog shared = the share of its catalog that some other "
                      "merchant also sells; catalog Jaccard = |own ∩ other| / |own ∪ other| of the catalogs, mean "
                      f"over the other merchants; best sellers shared = |own top {top} ∩ other's top {top}| / {top} "
                      f"of the items by purchases, mean over the other merchants."]
        lines += ["", _markdown(merchants), ""]
    lines += [
        "## Privacy-utility", "", "![privacy-utility](privacy_utility.png)", "",
        "Test metrics of the final model over all merchants' test splits (metric sums pooled over merchants, then "
        "the ratio); mean and standard deviation over seeds. Local-only scores each merchant's own model on its own "
        "test split; the federated settings score the one global model on every merchant's test split. ε is the "
        "budget of the whole run per merchant, at that merchant's δ (smallest and largest δ over the merchants in the "
        "last column).", "",
        _markdown(summary), "",
    ]
    lines += ordering_lines(auc, "test CTCVR AUC") + ordering_lines(ndcg, "test NDCG@10")
    lines += next_basket_lines(table)
    if has_convergence:
        lines += ["", "## Convergence", "", "![convergence](convergence.png)"]
    if has_gain:
        federated = auc[auc.setting.isin(gains.setting.unique())]
        best = str(federated.groupby("setting")["mean"].mean().idxmax())
        by_setting, by_eps = gain_tables(gains, best)
        lines += ["", "## Who gains from federating", "", "![merchant gain](merchant_gain.png)", "",
                  "Gain = a merchant's test CTCVR AUC under the federated model minus under its own model trained "
                  "alone, same ε and seed; positive = federating helped it. Per federated setting, mean over ε and "
                  "seeds:", "", _markdown(by_setting), "",
                  f"Per ε for {best} (the federated setting with the best mean test CTCVR AUC over the grid), "
                  "mean over seeds:", "", _markdown(by_eps)]
    if has_cost:
        lines += ["", "## Cost per round", "", "![cost](cost.png)", "",
                  "MB: bytes of model weights the coordinator sent to and received from all nodes in a round "
                  "(10^6 bytes), mean over rounds and seeds. s / round: wall time of a round (training, aggregation, "
                  "evaluation), mean over rounds and the runs in `timed`: those that had the machine to themselves "
                  "where there are any.", "", _markdown(costs, 2)]
    audits = audit_table(table)
    if not audits.empty:
        lines += audit_lines(audits, meta.get("audit_run_config"))
    path = results / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
