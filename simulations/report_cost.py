"""What an experiment cost and where it ran: the cost per round of each federated setting (MB, seconds), the runs
that shared the machine with other work, the machines and the runs planned and finished."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from fedcvr.simulations.report_basics import NO_DP, SETTING_ORDER


def cost_table(table: pd.DataFrame, busy: frozenset[str] | set[str] = frozenset()) -> pd.DataFrame:
    """Per federated setting and ε: MB the coordinator sent and received per round, and seconds per round (means
    over rounds and seeds). Seconds come from the runs that had the machine to themselves when there are any
    (`busy` names the others: sharing the CPUs slows a run far beyond the share lost); `timed` says which."""
    columns = ["setting", "ε", "MB sent / round", "MB received / round", "s / round", "timed"]
    rows = table[(table.split == "validation") & (table.merchant == "all") &
                 table.metric.isin(["bytes-sent", "bytes-received", "seconds"])].copy()
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows["ε"] = rows["epsilon"].map(lambda e: NO_DP if e is None or pd.isna(e) else f"{e:g}")
    rows["_busy"] = rows["run_id"].astype(str).isin(set(busy))
    seconds = rows[rows.metric == "seconds"]
    quiet_cells = set(map(tuple, seconds.loc[~seconds["_busy"], ["setting", "ε"]].values.tolist()))
    in_quiet = [(s, e) in quiet_cells for s, e in zip(seconds["setting"], seconds["ε"])]
    timed = seconds[[not busy_ or not quiet for busy_, quiet in zip(seconds["_busy"], in_quiet)]]
    rows = pd.concat([rows[rows.metric != "seconds"], timed])
    wide = rows.pivot_table(index=["setting", "ε"], columns="metric", values="value", aggfunc="mean").reset_index()
    runs = timed.groupby(["setting", "ε"])["run_id"].nunique()

    def how(setting: str, eps: str) -> str:
        count = int(runs.get((setting, eps), 0))
        if not count:
            return ""
        return f"{count} run(s)" + ("" if (setting, eps) in quiet_cells else ", machine shared: slower")

    out = pd.DataFrame({"setting": wide["setting"], "ε": wide["ε"],
                        "MB sent / round": wide.get("bytes-sent", np.nan) / 1e6,
                        "MB received / round": wide.get("bytes-received", np.nan) / 1e6,
                        "s / round": wide.get("seconds", np.nan),
                        "timed": [how(s, e) for s, e in zip(wide["setting"], wide["ε"])]}, columns=columns)
    out["_s"] = out["setting"].map(lambda s: SETTING_ORDER.index(s) if s in SETTING_ORDER else len(SETTING_ORDER))
    out["_e"] = out["ε"].map(lambda e: -math.inf if e == NO_DP else -float(e))
    return out.sort_values(["_s", "_e"]).drop(columns=["_s", "_e"]).reset_index(drop=True)


def _planned(meta: dict, finished: int) -> str:
    """' of N planned' from the grid's description (empty when unknown), and a warning while runs are missing."""
    settings, epsilons, seeds = meta.get("settings"), meta.get("epsilons"), meta.get("seeds")
    if not settings or not epsilons or not seeds:
        return ""
    per_seed = len(epsilons) * len([s for s in settings if s != "centralized"]) + ("centralized" in settings)
    per_seed += len(meta.get("audit_epsilons") or [])
    planned = per_seed * len(seeds) + (1 if meta.get("baselines") else 0)  # the baselines run once
    missing = " (PARTLY RUN: the command below finishes it; finished runs are kept)" if finished < planned else ""
    return f" of {planned} planned{missing}"


BUSY_LOAD = 1.5  # a run alone keeps about one process per CPU busy


def _machine_text(machine: dict) -> str:
    return (f"{machine.get('cpu') or 'CPU not recorded'}, {machine.get('cpus', '?')} CPUs "
            f"({machine.get('platform', '?')}), "
            f"torch {machine.get('torch', '?')} on {machine.get('torch_threads', '?')} threads, CUDA: "
            f"{machine.get('cuda') or 'none'}")


def _records(results: Path, table: pd.DataFrame) -> dict[str, dict]:
    """Each finished run's result.json (machine, load), by run id; {} for a run without one."""
    records = {}
    for run_id in table.loc[table.metric == "wall-seconds", "run_id"].unique():
        path = results / "runs" / str(run_id) / "result.json"
        records[str(run_id)] = json.loads(path.read_text()) if path.is_file() else {}
    return records


def _load_of_busy(record: dict) -> float | None:
    """The run's mean 1-minute load when it shared the machine with other work (above BUSY_LOAD x its CPUs)."""
    load, cpus = record.get("load"), (record.get("machine") or {}).get("cpus") or 0
    return load["mean"] if load and cpus and load["mean"] > BUSY_LOAD * cpus else None


def busy_runs(results: Path, table: pd.DataFrame) -> set[str]:
    """The runs that shared the machine with other work, by their recorded load."""
    return {run_id for run_id, record in _records(results, table).items() if _load_of_busy(record) is not None}


def machines(results: Path, table: pd.DataFrame, meta: dict) -> list[str]:
    """Report lines: the machine(s) the finished runs ran on, with their runs and wall time (a grid resumed on
    another machine has runs of different speeds), from each run's result.json."""
    walls = table[table.metric == "wall-seconds"].groupby("run_id")["value"].sum()
    used: dict[str, list[str]] = {}
    busy: list[str] = []
    records = _records(results, table)
    for run_id in walls.index:
        record = records.get(str(run_id), {})
        machine = record.get("machine")
        used.setdefault(_machine_text(machine) if machine else "not recorded", []).append(str(run_id))
        load = _load_of_busy(record)
        if load is not None:
            busy.append(f"{run_id} (load {load:.1f})")
    if not used:
        sessions = meta.get("sessions", [])
        return [f"- machine: {_machine_text(sessions[-1]['machine']) if sessions else 'not recorded'}"]
    if len(used) == 1:
        lines = [f"- machine: {next(iter(used))}"]
    else:
        lines = ["- machines (the runs' wall times differ with them):"] + [
            f"  - {text}: {len(runs)} run(s), {walls[runs].sum() / 60:.1f} min" for text, runs in used.items()]
    if busy:
        lines.append(f"- ran while other work loaded the machine (mean 1-minute load above {BUSY_LOAD} x its CPUs; "
                     f"their wall times are longer than the run alone would take, and the cost table leaves them "
                     f"out where a run of the same setting and ε had the machine to itself): {', '.join(busy)}")
    return lines
