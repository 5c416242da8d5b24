"""Round timeouts that follow the work, and a run that stops with the reason when its nodes never answer in time.

`round-timeout` is how long the coordinator waits for the replies to one batch of messages: a round's training
(each of the four SecAgg+ stages is one), its evaluation, a query. On a deployed node each message starts a fresh
ClientApp process (seconds of imports and data preparation on 2 cores, far more on a busy machine) before it
trains, so a number that fits one machine fails on a busier one, and every node then drops out of the round at once.

- `PacedGrid` wraps the run's Grid and collects replies every `POLL_SECONDS` (Flower's send_and_receive waits 3 s
  between asks). It measures how long each batch took whose every message was answered, per kind of message
  (train, evaluate, query.*), and gives later batches of that kind at least `factor` times the longest of those:
  never less than round-timeout, more when the nodes showed they need it (logged with why).
- `check_progress` runs after every round: when `STALLED_ROUNDS` rounds in a row produced no update because no
  node answered in time (or SecAgg+ halted for want of answers), the run stops with that reason, the round its
  checkpoint holds, and the round-timeout to resume with, instead of going on for nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from logging import INFO
from typing import Any

from flwr.app import Message
from flwr.common.logger import log

FACTOR = 2.0
POLL_SECONDS = 0.25  # how often the coordinator asks the SuperLink for replies (Flower's own loop: every 3 s)
STALLED_ROUNDS = 2
TIMED_OUT = ("no reply within", "secure aggregation halted")


class RoundsTimedOut(RuntimeError):
    """Rounds in a row produced no update because the nodes did not answer within round-timeout."""


class PacedGrid:
    """A Grid whose waits follow the time the nodes took so far (see the module's docstring)."""

    def __init__(self, grid: Any, round_timeout: float, factor: float = FACTOR,
                 clock: Callable[[], float] = time.monotonic, poll: float = POLL_SECONDS):
        self.grid = grid
        self.poll = poll
        self.round_timeout = round_timeout
        self.factor = factor
        self.clock = clock
        self.slowest: dict[str, float] = {}  # kind of message -> longest time a fully answered batch took

    def timeout_for(self, kind: str, requested: float | None) -> float:
        floor = self.round_timeout if requested is None else max(requested, self.round_timeout)
        measured = self.slowest.get(kind)
        return floor if measured is None else max(floor, self.factor * measured)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return self.grid.send_and_receive(messages, timeout=timeout)
        kind = messages[0].metadata.message_type
        wait = self.timeout_for(kind, timeout)
        if wait > self.round_timeout:
            log(INFO, "Waiting up to %.0f s for %d %s replies: %g x the %.0f s such replies took so far "
                "(round-timeout = %g s)", wait, len(messages), kind, self.factor, self.slowest[kind],
                self.round_timeout)
        started = self.clock()
        replies = self._exchange(messages, wait)
        took = self.clock() - started
        if len(replies) >= len(messages):  # every message answered: the time the slowest node took
            self.slowest[kind] = max(self.slowest.get(kind, 0.0), took)
        return replies

    def _exchange(self, messages: list[Message], timeout: float) -> list[Message]:
        """Push the messages, then collect their replies every `poll` seconds until all are in or `timeout` has
        passed. Flower's own send_and_receive asks the SuperLink every 3 s, which a deployed round of 5 messages
        per node pays in waiting alone; a grid without push and pull (the in-process runner) answers at once."""
        if not (hasattr(self.grid, "push_messages") and hasattr(self.grid, "pull_messages")):
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        waiting = set(self.grid.push_messages(messages))
        deadline = self.clock() + timeout
        replies: list[Message] = []
        while True:
            pulled = list(self.grid.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not waiting or self.clock() >= deadline:
                return replies
            time.sleep(min(self.poll, max(deadline - self.clock(), 0.0)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def _timed_out(row: dict[str, Any]) -> bool:
    """Whether a round produced no update because its nodes did not answer in time."""
    failures = row.get("failed") or []
    return not row.get("nodes-trained") and bool(failures) and all(
        any(marker in str(f.get("reason", "")) for marker in TIMED_OUT) for f in failures)


def check_progress(rows: Sequence[dict[str, Any]], round_timeout: float, stalled: int = STALLED_ROUNDS) -> None:
    """Raise RoundsTimedOut when the last `stalled` rounds all timed out without an update: going on would spend
    the remaining rounds the same way. The message names the rounds, the round the checkpoint holds and the fix."""
    last = list(rows)[-stalled:]
    if len(last) < stalled or not all(_timed_out(row) for row in last):
        return
    done = next((int(r["round"]) for r in reversed(rows) if not _timed_out(r)), 0)
    numbers = ", ".join(str(r["round"]) for r in last)
    raise RoundsTimedOut(
        f"rounds {numbers} produced no update: no node answered within round-timeout = {round_timeout:g} s (each "
        "message starts a fresh ClientApp process on a node, seconds of imports and data preparation on 2 cores and "
        f"more on a busy machine, before it trains). The run stops here; its checkpoint holds the model of round "
        f"{done}. Resume "
        f"it with a longer round-timeout, e.g. `fedcvr coordinator run --resume OUT --run-config "
        f"\"round-timeout={max(600, 4 * round_timeout):g}\" ...` (or `fedcvr simulate --resume OUT ...`).")
