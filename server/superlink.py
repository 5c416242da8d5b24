"""`python -m fedcvr.server.superlink --merchant-address HOST:PORT [flower-superlink options]`: Flower's SuperLink
with the merchants' API apart from the coordinator's.

flwr 1.42 serves three APIs over one HTTP port: the Fleet API (what merchants' SuperNodes call), the Control API
(`flwr run`, `flwr ls`, `flwr stop`, `flwr supernode register|unregister|list`) and the runtime API (the
ServerApp's). The Control API has no account check in this version: whoever reaches it with the CA certificate,
which every merchant holds, can register or unregister nodes and list and stop runs. So `fedcvr coordinator start`
runs the SuperLink's own application (one state, one database, the same TLS certificate) on two listeners:

    --host/--port        all three APIs, for the coordinator's `flwr` and ServerApp: 127.0.0.1 by default
    --merchant-address   the Fleet API alone (paths under /v1/fleet/); any other request is answered 404

Every other option is `flower-superlink`'s and means the same. The SuperExec that runs the ServerApp is started
through `fedcvr.shared.superexec`, which reaps the ServerApp processes that ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from logging import INFO
from typing import Any

import uvicorn

from fedcvr.shared import superexec
from fedcvr.shared.deploy import DeployError, parse_address

FLEET_PREFIX = "/v1/fleet/"
NOT_HERE = (b"This port serves only the Fleet API that merchants' nodes use. The Control API (flwr run, ls, stop, "
            b"supernode register/unregister/list) listens on the coordinator's own machine.\n")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def is_fleet_path(path: str) -> bool:
    """Whether a request path is one of the Fleet API's: under /v1/fleet/ and already normal (no `..`, `.` or
    empty segments that a router might read differently from this check)."""
    return path.startswith(FLEET_PREFIX) and posixpath.normpath(path) == path.rstrip("/")


class FleetOnly:
    """An ASGI application that passes Fleet API requests to `app` and answers everything else with 404."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_fleet_path(scope.get("path", "")):
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(NOT_HERE)).encode())]})
            await send({"type": "http.response.body", "body": NOT_HERE})
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        # "lifespan" never arrives: the merchants' listener runs with lifespan="off"


def split_arguments(argv: list[str]) -> tuple[tuple[str, int], list[str]]:
    """(--merchant-address as (host, port), the `flower-superlink` options)."""
    rest = list(argv)
    if "--merchant-address" not in rest or rest.index("--merchant-address") + 1 >= len(rest):
        raise DeployError("--merchant-address HOST:PORT missing: the address the merchants' nodes reach the Fleet "
                          "API on, e.g. --merchant-address 0.0.0.0:9092")
    at = rest.index("--merchant-address")
    address = rest[at + 1]
    del rest[at:at + 2]
    return parse_address(address, "--merchant-address"), rest


def _lifespan_class():
    from flwr.common.constant import ISOLATION_MODE_SUBPROCESS
    from flwr.supercore.address import resolve_bind_address
    from flwr.supercore.utils import get_popen_detach_kwargs
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan, _get_superexec_command

    class Lifespan(SuperLinkLifespan):
        """Flower's SuperLink lifespan, with its SuperExec started through `fedcvr.shared.superexec`."""

        def _start_superexec_if_needed(self) -> None:
            config = self.config
            if config.isolation != ISOLATION_MODE_SUBPROCESS:
                return
            host = f"[{config.host}]" if ":" in config.host else config.host
            flower = _get_superexec_command(
                runtime_address=resolve_bind_address(f"{host}:{config.port}"),
                runtime_certificates=config.certificates, runtime_root_certificates_path=config.ssl_ca_certfile,
                parent_pid=os.getpid(), runtime_dependency_install=config.runtime_dependency_install)
            self.superexec_process = subprocess.Popen(superexec.command(sys.executable, flower[1:]),
                                                      **get_popen_detach_kwargs())

    return Lifespan


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve_both` (two servers share one process)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve_both(control: uvicorn.Server, merchants: uvicorn.Server) -> None:
    """Run both servers until SIGTERM/SIGINT or until either of them stops; then stop the other one too."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in (control, merchants):
            server.should_exit = True

    def on_signal() -> None:  # a second Ctrl-C does not wait for open connections
        for server in (control, merchants):
            server.force_exit = server.should_exit
        stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    tasks = [asyncio.create_task(control.serve())]
    while not control.started and not tasks[0].done():  # the SuperLink's state and SuperExec first
        await asyncio.sleep(0.05)
    tasks.append(asyncio.create_task(merchants.serve()))
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    stop()
    await asyncio.gather(*tasks, return_exceptions=True)


def main(argv: list[str] | None = None) -> None:
    from flwr.common.logger import log
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import _parse_superlink_lifespan_config
    from flwr.superlink.main import create_app

    try:
        (host, port), flower_args = split_arguments(sys.argv[1:] if argv is None else argv)
    except DeployError as err:
        sys.exit(f"error: {err}")
    sys.argv = ["flower-superlink", *flower_args]
    config = _parse_superlink_lifespan_config()
    app = create_app(config, _lifespan_class())
    common = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile, "access_log": True,
              "log_config": get_uvicorn_log_config(console_handler.level)}
    control = _Server(uvicorn.Config(app, host=config.host, port=config.port, lifespan="on", **common))
    merchants = _Server(uvicorn.Config(FleetOnly(app), host=host, port=port, lifespan="off", **common))
    log(INFO, "fedcvr SuperLink: Fleet API for merchants' nodes on %s:%s; Control and runtime API on %s:%s only",
        host, port, config.host, config.port)
    asyncio.run(serve_both(control, merchants))


if __name__ == "__main__":
    main()
