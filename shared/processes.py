"""Processes fedcvr starts end with it, and their dead children are reaped.

- `die_with_parent()`: a Popen `preexec_fn` asking the kernel (Linux prctl PR_SET_PDEATHSIG) to signal the child
  when the process that started it ends, also when that one is killed with SIGKILL and no clean-up of its own runs.
- `reap_dead_children`: wait for every child of this process that has ended, so that none stays a zombie; a
  long-lived process whose library starts children without waiting for them (Flower's SuperExec starts one
  ClientApp process per message) runs `start_reaper`.
- `ChildGroup`: children that live and end together: SIGTERM or SIGINT of this process, or the end of any one
  of them, stops them all, each by its PID.
- `exit_after`: how a forked child (a warm ClientApp, a serving worker) runs its work and leaves.
- `start_watchdog`: a helper process in a session of its own that runs a clean-up command once this process has
  ended in any way (SIGKILL included): for what a child starts detached from us (`flwr run`'s local SuperLink).

Elsewhere than on Linux the kernel help is missing and these fall back to plain subprocess calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

PR_SET_PDEATHSIG = 1  # linux/prctl.h
REAP_SECONDS = 1.0


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A Popen `preexec_fn` (make it in the parent): the child gets `sig` when this process ends. When this
    process already ended before the child could ask, the child signals itself at once."""
    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def in_child() -> None:
        if prctl is None:
            return
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent ended between fork and prctl: the kernel will not tell us
            os.kill(os.getpid(), sig)

    return in_child


def reap_dead_children() -> list[int]:
    """Wait for each child of this process that has ended; their PIDs. Children still running are left alone."""
    reaped: list[int] = []
    while True:
        try:  # peek (WNOWAIT) at one ended child, then reap exactly that one
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no children at all
            return reaped
        if info is None or info.si_pid == 0:
            return reaped
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)
        reaped.append(info.si_pid)


def exit_after(function: Callable[[], object]) -> NoReturn:
    """In a forked child: run `function`, then leave without the parent's exit handlers (`os._exit`), with 0 when
    it returns, the code of its `sys.exit` (None 0, a number that number, anything else 1), or 1 after any other
    exception (its traceback printed first)."""
    code = 1
    try:
        function()
        code = 0
    except SystemExit as end:
        code = 0 if end.code is None else end.code if isinstance(end.code, int) else 1
    except BaseException:  # noqa: BLE001 - shown, then the child ends with a failure
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def start_reaper(every: float = REAP_SECONDS) -> threading.Thread:
    """A daemon thread that reaps this process's ended children every `every` seconds. Only for a process whose
    code never waits on its own children (a child reaped here reads as exit code 0 to a later `Popen.wait`)."""
    def loop() -> None:
        while True:
            reap_dead_children()
            time.sleep(every)

    thread = threading.Thread(target=loop, name="reap-children", daemon=True)
    thread.start()
    return thread


class ChildGroup:
    """Children started together that end together.

    Inside `with ChildGroup() as group:` SIGTERM and SIGINT stop every child (SIGTERM, then SIGKILL after
    `grace` seconds) and make `wait` return; every child also gets SIGTERM from the kernel when this process ends
    (`die_with_parent`). `wait` returns when the first child ends, and leaving the block stops the others."""

    def __init__(self, grace: float = 10.0):
        self.grace = grace
        self.children: list[subprocess.Popen] = []
        self.signalled: int | None = None
        self._previous: dict[int, object] = {}

    def start(self, argv: Sequence[str], **popen: object) -> subprocess.Popen:
        child = subprocess.Popen(list(argv), preexec_fn=die_with_parent(), **popen)  # noqa: PLW1509
        self.children.append(child)
        return child

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signalled = signum

    def __enter__(self) -> ChildGroup:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def wait(self, poll: float = 0.2) -> int:
        """Block until a child ends or this process gets SIGTERM/SIGINT; the exit code of that child, or
        128 + the signal's number."""
        while True:
            for child in self.children:
                if child.poll() is not None:
                    return child.returncode if child.returncode >= 0 else 128 - child.returncode
            if self.signalled is not None:
                return 128 + self.signalled
            time.sleep(poll)

    def stop(self) -> None:
        """SIGTERM to every child still running, SIGKILL to those alive after `grace` seconds; all waited for."""
        end_processes(self.children, self.grace)


def end_processes(processes: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM to each of `processes` still running, SIGKILL to those alive `grace` seconds later; all waited for
    (none is left a zombie)."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def end_session(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
    """Stop a process started in a session of its own (`start_new_session=True`) with everything it started: `sig`
    to its process group (whose id is its PID), SIGKILL to the group if it has not ended `grace` seconds later, and
    SIGKILL again once it has, for children that outlive their leader (a SuperNode's ClientApp)."""
    for signal_number in (sig, signal.SIGKILL):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        break


def start_watchdog(cleanup: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cleanup` in a session of its own with a pipe from this process on its standard input. The command
    first reads its input to the end, which comes when this process ends in any way (the write end is never
    inherited by other children), then does its clean-up. Keep the returned Popen for the life of this process;
    `stop_watchdog` ends it normally."""
    return subprocess.Popen(list(cleanup), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)


def stop_watchdog(watchdog: subprocess.Popen, timeout: float = 30.0) -> None:
    """Let the watchdog run its clean-up now (its input ends) and wait for it."""
    with contextlib.suppress(OSError):
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


@contextlib.contextmanager
def watchdog(cleanup: Sequence[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`start_watchdog` for the duration of the block; on leaving it the clean-up runs and is waited for."""
    guard = start_watchdog(cleanup, env)
    try:
        yield guard
    finally:
        stop_watchdog(guard)


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt like Ctrl-C, so that `finally` clean-up runs (main thread
    only: elsewhere signals cannot be handled and the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Clean-up that a second Ctrl-C or a SIGTERM must not cut short (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
