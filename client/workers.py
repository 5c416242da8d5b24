"""`fedcvr serve --workers N`: one loaded recommender, N worker processes answering on one port.

A request's scoring is Python and numpy work around small torch calls: one process answers on one core at a time
(Python's global interpreter lock), so requests from parallel clients queue behind one another. With `--workers N`
the parent process loads the recommender once (model, item index, shoppers' histories), binds one listening
socket per worker on the same port (`SO_REUSEPORT`: the kernel spreads new connections evenly over them, where one
shared socket would let the first worker to wake take most of a burst of keep-alive connections), and forks N
workers that each run the same API on its socket. The loaded state is shared copy-on-write, so N workers take
little more memory than one.

- The parent loads with one torch thread and never uses more before the fork (a forked OpenMP pool can hang);
  each worker then sets its own `threads`.
- Items added through one worker (POST /items) are seen by the others at their next request: the recommender
  re-reads the index folder when its saved index changed, and writes of different workers take turns
  (`Recommender`, `item_index.folder_lock`).
- SIGTERM or SIGINT to the parent stops every worker (each finishes the requests it holds); a worker that dies is
  started again from the parent's state, which re-reads the items added since at its first request.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable

from fedcvr.shared.processes import exit_after

RESTART_PAUSE_S = 1.0  # between a worker's death and its replacement, so a crash loop cannot spin


def bind(host: str, port: int, count: int = 1, backlog: int = 2048) -> list[socket.socket]:
    """`count` listening sockets on host:port (IPv4 or IPv6, address reuse as uvicorn sets it), one per worker
    with SO_REUSEPORT where the system has it, else one socket all workers share. OSError if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    shared = count == 1 or not hasattr(socket, "SO_REUSEPORT")
    sockets: list[socket.socket] = []
    try:
        for _ in range(1 if shared else count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if not shared:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def limit_threads(threads: int) -> None:
    """`threads` CPU threads for torch and for numpy's BLAS in this process. BLAS threads spin while they wait, so
    two workers on two cores, each with a BLAS pool the size of the machine, slowed each other below one worker
    (measured: 94 against 123 requests/s)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)


def _worker(run: Callable[[socket.socket], None], sock: socket.socket, threads: int) -> None:
    """In a forked worker: serve until told to stop, then leave without the parent's exit handlers."""
    def work() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        limit_threads(threads)
        run(sock)

    exit_after(work)


def serve_forked(run: Callable[[socket.socket], None], sockets: list[socket.socket], workers: int, threads: int,
                 log: Callable[[str], None] = print) -> int:
    """Fork `workers` processes, worker i calling `run(sockets[i % len(sockets)])` (which serves until
    SIGTERM/SIGINT); restart any that dies (on the same socket: connections waiting there are kept); on
    SIGTERM/SIGINT to this process stop them all and return 0."""
    children: dict[int, int] = {}  # pid -> worker number
    stopping = False

    def start(number: int) -> None:
        pid = os.fork()
        if pid == 0:
            _worker(run, sockets[number % len(sockets)], threads)
        children[pid] = number

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for number in range(workers):
            start(number)
        log(f"{workers} workers answering (pids {', '.join(str(p) for p in children)})")
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            number = children.pop(pid, None)
            if number is None or stopping:
                continue
            log(f"worker {number} (pid {pid}) ended ({_describe(status)}); starting another")
            time.sleep(RESTART_PAUSE_S)
            if not stopping:
                start(number)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in sockets:
            sock.close()


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
