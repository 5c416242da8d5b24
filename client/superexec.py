"""`python -m fedcvr.client.superexec ARGS`: a merchant node's SuperExec, with ClientApp processes forked warm.

Flower's SuperExec starts a fresh `flwr-clientapp` process for every message a node receives; each one imports
torch, pandas, opacus and fedcvr's node code before it can answer (about 2-3 s on 2 cores, more while the node's
neighbours train). This module runs Flower's own SuperExec (through `fedcvr.shared.superexec`, which reaps ended
children) with one change: before the SuperExec starts, it forks a *warm parent* that imports those libraries once
and then waits. Each ClientApp process Flower asks for is forked from it, so it starts with everything imported and
runs Flower's own `flwr-clientapp` entry point with the same arguments Flower would have given the command. A
forked process is otherwise what Flower starts: one process per message, isolated from the others, with the
SuperNode's token, ended when its message is answered.

- The warm parent is single-threaded and never runs a torch operation, so forking it is safe; each child reseeds
  numpy's global generator (Python's `random` reseeds itself after a fork), so no two messages share random state.
- The warm parent ends when the SuperExec does (its pipe closes) or with the SuperNode (`--parent-pid` is honoured
  by every child as by Flower's command).
- If the warm parent is gone, or the task is not a ClientApp, Flower's own `subprocess.Popen` starts the command:
  a message is never lost to this speed-up.
- `FLWR_SUPEREXEC_TASK_POLL_INTERVAL` (Flower's: how often the SuperExec asks the SuperNode for a new task, 1 s
  by default) is set to `POLL_SECONDS` unless the environment sets it.
- Forked ClientApps retry message contents their SuperNode has not stored yet within 20-100 ms instead of Flower's
  1 s, 2 s, 4 s (`shared/object_pulls.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
from collections.abc import Sequence

from fedcvr.shared import superexec
from fedcvr.shared.object_pulls import LOCAL, faster_object_pulls
from fedcvr.shared.processes import exit_after, reap_dead_children

MODULE = "fedcvr.client.superexec"
POLL_SECONDS = "0.1"
# what a training message imports, in the order it needs them; preloaded once by the warm parent
WARM_MODULES = ("numpy", "pandas", "pyarrow", "torch", "opacus", "flwr.supernode.cli.flwr_clientapp",
                "fedcvr.client.app", "fedcvr.client.node", "fedcvr.client.secagg", "fedcvr.shared.training.local",
                "fedcvr.shared.training.prepare", "fedcvr.shared.model.prefix_cache")


def command(python: str, flower_args: list[str]) -> list[str]:
    """The command that runs `flower-superexec flower_args` through this module."""
    return [python, "-m", MODULE, *flower_args]


def _preload(modules: Sequence[str]) -> None:
    """Import `modules`; one that fails to import is left to the message that needs it (it raises there)."""
    import importlib

    for name in modules:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def _child(argv: list[str], quiet: bool) -> None:
    """In a forked child: run Flower's `flwr-clientapp` with `argv`, then leave without the parent's exit code
    (nothing it raises reaches the warm parent's loop)."""
    def run() -> None:
        if quiet:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()  # Python's random reseeds itself after fork; numpy's global does not
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        sys.argv = list(argv)
        flwr_clientapp()

    exit_after(run)


def serve(read_fd: int, modules: Sequence[str] = WARM_MODULES) -> None:
    """The warm parent: import `modules`, then fork a child for each request (one JSON line: {"argv": [...],
    "quiet": bool}) read from `read_fd`, until it closes. Never returns."""
    _preload(modules)
    faster_object_pulls(*LOCAL)
    pending = b""
    try:
        while True:
            ready, _, _ = select.select([read_fd], [], [], 1.0)
            reap_dead_children()
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    request = json.loads(line)
                    argv, quiet = [str(a) for a in request["argv"]], bool(request.get("quiet", False))
                except (ValueError, KeyError, TypeError):
                    continue
                if os.fork() == 0:
                    os.close(read_fd)
                    _child(argv, quiet)
    finally:
        os._exit(0)


class WarmLauncher:
    """Stands in for the `subprocess` module inside Flower's executor: `Popen(args, ...)` of a `flwr-clientapp`
    command forks it from the warm parent; anything else, or any failure to reach the parent, runs the real one."""

    DEVNULL = subprocess.DEVNULL

    def __init__(self, write_fd: int | None):
        self.write_fd = write_fd

    def Popen(self, args, **kwargs):  # noqa: N802 - the name Flower calls
        quiet = kwargs.get("stdout") is subprocess.DEVNULL
        if self.write_fd is not None and args and os.path.basename(str(args[0])) == "flwr-clientapp" \
                and set(kwargs) <= {"stdout", "stderr"}:
            line = json.dumps({"argv": [str(a) for a in args], "quiet": quiet}).encode() + b"\n"
            try:
                os.write(self.write_fd, line)
                return None
            except OSError:  # the warm parent is gone: from now on every message starts cold
                os.close(self.write_fd)
                self.write_fd = None
        return subprocess.Popen(args, **kwargs)


def start_warm_parent(modules: Sequence[str] = WARM_MODULES) -> tuple[int, int]:
    """Fork the warm parent; returns (its pid, the fd to write requests to)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        serve(read_fd, modules)
    os.close(read_fd)
    return pid, write_fd


def install(write_fd: int | None) -> WarmLauncher:
    """Make Flower's subprocess executor launch through a WarmLauncher writing to `write_fd`."""
    from flwr.supercore.superexec.executor import subprocess_executor

    launcher = WarmLauncher(write_fd)
    subprocess_executor.subprocess = launcher
    return launcher


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", POLL_SECONDS)
    _, write_fd = start_warm_parent()  # before any thread exists in this process
    install(write_fd)
    superexec.main(argv)


if __name__ == "__main__":
    main()
