"""What an experiment records about itself: the machine's load while a run goes (`LoadSampler`), a fingerprint of
its data (so that a grid never mixes runs of different data) and its description (`experiment.json`)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from fedcvr.simulations.benchmarks.common import machine
from fedcvr.simulations.experiment_config import RESULT, Experiment, ExperimentError


class LoadSampler:
    """The machine's 1-minute load average, sampled every `every` seconds while a run runs: other work on the
    machine slows a run down, and its wall time means little without it. `summary()` -> {"mean", "max",
    "samples"} (None on a system without `os.getloadavg`)."""

    def __init__(self, every: float = 15.0):

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
