"""The `fedcvr` command: the front door for merchants, coordinators and researchers. Each group of commands lives in
its own module; importing them registers them on `app`."""

from __future__ import annotations

from . import data, deployment, research, serving, simulate  # noqa: F401  (registers the commands)
from .common import app

__all__ = ["app", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
