"""Experiment grids: settings x privacy budgets x seeds on one data set, run in one process, into a tidy table.

An experiment config (TOML, examples in `simulations/experiments/`):

    name = "synthetic-default"
    data = "synthetic"            # "synthetic" (the default marketplace, seed 0), "online-retail:FILE" (imported,
                                  # one client per country), "amazon:FOLDER" (Amazon Reviews: FOLDER holds a
                                  # reviews file and its meta_* file) or a marketplace folder
    settings = ["centralized", "local-only", "fedavg", "fedprox", "fedadam"]
    epsilons = ["none", 8, 4, 2, 1]   # dp.target-epsilon of the whole run; "none" = no DP
    seeds = [0, 1]
    rounds = 5
    partition = "natural"         # or "dirichlet": re-partition by category into `clients` with `alpha`
    min-shoppers = 0              # keep only merchant folders with at least this many shoppers
    max-shoppers = 0              # cut larger folders to a random sample of this many shoppers (0 = keep all)
    audit-epsilons = ["none", 8, 1]  # privacy audit runs (membership inference, `audit.py`); [] = none
    audit-merchant = ""           # the merchant folder audited ("" = the first in sorted order)
    audit-max-members = 2000      # members (and as many non-members) at most
    baselines = ["popularity", "repeat", "item-knn", "als", "text"]  # purchase logs: classic baselines ranked
                                  # beside the model on the next-basket test, pooled and by each merchant alone
    [run-config]                  # any app run config key, e.g. local-epochs = 2
    [audit-run-config]            # run config keys for the audit runs only (on top of [run-config]), e.g. more
                                  # local epochs to give the attacks a model that fits its examples closely

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
import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fedcvr.shared import flower_app
from fedcvr.shared.evaluation import BASELINES
from fedcvr.shared.evaluation.basket_metrics import METRICS, PREFIX, VARIANTS
from fedcvr.shared.flower_app import flatten
from fedcvr.simulations.benchmarks.common import machine

SETTINGS = ("centralized", "local-only", "fedavg", "fedprox", "fedadam")
LOCAL_SUFFIX = " + local"
"""Setting suffix of global + local rows: a run's model after each node personalised its local layers."""
AUDIT = "audit"
AUDIT_METRICS = ("mia.loss.auc", "mia.loss.tpr@1%fpr", "mia.lr.auc", "mia.lr.tpr@1%fpr", "members", "non-members",
                 "max-epsilon", "delta")
FEDERATED = ("fedavg", "fedprox", "fedadam")
RESULT = "result.json"
TABLE_COLUMNS = ["run_id", "setting", "epsilon", "seed", "data", "round", "split", "merchant", "metric", "value"]
PER_ROUND = ("ctcvr.auc", "ctcvr.gauc", "click.auc", "ndcg@10", "max-epsilon", "bytes-sent", "bytes-received",
             "client-train-seconds", "client-train-seconds-max", "aggregate-seconds",
             "seconds", "nodes-trained")
BASELINE_RUN = "baselines"
NEXT_BASKET = tuple(f"{PREFIX}.{variant}.{metric}{end}" for variant in VARIANTS for metric in METRICS
                    for end in ("", ".lo", ".hi")) + tuple(f"{PREFIX}.{variant}.n" for variant in VARIANTS)
"""Next-basket test metrics of purchase logs, with their bootstrap 95% interval ends (`shared/evaluation`)."""
FINAL = ("ctcvr.auc", "ctcvr.gauc", "click.auc", "ctcvr.logloss", "ndcg@10", "hr@10", *NEXT_BASKET)


class ExperimentError(ValueError):
    """A bad experiment config; the message names the file, the field, the value and the fix."""


@dataclass(frozen=True)
class Run:
    setting: str
    epsilon: float | None
    seed: int

    @property
    def run_id(self) -> str:
        eps = "none" if self.epsilon is None else f"{self.epsilon:g}"
        return f"{self.setting}-eps{eps}-seed{self.seed}"


@dataclass(frozen=True)
class Experiment:
    name: str
    data: str
    settings: tuple[str, ...]
    epsilons: tuple[float | None, ...]
    seeds: tuple[int, ...]
    rounds: int
    run_config: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    partition: str = "natural"
    alpha: float = 0.5
    clients: int = 5
    min_shoppers: int = 0
    max_shoppers: int = 0
    audit_epsilons: tuple[float | None, ...] = ()
    audit_merchant: str = ""
    audit_max_members: int = 2000
    audit_run_config: dict[str, Any] = field(default_factory=dict)
    baselines: tuple[str, ...] = ()

    @classmethod
    def from_toml(cls, path: Path) -> Experiment:
        if not path.is_file():
            raise ExperimentError(f"{path} does not exist: pass an experiment config (TOML), e.g. "
                                  "simulations/experiments/synthetic-default.toml")
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ExperimentError(f"{path} is not valid TOML: {err}") from None

        def bad(key: str, fix: str) -> ExperimentError:
            return ExperimentError(f"{path}: `{key}` = {table.get(key)!r} is invalid: {fix}")

        keys = {"name", "data", "settings", "epsilons", "seeds", "rounds", "run-config", "partition", "alpha",
                "clients", "min-shoppers", "max-shoppers", "audit-epsilons", "audit-merchant", "audit-max-members",
                "audit-run-config", "baselines"}
        unknown = set(table) - keys
        if unknown:
            raise ExperimentError(f"{path}: unknown key(s) {sorted(unknown)}: the keys are {', '.join(sorted(keys))}")
        partition = table.get("partition", "natural")
        if partition not in ("natural", "dirichlet"):
            raise bad("partition", '"natural" (one client per merchant folder) or "dirichlet" (re-partition by '
                                   "category)")
        alpha = table.get("alpha", 0.5)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise bad("alpha", "a number > 0 (the Dirichlet concentration; small = strongly non-IID)")
        clients = table.get("clients", 5)
        if isinstance(clients, bool) or not isinstance(clients, int) or clients < 2:
            raise bad("clients", "a whole number >= 2 (clients of the Dirichlet partition)")
        min_shoppers = table.get("min-shoppers", 0)
        if isinstance(min_shoppers, bool) or not isinstance(min_shoppers, int) or min_shoppers < 0:
            raise bad("min-shoppers", "a whole number >= 0 (keep only merchant folders with that many shoppers)")
        max_shoppers = table.get("max-shoppers", 0)
        if isinstance(max_shoppers, bool) or not isinstance(max_shoppers, int) or max_shoppers < 0:
            raise bad("max-shoppers", "a whole number >= 0 (cut larger merchant folders to a random sample of that "
                                      "many shoppers; 0 keeps all)")
        if max_shoppers and max_shoppers < min_shoppers:
            raise bad("max-shoppers", f"0 or at least min-shoppers = {min_shoppers}")
        settings = table.get("settings", list(SETTINGS))
        if not isinstance(settings, list) or not settings or any(s not in SETTINGS for s in settings):
            raise bad("settings", f"a non-empty list of {', '.join(SETTINGS)}")
        def budgets(key: str, default: list) -> list[float | None]:
            values = table.get(key, default)
            if not isinstance(values, list):
                raise bad(key, 'a list of numbers > 0 and "none" (no DP), e.g. ["none", 8, 4, 2, 1]')
            out: list[float | None] = []
            for value in values:
                if value == "none":
                    out.append(None)
                elif (isinstance(value, int | float) and not isinstance(value, bool) and value > 0
                      and math.isfinite(value)):
                    out.append(float(value))
                else:
                    raise bad(key, 'a list of numbers > 0 and "none" (no DP), e.g. ["none", 8, 4, 2, 1]')
            return out

        epsilons = budgets("epsilons", ["none"])
        audit_epsilons = budgets("audit-epsilons", [])
        audit_merchant = table.get("audit-merchant", "")
        if not isinstance(audit_merchant, str):
            raise bad("audit-merchant", 'the name of a merchant folder of the data set, or "" for the first')
        audit_max_members = table.get("audit-max-members", 2000)
        if isinstance(audit_max_members, bool) or not isinstance(audit_max_members, int) or audit_max_members < 10:
            raise bad("audit-max-members", "a whole number >= 10 (members of the audit, and as many non-members)")
        seeds = table.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or any(not isinstance(s, int) or isinstance(s, bool)
                                                           for s in seeds):
            raise bad("seeds", "a non-empty list of whole numbers, e.g. [0, 1, 2]")
        rounds = table.get("rounds", 5)
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
            raise bad("rounds", "a whole number >= 1")
        data = table.get("data", "synthetic")
        if not isinstance(data, str) or not data:
            raise bad("data", '"synthetic" or the path of a marketplace folder')
        run_config = table.get("run-config", {})
        if not isinstance(run_config, dict):
            raise bad("run-config", "a table of app run config keys")
        audit_run_config = table.get("audit-run-config", {})
        if not isinstance(audit_run_config, dict):
            raise bad("audit-run-config", "a table of app run config keys for the audit runs")
        baselines = table.get("baselines", [])
        if not isinstance(baselines, list) or any(b not in BASELINES for b in baselines):
            raise bad("baselines", f"a list of the classic baselines {', '.join(BASELINES)} (ranked beside the model "
                                   "on purchase logs), or [] for none")
        return cls(str(table.get("name", path.stem)), data, tuple(settings), tuple(dict.fromkeys(epsilons)),
                   tuple(dict.fromkeys(seeds)), rounds, flatten(run_config), path, partition, float(alpha), clients,
                   min_shoppers, max_shoppers, tuple(dict.fromkeys(audit_epsilons)), audit_merchant,
                   audit_max_members, flatten(audit_run_config), tuple(dict.fromkeys(baselines)))

    def runs(self) -> list[Run]:
        """The grid, seed by seed and budget by budget, so that a partly run grid already holds whole curves;
        centralized training has no DP here, so it runs once per seed (its ε is none)."""
        out = []
        for seed in self.seeds:
            if self.baselines and seed == self.seeds[0]:  # once: only ALS draws at random
                out.append(Run(BASELINE_RUN, None, seed))
            for epsilon in self.epsilons:
                for setting in self.settings:
                    if setting != "centralized" or epsilon is None:
                        out.append(Run(setting, epsilon, seed))
            if None not in self.epsilons and "centralized" in self.settings:
                out.append(Run("centralized", None, seed))
        for seed in self.seeds:
            out += [Run(AUDIT, epsilon, seed) for epsilon in self.audit_epsilons]
        return out

    def data_root(self, out: Path) -> Path:
        """The marketplace folder the runs read: the data set, its merchants with enough shoppers, at most
        `max_shoppers` of them each, or its Dirichlet re-partition (written once into `out`)."""
        from fedcvr.simulations.partition import cap_shoppers, dirichlet_partition, select_merchants

        root = self.source_root(out)
        if self.min_shoppers:
            root = select_merchants(root, self.min_shoppers, out / f"data-min{self.min_shoppers}")
        if self.max_shoppers:
            root = cap_shoppers(root, self.max_shoppers, out / f"{root.name}-max{self.max_shoppers}")
        if self.partition == "dirichlet":
            target = out / f"data-dirichlet-{self.alpha:g}-{self.clients}"
            if not (target / f"client-{self.clients:02d}" / "events.parquet").is_file():
                dirichlet_partition(root, target, self.alpha, self.clients)
            root = target
        return root

    def source_root(self, out: Path) -> Path:
        """The data set: the synthetic default (generated into `out`), an Online Retail file imported into `out`
        (`data = "online-retail:FILE"`), or a marketplace folder. Relative paths: from the working directory, else
        from the config file's folder."""
        if self.data == "synthetic":
            root = out / "data"
            if not (root / "marketplace.json").is_file():
                from fedcvr.simulations.synth import SynthConfig, generate_marketplace

                generate_marketplace(SynthConfig(seed=0), root)
            return root
        kind, _, text = (self.data.partition(":") if self.data.startswith(("online-retail:", "amazon:"))
                         else ("", "", self.data))
        path = Path(text).expanduser()
        if not path.is_absolute() and not path.exists() and self.source is not None:
            path = self.source.parent / path
        if not path.exists():
            raise ExperimentError(f"{self.source}: `data` = {self.data!r}: {path} does not exist (for Online Retail, "
                                  "download the file from the UCI repository and give its path)")
        if kind == "amazon":
            return self._import_amazon(path, out / "data-amazon")
        if kind != "online-retail":
            return path.resolve()
        root = out / "data-online-retail"
        if not any(root.glob("*/events.parquet")):
            from fedcvr.shared.data.importers.online_retail import import_online_retail

            import_online_retail(path, root)
        return root

    def _import_amazon(self, folder: Path, root: Path) -> Path:
        """`data = "amazon:FOLDER"`: the Amazon Reviews files in FOLDER (one reviews file, one `meta_*` file)
        imported once into `root`."""
        if any(root.glob("*/events.parquet")):
            return root
        files = sorted(p for p in folder.iterdir() if p.is_file() and ".json" in p.name) if folder.is_dir() else []
        meta = [p for p in files if p.name.startswith("meta_")]
        reviews = [p for p in files if not p.name.startswith("meta_")]
        if len(meta) != 1 or len(reviews) != 1:
            raise ExperimentError(f"{self.source}: `data` = {self.data!r}: {folder} must hold one reviews file and one "
                                  f"meta_* file (.json, .jsonl or .gz) of Amazon Reviews; found "
                                  f"{', '.join(p.name for p in files) or 'none'}")
        from fedcvr.shared.data.importers.amazon import import_amazon

        import_amazon(reviews[0], meta[0], root)
        return root


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


class LoadSampler:
    """The machine's 1-minute load average, sampled every `every` seconds while a run runs: other work on the
    machine slows a run down, and its wall time means little without it. `summary()` -> {"mean", "max",
    "samples"} (None on a system without `os.getloadavg`)."""

    def __init__(self, every: float = 15.0):
        import threading

        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import os

        while True:
            try:
                self.samples.append(os.getloadavg()[0])
            except (AttributeError, OSError):
                return
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        return {"mean": sum(self.samples) / len(self.samples), "max": max(self.samples), "samples": len(self.samples)}


def data_fingerprint(folders: list[Path]) -> dict[str, dict[str, int]]:
    """Per merchant folder: its events, shoppers and items. The runs of a grid must all read the same data; a
    resumed grid whose data no longer matches the fingerprint of its finished runs is refused (`check_data`)."""
    from fedcvr.simulations.partition import folder_counts

    return {folder.name: folder_counts(folder) for folder in folders}


def check_data(out: Path, prints: dict[str, dict[str, int]]) -> None:
    """Refuse to add runs to `out` when its finished runs read other data than `prints` (see `data_fingerprint`)."""
    path = out / "experiment.json"
    known = json.loads(path.read_text()).get("data_fingerprint") if path.is_file() else None
    if not known or known == prints or not any((out / "runs").glob(f"*/{RESULT}")):
        return
    changed = [f"{name}: {known.get(name)} then, {prints.get(name)} now"
               for name in sorted(set(known) | set(prints)) if known.get(name) != prints.get(name)]
    raise ExperimentError(
        f"{path}: the finished runs in {out / 'runs'} read other data than the grid prepares now "
        f"({'; '.join(changed)}), and one grid's runs must all read the same data. Fix: give another --out to run "
        f"the grid on the data as it is now, or delete {out / 'runs'} to rerun every run on it.")


def describe(experiment: Experiment, out: Path, data_root: Path,
             prints: dict[str, dict[str, int]] | None = None) -> Path:
    """`<out>/experiment.json`: the grid, the data (and its `data_fingerprint`), the machine, for the report (one
    entry per session)."""
    path = out / "experiment.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    sessions = known.get("sessions", [])
    sessions.append({"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    path.write_text(json.dumps({
        "name": experiment.name, "config": str(experiment.source) if experiment.source else None,
        "data": experiment.data, "data_root": str(data_root), "settings": list(experiment.settings),
        "epsilons": [e if e is not None else "none" for e in experiment.epsilons], "seeds": list(experiment.seeds),
        "rounds": experiment.rounds, "partition": experiment.partition,
        "alpha": experiment.alpha if experiment.partition == "dirichlet" else None,
        "clients": experiment.clients if experiment.partition == "dirichlet" else None,
        "min_shoppers": experiment.min_shoppers, "max_shoppers": experiment.max_shoppers,
        "audit_epsilons": [e if e is not None else "none" for e in experiment.audit_epsilons],
        "audit_merchant": experiment.audit_merchant, "audit_max_members": experiment.audit_max_members,
        "audit_run_config": experiment.audit_run_config, "baselines": list(experiment.baselines),
        "run_config": experiment.run_config, "data_fingerprint": prints or known.get("data_fingerprint"),
        "sessions": sessions},
        indent=2) + "\n")
    return path


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
