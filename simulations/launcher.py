"""`fedcvr simulate`: one federated run on one machine with `flwr run`, offline.

Plain pieces, each tested on its own: free ports, the environment and command of `flwr run`, the process scan that
finds what a run under a given FLWR_HOME left running and the stop function that ends it by PID, and the run itself
(`launch`: start, follow the round records, stop). The app and its run config: `shared/flower_app.py`; the round
records and their formatting: `shared/run_records.py`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcvr.server.follow import RUN_ID, finished, parse_status
from fedcvr.shared import deploy
from fedcvr.shared.deploy import env_for
from fedcvr.shared.flower_app import FLOWER_LOG, ROUNDS_FILE, LaunchError
from fedcvr.shared.processes import (
    die_with_parent,
    end_processes,
    interrupt_on_sigterm,
    no_interrupts,
    start_watchdog,
    stop_watchdog,
)
from fedcvr.shared.run_records import read_rounds, strip_ansi

FLWR_HOME_DIR = "flwr"
FLWR_CONFIG_TOML = """\
[superlink]
default = "local"

[superlink.local]
address = ":local:"
"""
_FLOWER_PROCESS = re.compile(r"\b(flower-superlink|flower-superexec|flwr-simulation|flwr)\b")


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
