"""The DP-SGD settings of a node (`dp.*` of the run config) and the δ it trains at.

Keys (kebab-case, as in pyproject.toml):
  dp.enabled         train with DP-SGD (true) or without any privacy guarantee (false)
  dp.target-epsilon  ε budget for the whole run, all rounds together
  dp.target-delta    δ of the guarantee; 0 or missing = min(1 / (10 * local examples), 1e-5) (`delta_for`); a
                     node with n local examples declines to train at a δ >= 1 / n (`delta_refusal`)
  dp.max-grad-norm   per-sample gradient clipping norm
  dp.optimizer       the optimiser of DP rounds: "sgd" (momentum 0.9, default) or "adam". Adam divides each
                     coordinate by the root of its second moment, which under DP noise is about the noise itself,
                     so every coordinate without much signal still moves about lr a step in a random direction;
                     with SGD noise moves weights in proportion to its size (measured in docs/experiments.md)
  dp.lr              learning rate of DP rounds; 0 = train.lr
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .settings import Section, SettingsError, read_section, with_defaults

# The largest default δ of any node (`delta_for`), whatever its size.
MAX_DEFAULT_DELTA = 1e-5


class PrivacyConfigError(SettingsError):
    """A `dp.*` setting, or a noise plan, that cannot work; the message names the key, the value and the fix."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class DPConfig(Section):
    enabled: bool
    target_epsilon: float
    target_delta: float | None
    max_grad_norm: float
    optimizer: str
    lr: float
    grad_sample_mode: str
    accountant: str = "rdp"

    ERROR = PrivacyConfigError
    KEYS = {
        "dp.enabled": "enabled", "dp.target-epsilon": "target_epsilon", "dp.target-delta": "target_delta",
        "dp.max-grad-norm": "max_grad_norm", "dp.optimizer": "optimizer", "dp.lr": "lr",
        "dp.grad-sample-mode": "grad_sample_mode",
    }
    OPTIMIZERS = ("sgd", "adam")
    GRAD_SAMPLE_MODES = ("ghost", "hooks")  # Opacus's names: ghost clipping, or per-sample gradients kept

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.enabled, bool):
            problems.append(f"dp.enabled = {self.enabled!r}: expected true or false")
        if not (_is_number(self.target_epsilon) and 0 < self.target_epsilon < math.inf):
            problems.append(f"dp.target-epsilon = {self.target_epsilon!r}: must be a number > 0, e.g. 8.0 "
                            "(smaller is more private)")
        if self.target_delta is not None and not (_is_number(self.target_delta) and 0 < self.target_delta < 1):
            problems.append(f"dp.target-delta = {self.target_delta!r}: must be between 0 and 1, well below "
                            "1 / local examples; set 0 for the default min(1 / (10 * local examples), 1e-5)")
        if not (_is_number(self.max_grad_norm) and 0 < self.max_grad_norm < math.inf):
            problems.append(f"dp.max-grad-norm = {self.max_grad_norm!r}: must be a number > 0, e.g. 1.0")
        if self.optimizer not in self.OPTIMIZERS:
            problems.append(f"dp.optimizer = {self.optimizer!r}: must be one of " + ", ".join(self.OPTIMIZERS))
        if self.grad_sample_mode not in self.GRAD_SAMPLE_MODES:
            problems.append(f"dp.grad-sample-mode = {self.grad_sample_mode!r}: must be one of "
                            + ", ".join(self.GRAD_SAMPLE_MODES) + ' ("ghost" clips without keeping per-sample '
                            'gradients; "hooks" keeps them; same clipping, same guarantee)')
        if not (_is_number(self.lr) and 0 <= self.lr < math.inf):
            problems.append(f"dp.lr = {self.lr!r}: must be a number >= 0, e.g. 0.5 for sgd; 0 uses train.lr")
        if self.accountant != "rdp":
            problems.append(f"accountant = {self.accountant!r}: only 'rdp' is supported (the ledger stores RDP "
                            "accountant history)")
        if problems:
            raise PrivacyConfigError("; ".join(problems))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **overrides: Any) -> DPConfig:
        """The `dp.*` keys of `run_config` (else their declared defaults); `dp.target-delta` = 0 means the default
        δ (None here). Explicit non-None `overrides` win."""
        keys = {k: v for k, v in cls.KEYS.items() if k != "dp.target-delta"}
        values = read_section(cls, keys, run_config, PrivacyConfigError)
        delta = with_defaults(["dp.target-delta"], run_config, PrivacyConfigError)["dp.target-delta"]
        if not _is_number(delta):
            raise PrivacyConfigError(f"dp.target-delta = {delta!r}: expected a number, e.g. dp.target-delta = "
                                     "1e-6, or 0 for the default min(1 / (10 * local examples), 1e-5)")
        values["target_delta"] = float(delta) if delta != 0 else None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _check_examples(n_examples: Any) -> None:
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise PrivacyConfigError(f"n_examples = {n_examples!r}: δ needs the number of local training examples, "
                                 "a whole number >= 1")


def delta_for(n_examples: int) -> float:
    """The default δ for a node with `n_examples` training examples: min(1 / (10 n), MAX_DEFAULT_DELTA).

    δ bounds the chance that the guarantee fails for any one example, so it must be small in itself, not only
    below 1 / n: 1 / (10 n) alone gives a merchant of 3 examples δ = 0.033, which a mechanism that publishes each
    example outright with probability 0.033 meets; 1e-5 is the common choice (Abadi et al. 2016). Capped, every
    node's δ is at most 1e-5 and at most 1 / (10 n), so n δ <= 0.1 on every node whatever its size. Nodes of
    10,000 examples or more keep 1 / (10 n); smaller ones train at 1e-5, which needs more noise for the same ε."""
    _check_examples(n_examples)
    return min(1.0 / (10 * n_examples), MAX_DEFAULT_DELTA)


def delta_refusal(delta: float, n_examples: int) -> str:
    """Why a node with `n_examples` training examples must not train under DP at `delta` ("" when it may).

    At δ >= 1 / n the (ε, δ) guarantee holds even for a mechanism that publishes one of the n examples outright,
    so it promises nothing: such a node declines instead of training (the round goes on with the others)."""
    _check_examples(n_examples)
    if delta < 1.0 / n_examples:
        return ""
    return (f"dp.target-delta = {delta:g} is not below 1 / {n_examples} (this node's {n_examples} training "
            f"examples): at that δ the guarantee would allow one example to be published outright; set "
            f"dp.target-delta to at most {delta_for(n_examples):.1e} (or 0 for the default min(1 / (10 n), "
            f"{MAX_DEFAULT_DELTA:g}) of each node)")
