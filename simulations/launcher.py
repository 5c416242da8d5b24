"""`fedcvr simulate`: one federated run on one machine with `flwr run`, offline.

Plain pieces, each tested on its own: finding the Flower App, building and writing the run config overrides,
free ports, the process scan that finds what a run under a given FLWR_HOME left running and the stop function
that ends it by PID, reading the round records the ServerApp writes, and writing/formatting the history.

Contract with the ServerApp (it writes into the run config's `out-dir`, which is the run folder):
  * after each finished round it appends one JSON object and a newline to `rounds.jsonl`, e.g.
    {"round": 1, "seconds": 12.3, "ctcvr.auc": 0.61, "click.auc": 0.66, "ctcvr.gauc": 0.58,
     "ctcvr.logloss": 0.05, "ndcg@10": 0.21, "max-epsilon": 1.9, "delta": 1e-05, "bytes-sent": 123456,
     "bytes-received": 123456, "nodes-trained": 3, "nodes-declined": 0}
    ("round" is a whole number from 1; any other key is optional and may be null; keys are kebab-case, and the
    launcher also reads them spelt with _ for -, as in "max_epsilon"; "max-epsilon" and "delta" are the largest ε
    and the largest δ of any node so far, a pair that every node's guarantee meets);
  * at the end it writes `history.json`: a JSON list of those objects.
The launcher reads `rounds.jsonl` while the run goes (a last line without its newline is still being written
and is read on a later poll), and writes `history.csv` from `history.json`, or from `rounds.jsonl` when the
server wrote no history.json.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcvr.server.follow import RUN_ID, finished, parse_status, strip_ansi
from fedcvr.shared import deploy
from fedcvr.shared.deploy import env_for
from fedcvr.shared.processes import (
    die_with_parent,
    end_processes,
    interrupt_on_sigterm,
    no_interrupts,
    start_watchdog,
    stop_watchdog,
)

ROUNDS_FILE = "rounds.jsonl"
HISTORY_FILE = "history.json"
HISTORY_CSV = "history.csv"
RUN_CONFIG_FILE = "run-config.toml"
FLOWER_LOG = "flower.log"
FLWR_HOME_DIR = "flwr"
STRATEGIES = ("fedavg", "fedprox", "fedadam")
FLWR_CONFIG_TOML = """\
[superlink]
default = "local"

[superlink.local]
address = ":local:"
"""
# Keys `fedcvr simulate` always sets itself: the app must declare them and --run-config may not set them.
FIXED_KEYS = {"data-root": "--data/--merchants", "out-dir": "--out", "num-server-rounds": "--rounds",
              "min-nodes": "the number of merchant folders"}
_FLOWER_PROCESS = re.compile(r"\b(flower-superlink|flower-superexec|flwr-simulation|flwr)\b")
_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


class LaunchError(ValueError):
    """A problem with the inputs of a simulation, found before Flower starts; the text names the fix."""


# ---------------------------------------------------------------- the Flower App


PACKAGED_APP = "flower-app"  # the Flower App a wheel carries inside the fedcvr package (setup.py writes it)


def _app_problem(folder: Path) -> str | None:
    """Why `folder` is not the fedcvr Flower App, or None when it is."""
    pyproject = folder / "pyproject.toml"
    if not pyproject.is_file():
        return f"no pyproject.toml in {folder}"
    try:
        config = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        return f"{pyproject} cannot be read as TOML ({err})"
    if not isinstance(config.get("tool", {}).get("flwr", {}).get("app"), dict):
        return f"{pyproject} has no [tool.flwr.app] section, so {folder} is not the fedcvr Flower App"
    return None


def find_app_dir(package_file: str | Path | None = None) -> Path:
    """The folder of the fedcvr Flower App: the one holding the pyproject.toml with `[tool.flwr.app]` next to
    the `fedcvr` package (the repository root for an editable install), else the copy a wheel installs inside
    the package (`fedcvr/flower-app/`)."""
    if package_file is None:
        import fedcvr

        package_file = fedcvr.__file__
    package = Path(package_file).resolve().parent
    problems = []
    for folder in (package.parent, package / PACKAGED_APP):
        problem = _app_problem(folder)
        if problem is None:
            return folder
        problems.append(problem)
    raise LaunchError("; ".join(problems) + ". The fedcvr Flower App travels with fedcvr: install fedcvr from its "
                      "repository (`pip install -e .` or `make install`) or from a wheel built from it "
                      "(`pip wheel . --no-deps`), not by copying its folders.")


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"dp": {"enabled": true}} -> {"dp.enabled": true}, the way flwr flattens run configs."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def app_run_config(app_dir: Path) -> dict[str, Any]:
    """The app's default run config (`[tool.flwr.app.config]`, flattened): the keys `flwr run` accepts."""
    config = tomllib.loads((app_dir / "pyproject.toml").read_text())
    return flatten(config["tool"]["flwr"]["app"].get("config", {}))


def defaults_with(overrides: str, **fixed: Any) -> dict[str, Any]:
    """This app's default run config with `fixed` keys and then the --run-config text `overrides` on top: the run
    config the in-process research scripts use."""
    return {**app_run_config(find_app_dir()), **fixed, **parse_run_config(overrides)}


def packed_into_app(app_dir: Path, path: Path) -> bool:
    """Whether files written under `path` would be packed into the app bundle (FAB) by `flwr run app_dir`: true
    when `path` lies inside the app folder and its .gitignore does not exclude it."""
    try:
        relative = path.resolve().relative_to(app_dir.resolve())
    except ValueError:
        return False
    if not relative.parts:
        return True
    probe = (relative / "history.json").as_posix()
    gitignore = app_dir / ".gitignore"
    try:
        from flwr.cli.utils import filter_paths_for_publish

        with warnings.catch_warnings():  # pathspec's deprecation of the pattern name flwr uses
            warnings.simplefilter("ignore", DeprecationWarning)
            kept = filter_paths_for_publish({probe: b"", "pyproject.toml": b"",
                                             ".gitignore": gitignore.read_bytes() if gitignore.is_file() else b""})
        return probe in kept
    except Exception:  # noqa: BLE001 - a different flwr: fall back to a plain .gitignore check
        import pathspec

        lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return not pathspec.PathSpec.from_lines("gitwildmatch", lines).match_file(probe)


# ---------------------------------------------------------------- the run config


def parse_run_config(text: str) -> dict[str, Any]:
    """Parse --run-config "k=v k2='text' dp.enabled=false": space-separated key=value pairs, values as TOML
    (numbers, true/false, text in single or double quotes)."""
    pairs: dict[str, Any] = {}
    pattern = re.compile(r"""\s*([^=\s]+)=('[^']*'|"(?:[^"\\]|\\.)*"|[^\s'"]\S*)(?=\s|$)""")
    position, text = 0, text.strip()
    while position < len(text):
        match = pattern.match(text, position)
        if match is None:
            rest = text[position:].strip()
            raise LaunchError(f"--run-config: cannot read {rest!r}: write key=value pairs separated by spaces, "
                              "with text in quotes, e.g. --run-config \"round-timeout=120 model.encoder='/models/x'\"")
        key, raw = match.group(1), match.group(2)
        if not _KEY.fullmatch(key):
            raise LaunchError(f"--run-config: {key!r} is not a run config key (letters, digits, - and _, "
                              "sections joined by dots, e.g. train.lr)")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            hint = f"; text goes in quotes: {key}='{raw}'" if re.fullmatch(r"[^'\"]+", raw) else ""
            raise LaunchError(f"--run-config: {key}={raw} is not a number, true/false or quoted text{hint}") from None
        if not isinstance(value, bool | int | float | str):
            raise LaunchError(f"--run-config: {key}={raw} is not a number, true/false or quoted text (a run "
                              "config holds no lists or tables)")
        if key in pairs:
            raise LaunchError(f"--run-config sets {key} twice")
        pairs[key] = value
        position = match.end()
    return pairs


@dataclass(frozen=True)
class Setting:
    """One run config override: `option` names the command-line option that asked for it (None: implied)."""

    key: str
    value: Any
    option: str | None = None


def _unknown_key(key: str, declared: Iterable[str], app_dir: Path, how: str) -> LaunchError:
    close = difflib.get_close_matches(key, list(declared), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return LaunchError(f"{how} sets `{key}`, but the Flower App in {app_dir} does not declare it in "
                       f"[tool.flwr.app.config] of its pyproject.toml, and flwr refuses run config keys the app "
                       f"does not declare.{hint}")


def build_run_config(declared: Mapping[str, Any], app_dir: Path, settings: Iterable[Setting],
                     extra: Mapping[str, Any], fixed: Mapping[str, str] | None = None,
                     command: str = "fedcvr simulate") -> tuple[dict[str, Any], list[str]]:
    """The overrides to pass to `flwr run` and notes for the user.

    `settings` come from the command's options (FIXED_KEYS among them); `extra` from --run-config. A key the app
    does not declare is an error when an option or --run-config asks for it and is left out with a note when it
    is only implied (a default of `fedcvr simulate`). --run-config may replace implied values, not the fixed keys
    (`fixed`: key -> the option that sets it; FIXED_KEYS for `command` = simulate) and not values that an option
    sets explicitly."""
    fixed = FIXED_KEYS if fixed is None else fixed
    overrides: dict[str, Any] = {}
    notes: list[str] = []
    explicit: dict[str, str] = {}
    for setting in settings:
        if setting.key not in declared:
            if setting.key in fixed:
                raise LaunchError(f"the Flower App in {app_dir} does not declare `{setting.key}` in "
                                  f"[tool.flwr.app.config]; `{command}` needs it to run the app")
            if setting.option is not None:
                raise _unknown_key(setting.key, declared, app_dir, setting.option)
            notes.append(f"the Flower App does not declare `{setting.key}`: left out (it would have been "
                         f"{format_toml_value(setting.value)})")
            continue
        overrides[setting.key] = setting.value
        if setting.option is not None or setting.key in fixed:
            explicit[setting.key] = setting.option or fixed[setting.key]
    for key, value in extra.items():
        if key in fixed:
            raise LaunchError(f"--run-config may not set `{key}`: `{command}` sets it from "
                              f"{fixed[key]}")
        if key in explicit:
            raise LaunchError(f"--run-config sets `{key}`, which {explicit[key]} sets too: use one of them")
        if key not in declared:
            raise _unknown_key(key, declared, app_dir, "--run-config")
        overrides[key] = value
    return overrides, notes


def _toml_key(key: str) -> str:
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else json.dumps(p) for p in key.split("."))


def format_toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    raise TypeError(f"a run config value is a bool, number or text, not {type(value).__name__}: {value!r}")


def run_config_toml(overrides: Mapping[str, Any]) -> str:
    """TOML text of flat, dotted run config keys, read back by flwr (and tomllib) as the same flat keys."""
    lines = ["# Run config overrides written by `fedcvr simulate` and passed to `flwr run --run-config`."]
    lines += [f"{_toml_key(k)} = {format_toml_value(v)}" for k, v in overrides.items()]
    return "\n".join(lines) + "\n"


def write_run_config(path: Path, overrides: Mapping[str, Any]) -> Path:
    text = run_config_toml(overrides)
    try:
        same = flatten(tomllib.loads(text)) == dict(overrides)
    except tomllib.TOMLDecodeError:  # e.g. a key that is also the section of another key
        same = False
    if not same:
        raise LaunchError(f"the run config overrides cannot be written as TOML without changing them: {overrides}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- ports, environment, command


def free_ports(count: int = 1) -> list[int]:
    """`count` different TCP ports on 127.0.0.1 that were free a moment ago (held open together while picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def flwr_env(flwr_home: Path, bin_dir: Path, base: Mapping[str, str] | None = None,
             ports: tuple[int, int] | None = None) -> dict[str, str]:
    """The environment of `flwr`: our own FLWR_HOME and a local SuperLink of our own on free ports (without them
    flwr reuses any SuperLink on the default ports), offline, no dependency installation."""
    env = env_for(flwr_home, bin_dir, base)  # flwr starts `flower-superlink` from PATH
    http_port, control_port = ports or free_ports(2)
    env.update({"HF_HUB_OFFLINE": "1", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
                "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)})
    return env


def flwr_run_command(bin_dir: Path, app_dir: Path, nodes: int, config_file: Path) -> list[str]:
    return [str(bin_dir / "flwr"), "run", str(app_dir), "--stream",
            "--federation-config", f"num-supernodes={nodes} client-resources-num-cpus=1",
            "--run-config", str(config_file)]


def prepare_flwr_home(flwr_home: Path) -> Path:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(FLWR_CONFIG_TOML)
    return flwr_home


# ---------------------------------------------------------------- processes of a run


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended, or is not ours
        return b""


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after "pid (comm)": state ppid pgrp session ..."""
    return _read(Path(f"/proc/{pid}/stat")).decode(errors="replace").rpartition(")")[2].split()


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def ancestors(pid: int | None = None) -> set[int]:
    """`pid` (default: this process) and its parents up to PID 1."""
    found, current = set(), os.getpid() if pid is None else pid
    while current > 1 and current not in found:
        found.add(current)
        fields = _stat(current)
        current = int(fields[1]) if len(fields) > 1 else 0
    return found


def processes_of(flwr_home: Path) -> dict[int, str]:
    """Running processes of the run under `flwr_home` (PID -> command line): those with FLWR_HOME=<flwr_home>
    in their environment (flwr passes its environment to the SuperLink, and that to everything it starts), or
    a SuperLink with a path under `flwr_home` in its command line (--log-file, --database). This process
    and its parents are never listed (a shell that exported the same FLWR_HOME is not part of the run)."""
    marker_env = f"FLWR_HOME={flwr_home}".encode()
    marker_cmd = f"{flwr_home}{os.sep}".encode()
    skip = ancestors()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in skip:
            continue
        cmdline = _read(proc / "cmdline")
        if (marker_cmd in cmdline and b"flower-superlink" in cmdline) \
                or marker_env in _read(proc / "environ").split(b"\0"):
            if alive(int(proc.name)):
                found[int(proc.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def stop_processes(flwr_home: Path, grace: float = 10.0) -> list[int]:
    """Stop everything the run under `flwr_home` left running, by PID: the processes `processes_of` finds and
    every process in the sessions that Flower processes among them lead (flwr starts the SuperLink with
    start_new_session=True, the SuperLink its SuperExec likewise, and that the simulation and Ray). SIGTERM
    first, SIGKILL to those still alive after `grace` seconds. Returns the PIDs that were signalled."""
    signalled: set[int] = set()
    for _ in range(3):  # again, for anything started while the first ones were stopping
        targets = _run_processes(flwr_home) - signalled
        if not targets:
            break
        signalled |= targets
        _terminate(targets, grace)
    return sorted(signalled)


def _run_processes(flwr_home: Path) -> set[int]:
    own = processes_of(flwr_home)
    leaders = {pid for pid, cmd in own.items() if _FLOWER_PROCESS.search(cmd)
               and len(fields := _stat(pid)) > 3 and int(fields[3]) == pid}
    targets = set(own)
    if leaders:
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and len(fields := _stat(int(proc.name))) > 3 and int(fields[3]) in leaders:
                targets.add(int(proc.name))
    return {pid for pid in targets - ancestors() if alive(pid)}


def watchdog_command(flwr_home: Path) -> list[str]:
    """The watchdog of a run (`shared.processes.start_watchdog`): once the launching process has ended in any way,
    SIGKILL included, it stops what the run under `flwr_home` left running (`flwr run` starts its SuperLink in a
    session of its own, which a signal to our process group does not reach)."""
    code = ("import sys\nfrom pathlib import Path\nfrom fedcvr.simulations.launcher import stop_processes\n"
            "sys.stdin.buffer.read()\nstop_processes(Path(sys.argv[1]))\n")
    return [sys.executable, "-c", code, str(flwr_home)]


def _terminate(targets: set[int], grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in sorted(p for p in targets if alive(p)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in targets):
            time.sleep(0.1)
        if not any(alive(p) for p in targets):
            return


# ---------------------------------------------------------------- round records


def _parse_record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_rounds(path: Path, offset: int = 0, final: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Round records appended to `path` (JSON lines) after byte `offset`, and the offset to read on from.

    Only complete lines (ending in a newline) are read: a last line without one is still being written and is
    left for the next call, unless `final` (the writer is done), when it is read if it parses. Lines that are not
    a JSON object are skipped."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    complete, rest = data[:end], data[end:]
    records = [r for line in complete.splitlines() if line.strip() and (r := _parse_record(line)) is not None]
    if final and rest.strip() and (record := _parse_record(rest)) is not None:
        records.append(record)
        end = len(data)
    return records, offset + end


def _by_round(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per round (the last one written wins), in round order."""
    latest: dict[Any, dict[str, Any]] = {}
    for record in records:
        latest[record.get("round", len(latest) + 1)] = record
    return sorted(latest.values(), key=lambda r: (not isinstance(r.get("round"), int), r.get("round", 0)))


def load_history(run_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The round records of a finished run and the file they came from: history.json when it is a JSON list of
    objects, else rounds.jsonl; ([], None) when there is neither."""
    history = run_dir / HISTORY_FILE
    if history.is_file():
        try:
            records = json.loads(history.read_text())
        except ValueError:
            records = None
        if isinstance(records, list) and all(isinstance(r, dict) for r in records):
            return _by_round(records), HISTORY_FILE
    rounds = run_dir / ROUNDS_FILE
    if rounds.is_file():
        return _by_round(read_rounds(rounds, final=True)[0]), ROUNDS_FILE
    return [], None


def write_history_csv(records: list[dict[str, Any]], path: Path) -> Path:
    """One row per round, "round" first, then every other key in the order first seen (nested objects are
    flattened to dotted columns; missing and null values are empty cells)."""
    import csv

    rows = [flatten(r) for r in records]
    columns = ["round"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else
                             json.dumps(row[c]) if isinstance(row[c], list) else row[c] for c in columns])
    return path


# ---------------------------------------------------------------- formatting

TABLE_COLUMNS = ("round", "ctcvr.auc", "click.auc", "ctcvr.gauc", "ctcvr.logloss", "ndcg@10", "max ε (max δ)",
                 "MB sent / received", "seconds")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def format_metric(value: Any, digits: int = 4) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.{digits}f}"


def format_epsilon(epsilon: Any, delta: Any = None) -> str:
    """"1.93 (δ=1e-05)"; "∞" when no finite guarantee holds; "n/a" when the round reports none (DP off)."""
    number = _number(epsilon)
    if number is None:
        return "n/a"
    text = "∞" if math.isinf(number) else f"{number:.2f}"
    delta = _number(delta)
    return text if delta is None else f"{text} (δ={delta:.3g})"


def format_megabytes(sent: Any, received: Any) -> str:
    sent, received = _number(sent), _number(received)
    if sent is None and received is None:
        return "n/a"
    return " / ".join("n/a" if b is None else f"{b / 1e6:.2f}" for b in (sent, received))


def field_of(record: Mapping[str, Any], name: str) -> Any:
    """`record[name]`, also when the server spells it with - for _ or the other way round (max-epsilon)."""
    for key in (name, name.replace("_", "-"), name.replace("-", "_")):
        if key in record:
            return record[key]
    return None


def round_cells(record: Mapping[str, Any]) -> list[str]:
    """The cells of one round's row, in TABLE_COLUMNS order."""
    seconds = _number(field_of(record, "seconds"))
    # purchase logs rank each shopper's next basket (nb.all.ndcg@10) where impression logs rank each purchase
    ndcg = record.get("ndcg@10", record.get("nb.all.ndcg@10"))
    return [str(record.get("round", "?")),
            *(format_metric(record.get(k)) for k in ("ctcvr.auc", "click.auc", "ctcvr.gauc", "ctcvr.logloss")),
            format_metric(ndcg),
            format_epsilon(field_of(record, "max_epsilon"), field_of(record, "delta")),
            format_megabytes(field_of(record, "bytes_sent"), field_of(record, "bytes_received")),
            "n/a" if seconds is None else f"{seconds:.1f}"]


def rounds_table(records: list[dict[str, Any]], title: str = "Federated rounds"):
    from rich.table import Table

    table = Table(title=title)
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="right")
    for record in records:
        table.add_row(*round_cells(record))
    table.caption = ("metrics of the global model on the nodes' held-out data after each round, as the ServerApp "
                     "reports them; max ε (max δ): the largest ε and the largest δ of any node so far, so every "
                     "node's training is (ε, δ)-DP within that pair; MB: 10^6 bytes of "
                     "model weights sent to / received from the nodes")
    return table


def progress_text(record: Mapping[str, Any] | None) -> str:
    """What the progress line shows after a round: its ctcvr.auc and the worst (ε, δ) of any node."""
    if record is None:
        return "waiting for round 1"
    return (f"ctcvr.auc {format_metric(record.get('ctcvr.auc'))}  "
            f"max ε {format_epsilon(field_of(record, 'max_epsilon'), field_of(record, 'delta'))}")


def privacy_line(records: Iterable[Mapping[str, Any]]) -> str:
    """The run's privacy in one line: the largest ε and the largest δ of any node over all rounds (ε adds up on
    each node, so the largest of any round is the largest spent), the pair every node's guarantee meets."""
    epsilons = [e for r in records if (e := _number(field_of(r, "max_epsilon"))) is not None]
    deltas = [d for r in records if (d := _number(field_of(r, "delta"))) is not None]
    if not epsilons:
        return "privacy: no node reported ε (DP off): no privacy guarantee"
    if not deltas or math.isinf(max(epsilons)):
        return f"privacy: max ε {format_epsilon(max(epsilons))}: no finite guarantee"
    return (f"privacy: every node's training is ({max(epsilons):.2f}, {max(deltas):.3g})-DP or better for the "
            "whole run (the largest ε and the largest δ of any node)")


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(strip_ansi(text).splitlines()[-lines:])


# ---------------------------------------------------------------- the run


@dataclass
class RunOutcome:
    """How `flwr run` ended: `status` is the run's status in the SuperLink ("finished:completed", ...)."""

    returncode: int | None = None
    run_id: str | None = None
    status: str | None = None
    details: str = ""
    timed_out: bool = False
    seconds: float = 0.0
    stopped: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed" and not self.timed_out


def run_status(bin_dir: Path, env: Mapping[str, str], run_id: str, cwd: Path,
               wait: float = 15.0) -> tuple[str | None, str]:
    """The run's (status, status-details) from `flwr ls --run-id ID --format json`, asked until it is finished
    (at most `wait` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        done = subprocess.run([str(bin_dir / "flwr"), "ls", "--run-id", run_id, "--format", "json"], env=dict(env),
                              cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
        status, details = parse_status(done)
        if finished(status) or time.monotonic() >= deadline:
            return status, details
        time.sleep(0.5)


def _copy_output(stream, log_path: Path, found: dict[str, str]) -> None:
    with log_path.open("w") as log:
        for line in iter(stream.readline, ""):
            line = strip_ansi(line)
            log.write(line)
            log.flush()
            if "run_id" not in found and (match := RUN_ID.search(line)):
                found["run_id"] = match.group(1)


def launch(run_dir: Path, app_dir: Path, nodes: int, config_file: Path, *,
           on_round: Callable[[dict[str, Any]], None] = lambda record: None, timeout: float | None = None,
           poll: float = 0.5, bin_dir: Path | None = None) -> RunOutcome:
    """Run `flwr run app_dir --stream` as a simulation of `nodes` nodes with the overrides in `config_file`,
    FLWR_HOME = run_dir/flwr and flwr's output in run_dir/flower.log; call `on_round` with each record the server
    appends to run_dir/rounds.jsonl. Whatever happens (failure, timeout, Ctrl-C), everything the run started is
    stopped by PID before this returns or raises."""
    bin_dir = bin_dir or deploy.flwr_bin_dir()
    if not Path("/proc/self/environ").exists():
        raise LaunchError("`fedcvr simulate` finds the processes of its local SuperLink in /proc to stop them "
                          "afterwards, and this system has no /proc: run it on Linux")
    flwr_home = prepare_flwr_home(run_dir / FLWR_HOME_DIR)
    leftover = processes_of(flwr_home)
    if leftover:
        listed = "; ".join(f"{pid}: {cmd[:100]}" for pid, cmd in sorted(leftover.items()))
        raise LaunchError(f"processes of an earlier run under {flwr_home} are still running ({listed}); wait for "
                          "that run to end, or stop them by PID, or choose another --out")
    env = flwr_env(flwr_home, bin_dir)
    outcome, found, offset = RunOutcome(), {}, 0
    started = time.monotonic()
    process = copier = None
    guard = start_watchdog(watchdog_command(flwr_home))  # stops the run's processes if this one is killed
    try:
        with interrupt_on_sigterm():
            process = subprocess.Popen(flwr_run_command(bin_dir, app_dir, nodes, config_file), env=env, cwd=run_dir,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, errors="replace", bufsize=1,
                                       preexec_fn=die_with_parent())  # noqa: PLW1509
            copier = threading.Thread(target=_copy_output, args=(process.stdout, run_dir / FLOWER_LOG, found),
                                      daemon=True)
            copier.start()
            while True:
                finished = process.poll() is not None
                records, offset = read_rounds(run_dir / ROUNDS_FILE, offset, final=finished)
                for record in records:
                    on_round(record)
                if finished:
                    break
                if timeout is not None and time.monotonic() - started > timeout:
                    outcome.timed_out = True
                    outcome.details = f"the run did not finish within --timeout {timeout:g} s"
                    break
                time.sleep(poll)
            outcome.returncode = process.poll()
            if not outcome.timed_out:
                copier.join(timeout=10)
                outcome.run_id = found.get("run_id")
                if outcome.run_id is None:
                    outcome.details = (f"`flwr run` exited with code {outcome.returncode} without starting a run "
                                       f"(see {run_dir / FLOWER_LOG} and {flwr_home}/local-superlink/superlink.log)")
                else:
                    outcome.status, outcome.details = run_status(bin_dir, env, outcome.run_id, run_dir)
    finally:
        with no_interrupts():
            if process is not None:
                end_processes([process])
            outcome.stopped = stop_processes(flwr_home)
            stop_watchdog(guard)
            if copier is not None:
                copier.join(timeout=5)
            outcome.run_id = outcome.run_id or found.get("run_id")
        outcome.seconds = time.monotonic() - started
    return outcome
