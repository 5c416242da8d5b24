"""The ServerApp's run config, read once into a typed, validated dataclass.

Keys (a key the run config leaves out takes its default from `[tool.flwr.app.config]` of pyproject.toml, the one
place defaults are written; override with `flwr run . --run-config "k=v"`):
  num-server-rounds   rounds of federated training, >= 1
  min-nodes           nodes to wait for before starting, >= 1
  round-timeout       seconds to wait for nodes to connect and for replies to a round, > 0
  fraction-evaluate   share of nodes asked to evaluate, 0 < f <= 1
  seed                seed of the server's random choices, an integer
  out-dir             absolute folder for result files ("" writes none)
  strategy            fedavg | fedprox | fedadam
  fraction-train      share of nodes asked to train each round, 0 < f <= 1
  local-epochs        local epochs per round on each node, >= 1
  proximal-mu         FedProx's proximal weight mu, > 0 (used with strategy = "fedprox")
  server-lr           FedAdam's server learning rate eta, > 0 (used with strategy = "fedadam")
  resume              a stopped run's out-dir (or its checkpoint/ folder) to continue from; "" starts afresh
  secagg, secagg-*    secure aggregation (SecAgg+), see SecAggConfig
  aggregation         mean | median | trimmed-mean: how the kept updates are combined (see server/robust.py)
  aggregation-trim    trimmed-mean's share dropped at each end per coordinate, 0 < t < 0.5
  reject-norm-factor  reject an update whose change is above this factor x the round's median; 0 = no norm check
  rank-validation     true: each round's validation also ranks every purchase against its merchant's whole catalog
                      (NDCG@10, HR@10, MRR in the round log); false: AUCs and losses only, which is much cheaper on
                      large catalogs (the final test evaluation always ranks)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedcvr.shared.flower_app import STRATEGIES
from fedcvr.shared.secagg import MIN_NODES
from fedcvr.shared.settings import SettingsError, with_defaults

from .robust import METHODS as AGGREGATIONS


class ConfigError(SettingsError):
    """A run config value that is missing or invalid; the message names the key, the value and the fix."""


def _get(run_config: Mapping[str, object], key: str) -> object:
    return with_defaults((key,), run_config, ConfigError)[key]


def _int(run_config: Mapping[str, object], key: str, minimum: int | None, fix: str) -> int:
    value = _get(run_config, key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ConfigError(f"run config `{key}` = {value!r} is invalid: {fix}.")
    return value


def _float(run_config: Mapping[str, object], key: str, low: float, high: float | None, fix: str) -> float:
    value = _get(run_config, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"run config `{key}` = {value!r} is invalid: {fix}.")
    number = float(value)
    if not number > low or (high is not None and number > high):
        raise ConfigError(f"run config `{key}` = {value!r} is invalid: {fix}.")
    return number


def _folder(run_config: Mapping[str, object], key: str, what: str, empty: str) -> Path | None:
    """An absolute folder path from `key`, or None for "" (`empty` says what "" means)."""
    value = _get(run_config, key)
    if not isinstance(value, str):
        raise ConfigError(f"run config `{key}` = {value!r} is invalid: it must be {what} (text), or \"\" {empty}.")
    if not value.strip():
        return None
    path = Path(value.strip()).expanduser()
    if not path.is_absolute():
        raise ConfigError(f"run config `{key}` = {value!r} is a relative path, but flwr runs the ServerApp "
                          "in a folder of its own: pass an absolute path (`fedcvr` makes it absolute).")
    return path


def _flag(run_config: Mapping[str, object], key: str) -> bool:
    value = _get(run_config, key)
    if not isinstance(value, bool):
        raise ConfigError(f"run config `{key}` = {value!r} is invalid: it must be true or false.")
    return value


def _non_negative(run_config: Mapping[str, object], key: str, zero: str = "0 = automatic") -> float:
    value = _get(run_config, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"run config `{key}` = {value!r} is invalid: it must be a number >= 0 ({zero}).")
    return float(value)


@dataclass(frozen=True)
class SecAggConfig:
    """The validated `secagg*` run config keys.

    secagg                           true: the coordinator sees only the sum of the nodes' masked updates
    secagg-num-shares                each node's secret is split into this many shares: a fraction (0, 1] of the
                                     round's nodes, or a whole number >= 3
    secagg-reconstruction-threshold  shares needed to rebuild a secret: a fraction (0, 1] of the shares or a whole
                                     number; a node that drops out mid-round is recovered if this many remain
    secagg-clipping-range            weights are clipped to [-c, c] before quantisation
    secagg-quantization-range        levels of the quantisation (an integer, < 2**32)
    secagg-max-weight                the largest training-split size a node's update may weigh (larger ones are
                                     capped); 0 = the largest of the round's nodes (asked once per node), which
                                     keeps the quantised weights precise
    """

    enabled: bool
    num_shares: float | int
    reconstruction_threshold: float | int
    clipping_range: float
    quantization_range: int
    max_weight: float

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> SecAggConfig:
        enabled = _flag(run_config, "secagg")

        def number(key: str) -> float | int:
            value = _get(run_config, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"run config `{key}` = {value!r} is invalid: it must be a number > 0.")
            return value

        shares = number("secagg-num-shares")
        if isinstance(shares, float) and shares > 1:
            raise ConfigError(f"run config `secagg-num-shares` = {shares!r} is invalid: use a fraction of the "
                              "round's nodes in (0, 1], e.g. 1.0, or a whole number >= 3.")
        if isinstance(shares, int) and shares != 1 and shares < 3:
            raise ConfigError(f"run config `secagg-num-shares` = {shares!r} is invalid: a whole number must be "
                              ">= 3 (or use a fraction, e.g. 1.0 for every node of the round).")
        threshold = number("secagg-reconstruction-threshold")
        if isinstance(threshold, float) and threshold > 1:
            raise ConfigError(f"run config `secagg-reconstruction-threshold` = {threshold!r} is invalid: use a "
                              "fraction of the shares in (0, 1], e.g. 0.67, or a whole number.")
        if isinstance(threshold, int) and isinstance(shares, int) and shares != 1 and threshold >= shares:
            raise ConfigError(f"run config `secagg-reconstruction-threshold` = {threshold} is invalid: it must be "
                              f"below secagg-num-shares = {shares}.")
        quantization = number("secagg-quantization-range")
        if not isinstance(quantization, int) or quantization >= 2**32:
            raise ConfigError(f"run config `secagg-quantization-range` = {quantization!r} is invalid: it must be "
                              "a whole number below 2**32, e.g. 4194304 (2**22).")
        return cls(enabled=enabled, num_shares=shares, reconstruction_threshold=threshold,
                   clipping_range=float(number("secagg-clipping-range")),
                   quantization_range=quantization,
                   max_weight=float(_non_negative(run_config, "secagg-max-weight")))


def _strategy(run_config: Mapping[str, object]) -> str:
    value = _get(run_config, "strategy")
    if value not in STRATEGIES:
        raise ConfigError(f"run config `strategy` = {value!r} is invalid: use one of {', '.join(STRATEGIES)}.")
    return str(value)


def _aggregation(run_config: Mapping[str, object]) -> str:
    value = _get(run_config, "aggregation")
    if value not in AGGREGATIONS:
        raise ConfigError(f"run config `aggregation` = {value!r} is invalid: use one of {', '.join(AGGREGATIONS)}.")
    return str(value)


@dataclass(frozen=True)
class ServerConfig:
    """The validated server-side run config."""

    num_server_rounds: int
    min_nodes: int
    round_timeout: float
    fraction_evaluate: float
    seed: int
    out_dir: Path | None
    strategy: str
    fraction_train: float
    proximal_mu: float
    server_lr: float
    resume: Path | None
    secagg: SecAggConfig
    aggregation: str
    aggregation_trim: float
    reject_norm_factor: float
    rank_validation: bool

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> ServerConfig:
        """Read and validate the run config; raises ConfigError on the first bad value."""
        config = cls(
            num_server_rounds=_int(run_config, "num-server-rounds", 1, "it must be a whole number >= 1"),
            min_nodes=_int(run_config, "min-nodes", 1,
                           "min-nodes must be a whole number >= 1 (the number of nodes to wait for)"),
            round_timeout=_float(run_config, "round-timeout", 0.0, None,
                                 "round-timeout must be a number of seconds > 0, e.g. 600"),
            fraction_evaluate=_float(run_config, "fraction-evaluate", 0.0, 1.0,
                                     "fraction-evaluate must be a number with 0 < f <= 1, e.g. 1.0 for all"),
            seed=_int(run_config, "seed", None, "seed must be a whole number, e.g. 42"),
            out_dir=_folder(run_config, "out-dir", "a folder path", "to write no files"),
            strategy=_strategy(run_config),
            fraction_train=_float(run_config, "fraction-train", 0.0, 1.0,
                                  "fraction-train must be a number with 0 < f <= 1, e.g. 1.0 for all"),
            proximal_mu=_float(run_config, "proximal-mu", 0.0, None, "proximal-mu must be a number > 0, e.g. 0.01"),
            server_lr=_float(run_config, "server-lr", 0.0, None, "server-lr must be a number > 0, e.g. 0.1"),
            resume=_folder(run_config, "resume", "the out-dir of a stopped run", "to start afresh"),
            secagg=SecAggConfig.from_run_config(run_config),
            aggregation=_aggregation(run_config),
            aggregation_trim=_float(run_config, "aggregation-trim", 0.0, 0.4999,
                                    "aggregation-trim must be a share with 0 < t < 0.5, e.g. 0.2"),
            reject_norm_factor=_non_negative(run_config, "reject-norm-factor", "0 = no norm check"),
            rank_validation=_flag(run_config, "rank-validation"),
        )
        if config.secagg.enabled and config.aggregation != "mean":
            raise ConfigError(
                f"run config `aggregation` = '{config.aggregation}' cannot be combined with `secagg` = true: under "
                "secure aggregation the coordinator sees only the sum of the updates, never one update. Set "
                "aggregation = 'mean', or secagg = false.")
        if config.secagg.enabled and config.min_nodes < MIN_NODES:
            raise ConfigError(
                f"run config `secagg` = true needs at least {MIN_NODES} merchant nodes in every round, but "
                f"`min-nodes` = {config.min_nodes}: set min-nodes = {MIN_NODES} or more (and run that many nodes), "
                "or set secagg = false. With 2 nodes, each could recover the other's update from the sum.")
        return config
