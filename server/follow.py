"""`fedcvr coordinator run` once the run is launched: follow it at the coordinator's SuperLink to its end, and stop
it when giving up, so that no run goes on that nobody follows.

`flwr run --stream` prints the run's log while it runs, but the stream can end before the run does (seen on a
busy machine: `coordinator run` exited while the run went on for 9 minutes). When it does, `run_to_end` asks the
run's status (`flwr ls`) and reads rounds.jsonl until the run has finished. When `coordinator run` gives up
instead (Ctrl-C, SIGTERM or its own `--timeout`) it stops the run (`flwr stop RUN_ID`); when that fails, the
outcome carries the exact command to stop it by hand (`deploy.stop_hint`).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedcvr.shared.processes import die_with_parent, end_processes, interrupt_on_sigterm, no_interrupts
from fedcvr.shared.run_records import strip_ansi

from .deploy import status_command, stop_command

RUN_ID = re.compile(r"Successfully started run (\d+)")
FOLLOW_SECONDS = 5.0
INTERRUPTED = "interrupted"


@dataclass
class Outcome:
    """How a followed run ended. `status` is the SuperLink's ("finished:completed", ...); `gave_up` says why
    `coordinator run` stopped following (None: it followed to the end); `stopped` whether `flwr stop` worked and
    `stop_output` what it said."""

    run_id: str | None = None
    status: str | None = None
    details: str = ""
    gave_up: str | None = None
    stopped: bool = False
    stop_output: str = ""
    stream_ended_early: bool = False


def finished(status: str | None) -> bool:
    return (status or "").startswith("finished")


def parse_status(done: subprocess.CompletedProcess) -> tuple[str | None, str]:
    """(status, status details) from the output of `flwr ls --run-id ID --format json`; (None, why) when it
    holds no run."""
    try:
        run = json.loads(done.stdout)["runs"][0]
        return str(run.get("status")), str(run.get("status-details") or "")
    except (ValueError, KeyError, IndexError, TypeError):
        return None, f"`flwr ls` gave no status (exit code {done.returncode}): {strip_ansi(done.stdout + done.stderr)}"


def run_status(bin_dir: Path, env: Mapping[str, str], run_id: str) -> tuple[str | None, str]:
    """(status, status details) of the run at the coordinator's SuperLink; (None, why) when it gave no answer."""
    try:
        done = subprocess.run(status_command(bin_dir, run_id), env=dict(env), capture_output=True, text=True,
                              timeout=60, check=False)
    except (subprocess.TimeoutExpired, OSError) as err:
        return None, f"`flwr ls` gave no status ({type(err).__name__})"
    return parse_status(done)


def stop_run(bin_dir: Path, env: Mapping[str, str], run_id: str) -> tuple[bool, str]:
    """Stop the run at the SuperLink with `flwr stop RUN_ID`; (whether it worked, what flwr said)."""
    try:
        done = subprocess.run(stop_command(bin_dir, run_id), env=dict(env), capture_output=True, text=True,
                              timeout=60, check=False)
    except (subprocess.TimeoutExpired, OSError) as err:
        return False, f"{type(err).__name__}: {err}"
    output = strip_ansi(done.stdout + done.stderr).strip()
    return done.returncode == 0, output


def _new_rounds(path: Path, offset: int) -> tuple[list[int], int]:
    """Round numbers of the complete lines appended to rounds.jsonl after `offset`, and the offset to go on from."""
    try:
        data = path.read_bytes()[offset:]
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    rounds = []
    for line in data[:end].splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            rounds.append(int(json.loads(line).get("round")))
    return rounds, offset + end


def run_to_end(command: list[str], env: Mapping[str, str], bin_dir: Path, log_path: Path, rounds_path: Path, *,
               on_line: Callable[[str], None], on_note: Callable[[str], None], timeout: float | None = None,
               every: float | None = None) -> Outcome:
    """Run `flwr run ... --stream` (`command`), copying its output into `log_path` and each line (colours
    removed) to `on_line`; when the stream ends while the run still runs, follow the run's status and rounds
    (`on_note`) until it has finished. Past `timeout` seconds, on Ctrl-C or on SIGTERM, give up and stop the run.
    `flwr run` dies with this process (PR_SET_PDEATHSIG)."""
    every = FOLLOW_SECONDS if every is None else every
    outcome = Outcome()
    deadline = None if timeout is None else time.monotonic() + timeout
    limit = f"no end within --timeout {timeout:g} s" if timeout is not None else ""
    try:
        with interrupt_on_sigterm():
            _stream(command, env, log_path, outcome, on_line, deadline, limit)
            if outcome.gave_up is None and outcome.run_id is not None:
                outcome.status, outcome.details = run_status(bin_dir, env, outcome.run_id)
                if outcome.status is not None and not finished(outcome.status):
                    outcome.stream_ended_early = True
                    on_note(f"flwr's stream ended while run {outcome.run_id} is {outcome.status} at the SuperLink: "
                            "following it until it ends (Ctrl-C stops it)")
                    _follow(bin_dir, env, rounds_path, outcome, on_note, deadline, every, limit)
    except KeyboardInterrupt:
        outcome.gave_up = INTERRUPTED
    if outcome.gave_up is not None and outcome.run_id is not None:
        with no_interrupts():
            outcome.stopped, outcome.stop_output = stop_run(bin_dir, env, outcome.run_id)
            outcome.status, outcome.details = run_status(bin_dir, env, outcome.run_id)
    return outcome


def _stream(command: list[str], env: Mapping[str, str], log_path: Path, outcome: Outcome,
            on_line: Callable[[str], None], deadline: float | None, limit: str) -> None:
    process = subprocess.Popen(command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, preexec_fn=die_with_parent())  # noqa: PLW1509

    def time_up() -> None:
        outcome.gave_up = limit
        end_processes([process])

    timer = None if deadline is None else threading.Timer(max(0.0, deadline - time.monotonic()), time_up)
    try:
        if timer is not None:
            timer.daemon = True
            timer.start()
        with log_path.open("ab") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                text = strip_ansi(line.decode("utf-8", "replace")).rstrip()
                if outcome.run_id is None and (match := RUN_ID.search(text)):
                    outcome.run_id = match.group(1)
                on_line(text)
    finally:
        if timer is not None:
            timer.cancel()
        end_processes([process])


def _follow(bin_dir: Path, env: Mapping[str, str], rounds_path: Path, outcome: Outcome,
            on_note: Callable[[str], None], deadline: float | None, every: float, limit: str) -> None:
    _, offset = _new_rounds(rounds_path, 0)
    while not finished(outcome.status):
        if deadline is not None and time.monotonic() >= deadline:
            outcome.gave_up = limit
            return
        time.sleep(every)
        status, details = run_status(bin_dir, env, str(outcome.run_id))
        if status is not None:
            outcome.status, outcome.details = status, details
        rounds, offset = _new_rounds(rounds_path, offset)
        for number in rounds:
            on_note(f"round {number} done (see {rounds_path})")
