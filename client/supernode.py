"""`python -m fedcvr.client.supernode [--poll-seconds S] ARGS`: Flower's `flower-supernode ARGS`, asking the
SuperLink for a message every S seconds while it has none.

Flower 1.42's SuperNode waits a fixed 3 s between two requests for messages when the last one brought none
(`flwr/supernode/start_client_internal.py`, not configurable), so a message waits 1.5 s on average and up to 3 s
before a node even sees it: a plain round sends each node two messages, a SecAgg+ round five. This module runs the
same SuperNode with that wait shortened to `--poll-seconds` (default `POLL_SECONDS`; 3 is Flower's own): each idle
node then asks the SuperLink 1 / S times a second instead of 1 / 3 (a request of a few hundred bytes). Nothing else
changes: arguments, TLS, node authentication and the isolation mode are Flower's, except that message contents
not yet at the SuperLink are asked for again within 50-500 ms instead of Flower's 1 s, 2 s, 4 s
(`shared/object_pulls.py`).
"""

from __future__ import annotations

import sys
import time
from types import ModuleType

from fedcvr.shared.object_pulls import REMOTE, faster_object_pulls

MODULE = "fedcvr.client.supernode"
POLL_SECONDS = 0.5
MIN_POLL_SECONDS, MAX_POLL_SECONDS = 0.1, 3.0


class PacedTime:
    """Stands in for the `time` module inside Flower's SuperNode loop: every wait at most `poll` seconds."""

    def __init__(self, poll: float, clock: ModuleType = time):
        self.poll = poll
        self._clock = clock

    def sleep(self, seconds: float) -> None:
        self._clock.sleep(min(seconds, self.poll))

    def __getattr__(self, name: str):
        return getattr(self._clock, name)


def check_poll(seconds: float) -> float:
    """`seconds` if it is a usable poll interval, else ValueError naming the range."""
    if not MIN_POLL_SECONDS <= seconds <= MAX_POLL_SECONDS:  # NaN fails this too
        raise ValueError(f"--poll-seconds must be between {MIN_POLL_SECONDS} and {MAX_POLL_SECONDS} (Flower's own "
                         f"wait), got {seconds}")
    return seconds


def command(python: str, poll: float, flower_args: list[str]) -> list[str]:
    """The command that runs `flower-supernode flower_args` through this module."""
    return [python, "-m", MODULE, "--poll-seconds", str(check_poll(poll)), *flower_args]


def split_args(argv: list[str]) -> tuple[float, list[str]]:
    """(poll seconds, Flower's arguments) from this module's command line."""
    args = list(argv)
    poll = POLL_SECONDS
    if "--poll-seconds" in args:
        at = args.index("--poll-seconds")
        if at + 1 >= len(args):
            raise ValueError("--poll-seconds needs a value in seconds")
        try:
            poll = float(args[at + 1])
        except ValueError:
            raise ValueError(f"--poll-seconds must be a number of seconds, got {args[at + 1]!r}") from None
        del args[at:at + 2]
    return check_poll(poll), args


def main(argv: list[str] | None = None) -> None:
    try:
        poll, flower_args = split_args(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        sys.exit(f"fedcvr.client.supernode: {err}")
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    start_client_internal.time = PacedTime(poll)
    faster_object_pulls(*REMOTE)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
