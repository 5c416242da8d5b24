"""What the coordinator's and the merchants' deployment commands share: the error they raise on bad input, HOST:PORT
addresses, and the environment of every Flower process fedcvr starts (its own FLWR_HOME, offline, no runtime
installs, this environment's Flower commands first on PATH)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")


class DeployError(ValueError):
    """Bad input to a deployment command; the message names the file or value and the fix."""


def parse_address(text: str, what: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) -> (host, port); DeployError naming `what` otherwise."""
    match = _HOST_PORT.match(text.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise DeployError(f"{what} {text!r} is not HOST:PORT: give the SuperLink's host name or IP address and "
                          "port, e.g. 127.0.0.1:9092 or coordinator.example.com:9092 (no https://).")
    return match["host"].strip("[]"), int(match["port"])


def flwr_bin_dir() -> Path:
    """The bin folder of the environment this Python belongs to (where `flwr` and `flower-superlink` are)."""
    return Path(sys.executable).parent


def env_for(flwr_home: Path, bin_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process fedcvr starts: its own FLWR_HOME, offline, no installs, and this
    environment's bin folder first on PATH (the SuperLink and SuperNode start `flower-superexec` and
    `flwr-clientapp` from PATH, also when the virtual environment is not activated)."""
    env = dict(os.environ if base is None else base)
    env.update({"FLWR_HOME": str(flwr_home), "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1")})
    return env
