"""An experiment grid's settings, read once from its TOML config into a validated `Experiment`; running it:
`experiment.py`.

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
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcvr.shared.evaluation import BASELINES
from fedcvr.shared.flower_app import STRATEGIES, flatten

RESULT = "result.json"  # a finished run's record: <out>/runs/<run-id>/result.json
SETTINGS = ("centralized", "local-only", *STRATEGIES)


LOCAL_SUFFIX = " + local"


AUDIT = "audit"


FEDERATED = STRATEGIES


BASELINE_RUN = "baselines"


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
