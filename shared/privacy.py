"""Each node's privacy ledger for DP-SGD (Opacus) across federated rounds.

Every merchant node trains a few local epochs per round with Opacus DP-SGD (Poisson sampling, per-sample clipping).
The guarantee is for the whole run: all planned rounds together must stay within `dp.target-epsilon` at the δ in use.
So the node plans one noise multiplier for all its rounds (`plan_noise`), keeps the accountant's history in
`context.state` between rounds (`PrivacyLedger.load` / `save`), hands that history to each round's
`opacus.PrivacyEngine` (`attach`) and reads it back after training (`sync_from`), and declines a round that would
overspend (`can_train`). ε always comes from Opacus's RDP accountant; nothing here does privacy maths.

The `dp.*` settings and the δ a node trains at: `dp_config.py`.

A client round, in outline:

    ledger = PrivacyLedger.load(context.state)
    noise = ledger.plan(config, sample_rate=1 / len(loader), steps_per_round=epochs * len(loader),
                        rounds=num_rounds, n_examples=len(dataset))
    if not ledger.can_train(noise, sample_rate, steps, config.target_epsilon): ...decline...
    engine = PrivacyEngine(accountant="rdp"); ledger.attach(engine)
    model, optimizer, loader = engine.make_private(..., noise_multiplier=noise, max_grad_norm=config.max_grad_norm,
                                                   poisson_sampling=True)
    ...train...
    ledger.sync_from(engine); ledger.save(context.state)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, RecordDict

from .dp_config import DPConfig, PrivacyConfigError, _is_number, delta_for

if TYPE_CHECKING:
    from opacus import PrivacyEngine

# One accountant entry, as Opacus's RDPAccountant keeps it: (noise multiplier, sample rate, steps).
Entry = tuple[float, float, int]

DEFAULT_KEY = "privacy"
# The planned noise is found by bisection to this fraction of the target ε (Opacus's default is 0.01 absolute,
# which is 10% of a target of 0.1).
_PLAN_TOLERANCE = 1e-3


class PrivacyLedgerError(ValueError):
    """A ledger that cannot be read, or that is used out of order (e.g. an engine that was never attached)."""


def _check_round(noise: Any, sample_rate: Any, steps: Any, error: type[Exception]) -> None:
    problems = []
    if not (_is_number(noise) and 0 <= noise < math.inf):
        problems.append(f"noise multiplier = {noise!r}: must be a number >= 0")
    if not (_is_number(sample_rate) and 0 < sample_rate <= 1):
        problems.append(f"sample rate = {sample_rate!r}: must be in (0, 1], i.e. batch size / local examples")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        problems.append(f"steps = {steps!r}: must be a whole number >= 1 (optimizer steps in a round)")
    if problems:
        raise error("; ".join(problems))


def plan_noise(config: DPConfig, sample_rate: float, steps_per_round: int, rounds: int, delta: float) -> float:
    """The noise multiplier with which `rounds * steps_per_round` DP-SGD steps at `sample_rate` spend at most
    `config.target_epsilon` at `delta` (and within 0.1% of it), by Opacus's `get_noise_multiplier` (RDP)."""
    if not config.enabled:
        raise PrivacyConfigError("dp.enabled = false: there is no noise to plan; set dp.enabled = true for DP-SGD")
    _check_round(1.0, sample_rate, steps_per_round, PrivacyConfigError)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PrivacyConfigError(f"rounds = {rounds!r}: must be a whole number >= 1 (the rounds planned for the run)")
    if not (_is_number(delta) and 0 < delta < 1):
        raise PrivacyConfigError(f"delta = {delta!r}: must be between 0 and 1; use delta_for(n_examples)")
    from opacus.accountants.utils import get_noise_multiplier

    steps = rounds * steps_per_round
    try:
        with warnings.catch_warnings():  # the search's far-off trial noises warn about the RDP order range
            warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
            noise = get_noise_multiplier(target_epsilon=config.target_epsilon, target_delta=delta,
                                         sample_rate=sample_rate, steps=steps, accountant=config.accountant,
                                         epsilon_tolerance=_PLAN_TOLERANCE * config.target_epsilon)
    except ValueError as exc:  # Opacus gives up above a noise multiplier of 1e6
        raise PrivacyConfigError(
            f"dp.target-epsilon = {config.target_epsilon!r} at δ = {delta:g} cannot be met by {steps} steps "
            f"({rounds} rounds x {steps_per_round}) at sample rate {sample_rate:g} ({exc}): raise "
            "dp.target-epsilon, or train fewer rounds, epochs or steps") from exc
    return float(noise)


def _merged(history: Sequence[Entry], noise: float, sample_rate: float, steps: int) -> list[Entry]:
    """`history` plus `steps` more steps, merged into the last entry when noise and rate match, as
    RDPAccountant.step() does, so that a ledger's history is exactly the one Opacus would hold."""
    out = list(history)
    if out and out[-1][0] == noise and out[-1][1] == sample_rate:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + steps)
    else:
        out.append((float(noise), float(sample_rate), int(steps)))
    return out


def _epsilon(history: Sequence[Entry], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def _steps_added(ours: Sequence[Entry], theirs: Sequence[Entry]) -> int | None:
    """Steps that `theirs` adds to `ours`, or None if `theirs` does not continue `ours`."""
    n = len(ours)
    if n == 0:
        return sum(entry[2] for entry in theirs)
    if len(theirs) < n or list(theirs[:n - 1]) != list(ours[:n - 1]):
        return None
    (noise, rate, steps), (their_noise, their_rate, their_steps) = ours[-1], theirs[n - 1]
    if (noise, rate) != (their_noise, their_rate) or their_steps < steps:
        return None
    return their_steps - steps + sum(entry[2] for entry in theirs[n:])


_RECORD_KEYS = ("mechanism", "noise-multipliers", "sample-rates", "steps", "planned-noise", "delta",
                "rounds-trained")


@dataclass
class PrivacyLedger:
    """What a node has spent so far: the RDP accountant's history [(noise multiplier, sample rate, steps), ...],
    the noise multiplier planned for the run, the δ of the guarantee and the rounds trained.

    `noise_multiplier` and `delta` are None until planned; a ledger with history always has a δ."""

    history: list[Entry] = field(default_factory=list)
    noise_multiplier: float | None = None
    delta: float | None = None
    rounds_trained: int = 0

    def __post_init__(self) -> None:
        # Entries compare with Opacus's by value, so keep them as the tuples RDPAccountant.step() builds.
        self.history = [(float(noise), float(rate), int(steps)) for noise, rate, steps in self.history]

    def plan(self, config: DPConfig, *, sample_rate: float, steps_per_round: int, rounds: int,
             n_examples: int) -> float:
        """The run's noise multiplier: planned (with δ = `run_delta`) on the first call, then kept for every
        later round, since re-planning each round would restart the budget."""
        if self.noise_multiplier is None:
            delta = self.run_delta(config, n_examples)
            self.noise_multiplier = plan_noise(config, sample_rate, steps_per_round, rounds, delta)
            self.delta = delta
        return self.noise_multiplier

    def run_delta(self, config: DPConfig, n_examples: int) -> float:
        """The δ of this node's guarantee: the one its first round fixed, else dp.target-delta, else
        delta_for(n_examples)."""
        return self.delta or config.target_delta or delta_for(n_examples)

    def _require_delta(self) -> float:
        if self.delta is None:
            raise PrivacyLedgerError("this ledger has no δ yet: call ledger.plan(...) or build it with "
                                     "PrivacyLedger(delta=...) before recording or projecting spending")
        return self.delta

    def epsilon(self) -> float:
        """ε spent so far at the ledger's δ (0.0 before any training)."""
        if not self.history:
            return 0.0
        return _epsilon(self.history, self._require_delta())

    def projected_epsilon(self, noise: float, sample_rate: float, steps: int) -> float:
        """ε after one more round of `steps` steps at `noise` and `sample_rate`."""
        _check_round(noise, sample_rate, steps, PrivacyLedgerError)
        return _epsilon(_merged(self.history, noise, sample_rate, steps), self._require_delta())

    def can_train(self, noise: float, sample_rate: float, steps: int, target_epsilon: float,
                  tolerance: float = 1e-6) -> bool:
        """Whether one more such round keeps ε within `target_epsilon` (`tolerance` absorbs rounding only)."""
        return self.projected_epsilon(noise, sample_rate, steps) <= target_epsilon + tolerance

    def record(self, noise: float, sample_rate: float, steps: int) -> None:
        """Book one round of `steps` DP-SGD steps (merged into the last entry as Opacus does)."""
        _check_round(noise, sample_rate, steps, PrivacyLedgerError)
        self._require_delta()
        self.history = _merged(self.history, noise, sample_rate, steps)
        self.rounds_trained += 1

    def attach(self, privacy_engine: PrivacyEngine) -> None:
        """Load this ledger's history into `privacy_engine`'s RDP accountant, before `make_private`, so that
        Opacus's own bookkeeping (and `privacy_engine.get_epsilon`) continues from the earlier rounds."""
        from opacus.accountants import RDPAccountant

        accountant = privacy_engine.accountant
        if not isinstance(accountant, RDPAccountant):
            raise PrivacyLedgerError(f"privacy engine accountant = {accountant.mechanism()!r}: the ledger holds RDP "
                                     "history; build the engine with PrivacyEngine(accountant='rdp')")
        current = [tuple(entry) for entry in accountant.history]
        if current and current != self.history:
            raise PrivacyLedgerError(f"this privacy engine already holds history {current} that is not the "
                                     f"ledger's {self.history}: attach a fresh PrivacyEngine(accountant='rdp')")
        accountant.history = list(self.history)  # a copy: Opacus appends to it in place

    def sync_from(self, privacy_engine: PrivacyEngine) -> int:
        """Take back the history of the attached `privacy_engine` after training; returns the steps it added
        (one round is counted when there are any)."""
        theirs = [(float(noise), float(rate), int(steps)) for noise, rate, steps in privacy_engine.accountant.history]
        added = _steps_added(self.history, theirs)
        if added is None:
            raise PrivacyLedgerError(f"the privacy engine's history {theirs} does not continue the ledger's "
                                     f"{self.history}: call ledger.attach(engine) before make_private, and "
                                     "sync_from the same engine after training")
        if added:
            self._require_delta()
            self.history = theirs
            self.rounds_trained += 1
        return added

    def to_record(self) -> ConfigRecord:
        """The ledger as a flwr ConfigRecord (lists of equal length, one item per accountant entry; 0.0 stands
        for a noise multiplier or δ not yet planned)."""
        return ConfigRecord({
            "mechanism": "rdp",
            "noise-multipliers": [float(e[0]) for e in self.history],
            "sample-rates": [float(e[1]) for e in self.history],
            "steps": [int(e[2]) for e in self.history],
            "planned-noise": float(self.noise_multiplier or 0.0),
            "delta": float(self.delta or 0.0),
            "rounds-trained": int(self.rounds_trained),
        })

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PrivacyLedger:
        """The ledger written by `to_record`; a missing or malformed entry raises PrivacyLedgerError naming it."""
        if not isinstance(record, Mapping):
            raise PrivacyLedgerError(f"privacy record = {type(record).__name__}: expected a ConfigRecord written by "
                                     "PrivacyLedger.to_record()")
        missing = [k for k in _RECORD_KEYS if k not in record]
        if missing:
            raise PrivacyLedgerError(f"privacy record lacks {', '.join(missing)}: it was not written by "
                                     "PrivacyLedger.to_record(); drop it to start a fresh ledger")
        if record["mechanism"] != "rdp":
            raise PrivacyLedgerError(f"privacy record mechanism = {record['mechanism']!r}: only 'rdp' is supported")

        def numbers(key: str, whole: bool = False) -> list:
            value = record[key]
            ok = isinstance(value, list) and all(
                (isinstance(v, int) and not isinstance(v, bool)) if whole else _is_number(v) for v in value)
            if not ok:
                kind = "whole numbers" if whole else "numbers"
                raise PrivacyLedgerError(f"privacy record {key} = {value!r}: expected a list of {kind}")
            return value

        noises, rates, steps = numbers("noise-multipliers"), numbers("sample-rates"), numbers("steps", whole=True)
        if not len(noises) == len(rates) == len(steps):
            raise PrivacyLedgerError(f"privacy record noise-multipliers, sample-rates and steps have lengths "
                                     f"{len(noises)}, {len(rates)}, {len(steps)}: they must be equal")
        for key in ("planned-noise", "delta"):
            if not (_is_number(record[key]) and record[key] >= 0):
                raise PrivacyLedgerError(f"privacy record {key} = {record[key]!r}: expected a number >= 0")
        rounds = record["rounds-trained"]
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise PrivacyLedgerError(f"privacy record rounds-trained = {rounds!r}: expected a whole number >= 0")
        delta = float(record["delta"]) or None
        if delta is not None and delta >= 1:
            raise PrivacyLedgerError(f"privacy record delta = {delta!r}: must be below 1")
        if steps and delta is None:
            raise PrivacyLedgerError("privacy record delta = 0.0 but the history is not empty: ε has no δ")
        history = [(float(n), float(q), int(s)) for n, q, s in zip(noises, rates, steps)]
        for noise, rate, count in history:
            try:
                _check_round(noise, rate, count, PrivacyLedgerError)
            except PrivacyLedgerError as exc:
                raise PrivacyLedgerError(f"privacy record history entry ({noise}, {rate}, {count}): {exc}") from exc
        return cls(history=history, noise_multiplier=float(record["planned-noise"]) or None, delta=delta,
                   rounds_trained=rounds)

    @classmethod
    def load(cls, state: RecordDict, key: str = DEFAULT_KEY) -> PrivacyLedger:
        """The ledger kept in a node's `context.state` under `key`, or a fresh one when there is none yet."""
        if key not in state:
            return cls()
        record = state[key]
        if not isinstance(record, ConfigRecord):
            raise PrivacyLedgerError(f"context.state[{key!r}] is a {type(record).__name__}, not the ConfigRecord "
                                     "a PrivacyLedger saves: another component uses this key; pick another key")
        return cls.from_record(record)

    def save(self, state: RecordDict, key: str = DEFAULT_KEY) -> None:
        """Keep the ledger in a node's `context.state` under `key` for the next round."""
        state[key] = self.to_record()


def dp_report(ledger: PrivacyLedger, config: DPConfig) -> dict[str, float | int]:
    """Numbers for a MetricRecord: ε spent so far with its δ, the target, the planned noise and the rounds
    trained. With DP off, ε is infinite: no guarantee holds."""
    return {
        "epsilon": ledger.epsilon() if config.enabled else math.inf,
        "delta": float(ledger.delta or config.target_delta or 0.0),
        "target_epsilon": float(config.target_epsilon),
        "noise_multiplier": float(ledger.noise_multiplier or 0.0),
        "rounds_trained": int(ledger.rounds_trained),
    }
