"""`python -m fedcvr.shared.superexec ARGS`: Flower's `flower-superexec ARGS` that reaps its ended children.

Flower's SuperExec starts one process per task (a ClientApp per message on a merchant's node, a ServerApp per run
at the coordinator) and never waits for them, so each one that ended stays a zombie under the node. fedcvr starts
the SuperExec through this module instead, which runs the same `flower-superexec` with a thread that reaps ended
children (`processes.start_reaper`). Everything else (arguments, TLS, the parent monitor of `--parent-pid`) is
Flower's own.
"""

from __future__ import annotations

import sys

from .processes import start_reaper

SUPEREXEC = "flower-superexec"
MODULE = "fedcvr.shared.superexec"


def command(python: str, flower_args: list[str]) -> list[str]:
    """The command that runs `flower-superexec flower_args` through this module."""
    return [python, "-m", MODULE, *flower_args]


def main(argv: list[str] | None = None) -> None:
    from flwr.supercore.cli import flower_superexec

    start_reaper()
    sys.argv = [SUPEREXEC, *(sys.argv[1:] if argv is None else argv)]
    flower_superexec()


if __name__ == "__main__":
    main()
