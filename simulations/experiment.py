"""Running an experiment grid (`experiment_config.py`: its settings): settings x privacy budgets x seeds on one data
set, in one process, into a tidy table.

Each run (setting, ε, seed) writes `<out>/runs/<run-id>/result.json`; a run with that file is finished and is
skipped when the grid runs again (an interrupted grid resumes). Federated settings run the app's real ServerApp
and ClientApp logic in this process (`inprocess.py`); local-only trains each merchant alone with the same node
code (`local_only.py`); centralized trains on the union of the merchants (`central.py`; no DP, so it runs once
per seed as the reference line); audit runs attack one merchant's local training (`audit.py`) once per audit
budget and seed. The tidy table `<out>/results.parquet` and `.csv` has one row per run x round x
metric: run_id, setting, epsilon, seed, data, round, split, merchant ("all" or a merchant), metric, value.
With DP, each merchant's row `delta` holds the δ at which its ε holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from fedcvr.shared import flower_app
from fedcvr.shared.evaluation.basket_metrics import METRICS, PREFIX, VARIANTS
from fedcvr.simulations.benchmarks.common import machine
from fedcvr.simulations.experiment_config import (
    AUDIT,
    BASELINE_RUN,
    FEDERATED,
    LOCAL_SUFFIX,
    RESULT,
    Experiment,
    ExperimentError,
    Run,
)
from fedcvr.simulations.experiment_meta import LoadSampler, check_data, data_fingerprint, describe

"""Setting suffix of global + local rows: a run's model after each node personalised its local layers."""
AUDIT_METRICS = ("mia.loss.auc", "mia.loss.tpr@1%fpr", "mia.lr.auc", "mia.lr.tpr@1%fpr", "members", "non-members",
                 "max-epsilon", "delta")
TABLE_COLUMNS = ["run_id", "setting", "epsilon", "seed", "data", "round", "split", "merchant", "metric", "value"]
PER_ROUND = ("ctcvr.auc", "ctcvr.gauc", "click.auc", "ndcg@10", "max-epsilon", "bytes-sent", "bytes-received",
             "client-train-seconds", "client-train-seconds-max", "aggregate-seconds",
             "seconds", "nodes-trained")
NEXT_BASKET = tuple(f"{PREFIX}.{variant}.{metric}{end}" for variant in VARIANTS for metric in METRICS
                    for end in ("", ".lo", ".hi")) + tuple(f"{PREFIX}.{variant}.n" for variant in VARIANTS)
"""Next-basket test metrics of purchase logs, with their bootstrap 95% interval ends (`shared/evaluation`)."""
FINAL = ("ctcvr.auc", "ctcvr.gauc", "click.auc", "ctcvr.logloss", "ndcg@10", "hr@10", *NEXT_BASKET)


def run_config_of(experiment: Experiment, run: Run, data_root: Path, run_dir: Path) -> dict[str, Any]:
    from fedcvr.shared.data.loader import merchant_folders

    extra = experiment.audit_run_config if run.setting == AUDIT else {}
    overrides = {**experiment.run_config, **extra, "data-root": str(data_root), "out-dir": str(run_dir),
                 "num-server-rounds": experiment.rounds, "seed": run.seed, "train.seed": run.seed,
                 "min-nodes": len(merchant_folders(data_root)), "dp.enabled": run.epsilon is not None}
    if run.setting in FEDERATED:
        overrides["strategy"] = run.setting
    if run.epsilon is not None:
        overrides["dp.target-epsilon"] = run.epsilon
    return flower_app.defaults_with("", **overrides)


def _rows(run: Run, data: str, round_: int, split: str, merchant: str, metrics: dict[str, Any],
          keys: tuple[str, ...], setting: str | None = None) -> list[dict[str, Any]]:
    return [{"run_id": run.run_id, "setting": setting or run.setting, "epsilon": run.epsilon, "seed": run.seed,
             "data": data,
             "round": round_, "split": split, "merchant": merchant, "metric": key, "value": float(metrics[key])}
            for key in keys if metrics.get(key) is not None]


def merchant_delta(settings: Any, train_examples: int) -> float | None:
    """The δ of a merchant's guarantee in a run (None without DP): `dp.target-delta`, else the default
    min(1 / (10 x its training examples), 1e-5) (`delta_for`), as its privacy ledger fixes it."""
    from fedcvr.shared.dp_config import delta_for

    if not settings.dp.enabled:
        return None
    return float(settings.dp.target_delta or delta_for(int(train_examples)))


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def round_progress(row: dict[str, Any], rounds: int) -> str:
    """A finished round in a few words: 'round 2/5: validation CTCVR AUC 0.6021, ε 4.21'."""
    parts = [f"round {row.get('round')}/{rounds}"]
    if row.get("ctcvr.auc") is not None:
        parts.append(f"validation CTCVR AUC {float(row['ctcvr.auc']):.4f}")
    if row.get("max-epsilon") is not None:
        parts.append(f"ε {float(row['max-epsilon']):.2f}")
    return parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")


def run_federated(experiment: Experiment, run: Run, run_config: dict[str, Any], folders: list[Path],
                  progress: Progress = _quiet) -> list[dict]:
    import logging

    from fedcvr.client.node import MerchantNode, NodeSettings
    from fedcvr.shared.metrics import merge_evaluations
    from fedcvr.shared.model.folder import load_model_folder
    from fedcvr.shared.model.weights import trainable_state
    from fedcvr.simulations.inprocess import run_federation
    from fedcvr.simulations.local_only import test_metrics

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # the grid shows progress; per-round lines go to rounds.jsonl
    try:
        summary = run_federation(run_config, len(folders),
                                 on_round=lambda row: progress(round_progress(row, experiment.rounds)))
    finally:
        flwr_logger.setLevel(level)
    rows = []
    for record in summary["rounds"]:
        rows += _rows(run, experiment.data, int(record["round"]), "validation", "all", record, PER_ROUND)
    rows += _rows(run, experiment.data, experiment.rounds, "test", "all", summary["test"], FINAL)
    settings = NodeSettings.from_run_config(run_config)
    weights = None
    for index, folder in enumerate(folders, 1):
        # the node's own replies: its training examples and its sums of the final test evaluation
        size = summary.get("train_sizes", {}).get(index - 1)
        sums = summary.get("test_sums", {}).get(index - 1)
        node = MerchantNode(folder, settings) if size is None or sums is None else None
        if size is None:
            size = node.train_size()
        if sums is None:  # the node did not answer it: evaluate the global model here
            progress(f"testing the global model on {folder.name} ({index}/{len(folders)})")
            if weights is None:
                weights = trainable_state(load_model_folder(Path(run_config["out-dir"]) / "model")[0])
            tested = test_metrics(node, weights)
        else:
            tested = merge_evaluations([sums])
        metrics = {**tested, "train-examples": size, "delta": merchant_delta(settings, size)}
        rows += _rows(run, experiment.data, experiment.rounds, "test", folder.name, metrics,
                      (*FINAL, "train-examples", "delta"))
    return rows + _personalised_rows(experiment, run, summary.get("test_personalised", {}),
                                     summary.get("test_personalised_sums", {}), folders)


def _personalised_rows(experiment: Experiment, run: Run, merged: dict, per_node: dict[int, dict],
                       folders: list[Path]) -> list[dict]:
    """Rows of global + local (setting 'SETTING + local'): the test metrics after each node personalised its
    local layers (run config `personalise`), merged and per merchant; none when the run did not personalise."""
    from fedcvr.shared.metrics import merge_evaluations

    if not merged:
        return []
    local = Run(run.setting + LOCAL_SUFFIX, run.epsilon, run.seed)
    rows = _rows(local, experiment.data, experiment.rounds, "test", "all", merged, FINAL)
    for index, folder in enumerate(folders):
        if index in per_node:
            rows += _rows(local, experiment.data, experiment.rounds, "test", folder.name,
                          merge_evaluations([per_node[index]]), FINAL)
    return rows


def run_local_only(experiment: Experiment, run: Run, run_config: dict[str, Any], folders: list[Path],
                   progress: Progress = _quiet) -> list[dict]:
    from fedcvr.client.node import MerchantNode, NodeSettings
    from fedcvr.shared.metrics import merge_evaluations
    from fedcvr.simulations.local_only import initial_weights, train_alone

    start, settings = initial_weights(run_config), NodeSettings.from_run_config(run_config)
    rows, sums, personal = [], [], {}
    for index, folder in enumerate(folders, 1):
        where = f"{folder.name} alone ({index}/{len(folders)})"
        progress(where)
        node = MerchantNode(folder, settings)
        weights, epsilon = train_alone(node, start,
                                       lambda r, where=where: progress(f"{where}: round {r}/{settings.rounds}"))
        size = len(node.prepared.splits["train"])
        test_sums = node.evaluate(weights, "test")
        sums.append(test_sums)
        metrics = {**merge_evaluations([test_sums]), "train-examples": size, "max-epsilon": epsilon,
                   "delta": merchant_delta(settings, size)}
        rows += _rows(run, experiment.data, experiment.rounds, "test", folder.name, metrics,
                      (*FINAL, "train-examples", "max-epsilon", "delta"))
        if settings.personalise.enabled:  # the lone model with the same local layers as global + local
            personal[index - 1] = node.evaluate(weights, "test", personalised=True)
    rows += _rows(run, experiment.data, experiment.rounds, "test", "all", merge_evaluations(sums), FINAL)
    merged = merge_evaluations(list(personal.values())) if personal else {}
    return rows + _personalised_rows(experiment, run, merged, personal, folders)


def run_centralized(experiment: Experiment, run: Run, run_config: dict[str, Any], data_root: Path) -> list[dict]:
    from fedcvr.client.node import NodeSettings
    from fedcvr.simulations.central import LOCAL, train_central

    settings = NodeSettings.from_run_config(run_config)
    result = train_central(data_root, Path(run_config["out-dir"]) / "model", settings.model, settings.train,
                           settings.examples, personalise_config=settings.personalise)
    test = result.metrics.get("test", {})
    rows = _rows(run, experiment.data, 0, "test", "all", test.get("model", {}), FINAL)
    if LOCAL in test:
        rows += _rows(Run(run.setting + LOCAL_SUFFIX, run.epsilon, run.seed), experiment.data, 0, "test", "all",
                      test[LOCAL], FINAL)
    return rows


def run_baseline_grid(experiment: Experiment, run: Run, run_config: dict[str, Any], folders: list[Path],
                      progress: Progress = _quiet) -> list[dict]:
    """The experiment's `baselines` on the next-basket test: fitted on the pooled purchases (setting
    'NAME (pooled)') and by each merchant alone ('NAME (local)', merged over merchants and per merchant)."""
    from fedcvr.client.node import NodeSettings
    from fedcvr.shared.data.loader import load_merchant
    from fedcvr.shared.evaluation import basket_metrics
    from fedcvr.shared.evaluation.baselines import BaselineConfig
    from fedcvr.shared.evaluation.next_basket import params_text, run_baselines
    from fedcvr.shared.model.encoder import load_backbone
    from fedcvr.shared.training.prepare import prepare

    settings = NodeSettings.from_run_config(run_config)
    config = BaselineConfig.from_run_config(run_config)
    names = list(experiment.baselines)
    backbone = load_backbone(settings.model.encoder) if "text" in names else None
    tokens = settings.model.max_text_tokens
    data = [load_merchant(folder) for folder in folders]
    progress("baselines fitted on the pooled purchases")
    pooled = run_baselines(names, prepare(data, settings.examples), config, "pooled", backbone, tokens,
                           seed=run.seed, progress=progress)
    if not pooled:
        raise ExperimentError(f"{experiment.source}: `baselines` rank next baskets, which need purchase logs (no "
                              "impressions); this data set logs impressions: remove `baselines`")
    rows, merged = [], {name: {} for name in names}
    for result in pooled:
        rows += _rows(run, experiment.data, 0, "test", "all", result.metrics, NEXT_BASKET,
                      f"{result.name} (pooled)")
        setting = {f"param.{key}": float(value) for key, value in result.params.items()}
        rows += _rows(run, experiment.data, 0, "validation", "all", setting, tuple(setting), f"{result.name} (pooled)")
        progress(f"{result.name} (pooled; {params_text(result.params)})")
    for index, merchant in enumerate(data, 1):
        progress(f"baselines of {merchant.name} alone ({index}/{len(data)})")
        for result in run_baselines(names, prepare([merchant], settings.examples), config, "local", backbone,
                                    tokens, seed=run.seed):
            merged[result.name] = basket_metrics.add(merged[result.name], result.sums)
            rows += _rows(run, experiment.data, 0, "test", merchant.name, result.metrics, NEXT_BASKET,
                          f"{result.name} (local)")
    for name, sums in merged.items():
        if sums:
            rows += _rows(run, experiment.data, 0, "test", "all", basket_metrics.finalise(sums), NEXT_BASKET,
                          f"{name} (local)")
    return rows


def audited_folder(experiment: Experiment, folders: list[Path]) -> Path:
    """The merchant folder of the privacy audit: `audit-merchant`, or the first in sorted order."""
    if not experiment.audit_merchant:
        return folders[0]
    for folder in folders:
        if folder.name == experiment.audit_merchant:
            return folder
    raise ExperimentError(f"{experiment.source}: `audit-merchant` = {experiment.audit_merchant!r} is not a merchant "
                          f"of the data set; its merchants are {', '.join(f.name for f in folders)}")


def run_audit(experiment: Experiment, run: Run, run_config: dict[str, Any], folders: list[Path]) -> list[dict]:
    from fedcvr.simulations.audit import audit_merchant

    result = audit_merchant(audited_folder(experiment, folders), run_config, seed=run.seed,
                            max_members=experiment.audit_max_members)
    return _rows(run, experiment.data, experiment.rounds, "train", result.merchant, result.metrics(), AUDIT_METRICS)


def run_grid(experiment: Experiment, out: Path, on_run: Callable[[Run, str], None] | None = None,
             only: set[str] | None = None, on_progress: Callable[[Run, str], None] | None = None) -> pd.DataFrame:
    """Run every run of the grid that has no result yet (of the settings in `only`, when given), then write and
    return the tidy table of every finished run. `on_run` hears of each run starting ("running") and ending
    ("done in N s", "skipped (finished earlier)"); `on_progress` of the rounds and merchants within a run."""
    from fedcvr.shared.data.loader import merchant_folders

    out.mkdir(parents=True, exist_ok=True)
    data_root = experiment.data_root(out)
    folders = merchant_folders(data_root)
    prints = data_fingerprint(folders)
    check_data(out, prints)
    describe(experiment, out, data_root, prints)
    if experiment.audit_epsilons:
        audited_folder(experiment, folders)  # a bad audit-merchant fails before any run
    for run in experiment.runs():
        if only is not None and run.setting not in only:
            continue
        run_dir = out / "runs" / run.run_id
        if (run_dir / RESULT).is_file():
            if on_run:
                on_run(run, "skipped (finished earlier)")
            continue
        if on_run:
            on_run(run, "running")
        run_dir.mkdir(parents=True, exist_ok=True)
        run_config = run_config_of(experiment, run, data_root, run_dir)
        progress = (lambda text, run=run: on_progress(run, text)) if on_progress else _quiet
        started = time.perf_counter()
        with LoadSampler() as load:
            if run.setting in FEDERATED:
                rows = run_federated(experiment, run, run_config, folders, progress)
            elif run.setting == "local-only":
                rows = run_local_only(experiment, run, run_config, folders, progress)
            elif run.setting == AUDIT:
                rows = run_audit(experiment, run, run_config, folders)
            elif run.setting == BASELINE_RUN:
                rows = run_baseline_grid(experiment, run, run_config, folders, progress)
            else:
                rows = run_centralized(experiment, run, run_config, data_root)
        seconds = time.perf_counter() - started
        rows += _rows(run, experiment.data, experiment.rounds, "test", "all", {"wall-seconds": seconds},
                      ("wall-seconds",))
        staging = run_dir / (RESULT + ".tmp")
        staging.write_text(json.dumps({"run": run.run_id, "seconds": seconds, "machine": machine(),
                                       "load": load.summary(), "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                       "rows": rows}) + "\n")
        staging.replace(run_dir / RESULT)  # the run counts as finished only once this file is whole
        if on_run:
            on_run(run, f"done in {seconds:.0f} s")
    return write_table(experiment, out)


def write_table(experiment: Experiment, out: Path) -> pd.DataFrame:
    """Collect the finished runs of the grid into `<out>/results.parquet` and `results.csv`."""
    rows: list[dict] = []
    for run in experiment.runs():
        path = out / "runs" / run.run_id / RESULT
        if path.is_file():
            rows += json.loads(path.read_text())["rows"]
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    table.insert(0, "experiment", experiment.name)
    table.to_parquet(out / "results.parquet", index=False)
    table.to_csv(out / "results.csv", index=False)
    return table
