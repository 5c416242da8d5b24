"""The deployment commands' checks and the Flower commands they build (no process is started here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from support import MERCHANTS, break_merchant, write_merchant
from typer.testing import CliRunner

from fedcvr.cli import app
from fedcvr.client.deploy import merchant_plan
from fedcvr.server import deploy
from fedcvr.server.keys import init_keys
from fedcvr.shared.data.contract import DataValidationError
from fedcvr.shared.deploy import DeployError, env_for, parse_address

BIN = Path("/opt/env/bin")


class Options:
    """The value after each option of a command line."""

    def __init__(self, command: list[str]):
        self.command = command

    def __getitem__(self, name: str) -> str:
        return self.command[self.command.index(name) + 1]


@pytest.fixture
def market(tmp_path) -> Path:
    for name, (n_items, rows) in MERCHANTS.items():
        write_merchant(tmp_path / "market" / name, n_items, rows)
    return tmp_path / "market"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("keys") / "keys"
    init_keys(folder, ["127.0.0.1", "coordinator.example.com"], 2)
    return folder


def test_superlink_command_has_tls_node_auth_and_no_dependency_installation(keys, tmp_path):
    home = deploy.CoordinatorHome(tmp_path / "home")
    command = deploy.superlink_command("/opt/env/bin/python", home, deploy.TlsFiles.from_keys_dir(keys),
                                       ("0.0.0.0", 9092), ("127.0.0.1", 9093))
    assert command[:3] == ["/opt/env/bin/python", "-m", "fedcvr.server.superlink"]
    pairs = Options(command)
    assert pairs["--ssl-ca-certfile"] == str((keys / "ca.pem").resolve())
    assert pairs["--ssl-certfile"].endswith("superlink.pem") and pairs["--ssl-keyfile"].endswith("superlink.key")
    assert pairs["--database"] == str(home.database)
    assert "--enable-supernode-auth" in command and "--disable-runtime-dependency-installation" in command
    assert "--insecure" not in command
    plain = deploy.superlink_command("python", home, None, ("127.0.0.1", 9092), ("127.0.0.1", 9093))
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain


def test_merchants_reach_the_fleet_api_alone_the_control_api_stays_on_the_coordinator(keys, tmp_path):
    """The merchants' port is --merchant-address; Flower's --host/--port (all three APIs) is the control address."""
    home = deploy.CoordinatorHome(tmp_path / "home")
    command = deploy.superlink_command("python", home, deploy.TlsFiles.from_keys_dir(keys), ("0.0.0.0", 9092),
                                       ("127.0.0.1", 9093))
    pairs = Options(command)
    assert pairs["--merchant-address"] == "0.0.0.0:9092"
    assert (pairs["--host"], pairs["--port"]) == ("127.0.0.1", "9093")
    v6 = deploy.superlink_command("python", home, None, ("::", 9092), ("::1", 9093))
    assert Options(v6)["--merchant-address"] == "[::]:9092"


def test_the_control_address_is_checked(keys):
    names = deploy.TlsFiles.from_keys_dir(keys).names()
    assert deploy.control_address("127.0.0.1", 9093, names, 9092) == "127.0.0.1:9093"
    assert deploy.control_address("::1", 9093, None, 9092) == "[::1]:9093"
    with pytest.raises(DeployError, match="merchants' port 9092"):
        deploy.control_address("127.0.0.1", 9092, names, 9092)
    with pytest.raises(DeployError, match="every network"):
        deploy.control_address("0.0.0.0", 9093, names, 9092)
    with pytest.raises(DeployError, match="not localhost.*--superlink-host 127.0.0.1"):
        deploy.control_address("localhost", 9093, names, 9092)


def test_missing_tls_files_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DeployError, match=r"ca.pem does not exist.*fedcvr keys init"):
        deploy.TlsFiles.from_keys_dir(tmp_path)


def test_the_coordinators_connection_is_written_and_read_back(keys, tmp_path):
    tls = deploy.TlsFiles.from_keys_dir(keys)
    assert set(tls.names()) == {"127.0.0.1", "coordinator.example.com"}
    home = deploy.CoordinatorHome(tmp_path / "home")
    with pytest.raises(DeployError, match="coordinator start"):
        home.connection()
    deploy.write_connection(home, "127.0.0.1:9093", tls.ca)
    assert home.connection() == {"address": "127.0.0.1:9093", "root-certificates": str(tls.ca)}
    deploy.write_connection(home, "127.0.0.1:9093", None)
    assert home.connection()["insecure"] is True


def test_register_takes_only_a_merchant_public_key(keys, tmp_path):
    public = keys / "merchants" / "merchant-01.pub"
    assert deploy.check_public_key(public) == public.resolve()
    assert deploy.register_command(BIN, public)[1:] == ["supernode", "register", str(public), "fedcvr"]
    with pytest.raises(DeployError, match="PRIVATE key"):
        deploy.check_public_key(keys / "merchants" / "merchant-01")
    other = tmp_path / "x.pub"
    other.write_text("not a key\n")
    with pytest.raises(DeployError, match="not an OpenSSH public key"):
        deploy.check_public_key(other)
    with pytest.raises(DeployError, match="does not exist"):
        deploy.check_public_key(tmp_path / "missing.pub")


@pytest.mark.parametrize("text", ["https://127.0.0.1:9092", "127.0.0.1", "host:0", "host:99999", ""])
def test_bad_superlink_addresses(text):
    with pytest.raises(DeployError, match="HOST:PORT"):
        parse_address(text, "--superlink")


def test_merchant_plan_builds_the_supernode_command(keys, market, tmp_path):
    shop = market / "shop-a"
    plan = merchant_plan(BIN, data_dir=shop, model_dir=tmp_path / "model", superlink="127.0.0.1:9092",
                         ca=keys / "ca.pem", key=keys / "merchants" / "merchant-01", port=9095)
    command = plan.command
    assert command[:5] == [sys.executable, "-m", "fedcvr.client.supernode", "--poll-seconds", "0.5"]
    pairs = Options(command)
    assert pairs["--superlink"] == "127.0.0.1:9092" and pairs["--port"] == "9095" and pairs["--host"] == "127.0.0.1"
    assert pairs["--isolation"] == "process"  # `merchant start` runs the SuperExec itself (it reaps ClientApps)
    superexec = plan.superexec_command("/opt/env/bin/python", 4321)
    assert superexec[:3] == ["/opt/env/bin/python", "-m", "fedcvr.client.superexec"]  # warm ClientApp processes
    assert Options(superexec)["--runtime-api-address"] == "127.0.0.1:9095"
    assert Options(superexec)["--parent-pid"] == "4321"
    assert pairs["--root-certificates"] == str((keys / "ca.pem").resolve())
    assert pairs["--auth-supernode-private-key"].endswith("merchant-01")
    assert f"data-dir='{shop.resolve()}'" in pairs["--node-config"]
    assert f"model-dir='{(tmp_path / 'model').resolve()}'" in pairs["--node-config"]
    assert "state-dir=" in pairs["--node-config"] and "--insecure" not in command
    plain = merchant_plan(BIN, data_dir=shop, model_dir=tmp_path / "model", superlink="127.0.0.1:9092", ca=None,
                          key=None, insecure=True)
    assert "--insecure" in plain.command and "--root-certificates" not in plain.command


def test_merchant_plan_refuses_bad_data_before_anything_starts(keys, market, tmp_path):
    break_merchant(market / "shop-b")
    with pytest.raises(DataValidationError):
        merchant_plan(BIN, data_dir=market / "shop-b", model_dir=tmp_path / "m", superlink="127.0.0.1:9092",
                      ca=keys / "ca.pem", key=keys / "merchants" / "merchant-01")


@pytest.mark.parametrize("change, match", [
    ({"ca": None}, "--ca missing"),
    ({"ca": None, "key": None}, "--ca and --key missing"),
    ({"insecure": True}, "either --ca and --key, or --insecure"),
    ({"key": "public"}, "PUBLIC key"),
    ({"ca": "key-as-ca"}, "not a PEM certificate"),
    ({"superlink": "https://x:1"}, "HOST:PORT"),
    ({"port": 0}, "not a port number"),
])
def test_merchant_plan_errors_name_the_option_and_the_fix(keys, market, tmp_path, change, match):
    args = {"data_dir": market / "shop-a", "model_dir": tmp_path / "m", "superlink": "127.0.0.1:9092",
            "ca": keys / "ca.pem", "key": keys / "merchants" / "merchant-01"}
    args.update(change)
    if args.get("key") == "public":
        args["key"] = keys / "merchants" / "merchant-01.pub"
    if args.get("ca") == "key-as-ca":
        args["ca"] = keys / "merchants" / "merchant-01.pub"
    with pytest.raises(DeployError, match=match):
        merchant_plan(BIN, **args)


def test_a_key_others_can_read_is_refused(keys, market, tmp_path):
    key = tmp_path / "merchant-02"
    key.write_bytes((keys / "merchants" / "merchant-02").read_bytes())
    os.chmod(key, 0o644)
    with pytest.raises(DeployError, match="chmod 600"):
        merchant_plan(BIN, data_dir=market / "shop-a", model_dir=tmp_path / "m", superlink="127.0.0.1:9092",
                      ca=keys / "ca.pem", key=key)


def test_cli_needs_keys_or_an_explicit_insecure(tmp_path, keys):
    runner = CliRunner()
    result = runner.invoke(app, ["coordinator", "start", "--home", str(tmp_path / "h")])
    assert result.exit_code == 2 and "--insecure" in result.output and "fedcvr keys init" in result.output
    result = runner.invoke(app, ["coordinator", "start", "--home", str(tmp_path / "h"), "--keys", str(keys),
                                 "--insecure"])
    assert result.exit_code == 2 and "pass one of them" in result.output
    result = runner.invoke(app, ["merchant", "start", "--data-dir", str(tmp_path), "--model-dir", str(tmp_path / "m"),
                                 "--superlink", "127.0.0.1:9092"])
    assert result.exit_code == 2 and "--ca and --key missing" in result.output


def test_cli_merchant_start_prints_every_data_problem_and_starts_nothing(market, keys, tmp_path):
    break_merchant(market / "shop-c")
    result = CliRunner().invoke(app, ["merchant", "start", "--data-dir", str(market / "shop-c"), "--model-dir",
                                      str(tmp_path / "m"), "--superlink", "127.0.0.1:9092", "--ca",
                                      str(keys / "ca.pem"), "--key", str(keys / "merchants" / "merchant-01")])
    assert result.exit_code == 2 and "failed validation" in result.output and "Nothing was started" in result.output
    assert "i7" in result.output  # the problem itself: an event names an item the catalog lacks
    assert not (tmp_path / "m").exists()


def test_cli_register_and_run_need_a_started_coordinator(tmp_path, keys):
    runner = CliRunner()
    result = runner.invoke(app, ["coordinator", "register", str(keys / "merchants" / "merchant-01.pub"), "--home",
                                 str(tmp_path / "h")])
    assert result.exit_code == 2 and "coordinator start" in result.output
    result = runner.invoke(app, ["coordinator", "run", "--home", str(tmp_path / "h"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "coordinator start" in result.output


def test_cli_run_checks_the_run_config_before_anything_starts(tmp_path, keys):
    home = deploy.CoordinatorHome(tmp_path / "h")
    deploy.write_connection(home, "127.0.0.1:9092", keys / "ca.pem")
    runner = CliRunner()
    result = runner.invoke(app, ["coordinator", "run", "--home", str(home.folder), "--out", str(tmp_path / "r"),
                                 "--secagg", "--min-nodes", "2"])
    assert result.exit_code == 2 and "min-nodes" in result.output and "secagg" in result.output
    result = runner.invoke(app, ["coordinator", "run", "--home", str(home.folder), "--out", str(tmp_path / "r"),
                                 "--run-config", "secagg-treshold=0.5"])
    assert result.exit_code == 2 and "does not declare" in result.output
    result = runner.invoke(app, ["coordinator", "run", "--home", str(home.folder), "--out", str(tmp_path / "r"),
                                 "--run-config", "out-dir='/x'"])
    assert result.exit_code == 2 and "--out" in result.output
    assert not (tmp_path / "r").exists()


def test_flower_processes_find_this_environment_first_on_path(tmp_path):
    env = env_for(tmp_path / "flwr", BIN, base={"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep)[0] == str(BIN) and env["FLWR_HOME"] == str(tmp_path / "flwr")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


@pytest.fixture
def started(monkeypatch):
    """`_exec` (the SuperLink) and `_run_node` (a merchant's node) replaced: what would have been started, with
    its environment."""
    import fedcvr.cli.deployment as cli

    calls: list[tuple[list[str], dict]] = []
    monkeypatch.setattr(cli, "_exec", lambda command, env: calls.append((command, env)))
    monkeypatch.setattr(cli, "_run_node", lambda plan, env: calls.append((plan.command, env)) or 0)
    return calls


def test_cli_coordinator_start_with_keys_writes_the_connection_and_starts_a_tls_superlink(tmp_path, keys, started):
    result = CliRunner().invoke(app, ["coordinator", "start", "--home", str(tmp_path / "h"), "--keys", str(keys),
                                      "--port", "9123"])
    assert result.exit_code == 0, result.output
    (command, env), = started
    assert "--enable-supernode-auth" in command and "--insecure" not in command and "WARNING" not in result.output
    assert env["FLWR_HOME"] == str((tmp_path / "h" / "flwr").resolve())
    pairs = Options(command)
    assert pairs["--merchant-address"] == "0.0.0.0:9123" and (pairs["--host"], pairs["--port"]) == ("127.0.0.1", "9093")
    connection = deploy.CoordinatorHome((tmp_path / "h").resolve()).connection()
    assert connection["address"] == "127.0.0.1:9093" and connection["root-certificates"].endswith("ca.pem")
    assert "Fleet API only" in result.output and "0.0.0.0:9123" in result.output


def test_cli_coordinator_start_refuses_a_control_address_merchants_could_reach(tmp_path, keys, started):
    for address, needle in (("0.0.0.0:9093", "every network"), ("127.0.0.1:9092", "merchants' port"),
                            ("coordinator.example.com:9093", None)):
        result = CliRunner().invoke(app, ["coordinator", "start", "--home", str(tmp_path / "h"), "--keys",
                                          str(keys), "--control-address", address])
        if needle is None:  # allowed, with a warning: it is the operator's own firewall that keeps it private
            assert result.exit_code == 0 and "WARNING" in result.output and "register or unregister" in result.output
        else:
            assert result.exit_code == 2 and needle in result.output, result.output
    assert len(started) == 1


def test_cli_insecure_only_when_asked_and_always_with_a_warning(tmp_path, market, started):
    result = CliRunner().invoke(app, ["coordinator", "start", "--home", str(tmp_path / "h"), "--insecure"])
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output and "plaintext" in result.output
    assert "--insecure" in started[-1][0]
    result = CliRunner().invoke(app, ["merchant", "start", "--data-dir", str(market / "shop-a"), "--model-dir",
                                      str(tmp_path / "m"), "--superlink", "127.0.0.1:9092", "--insecure"])
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output and "--insecure" in started[-1][0]
    assert "--root-certificates" not in started[-1][0]


def _ask(app_, path: str, kind: str = "http") -> tuple[list[dict], list[str]]:
    """Send one request for `path` through an ASGI app; (what it sent back, the paths the inner app saw)."""
    import asyncio

    seen: list[str] = []

    async def inner(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app_(inner)({"type": kind, "path": path, "method": "POST", "headers": []}, receive, send))
    return sent, seen


@pytest.mark.parametrize("path", ["/v1/fleet/register-node", "/v1/fleet/pull-messages", "/v1/fleet/push-object"])
def test_the_merchants_listener_passes_the_fleet_api(path):
    from fedcvr.server.superlink import FleetOnly

    sent, seen = _ask(FleetOnly, path)
    assert seen == [path] and sent[0]["status"] == 200


@pytest.mark.parametrize("path", ["/v1/control/register-node", "/v1/control/unregister-node",
                                  "/v1/control/list-nodes", "/v1/control/list-runs", "/v1/control/stop-run",
                                  "/v1/runtime/pull-messages", "/v1/fleet/../control/register-node",
                                  "/v1/fleet//../control/list-nodes", "//v1/control/list-runs", "/docs", "/health"])
def test_the_merchants_listener_refuses_everything_else(path):
    """The Control API (register, unregister, list, stop) and the runtime API are not reachable on the merchants'
    port, also not through dot segments."""
    from fedcvr.server.superlink import FleetOnly

    sent, seen = _ask(FleetOnly, path)
    assert seen == [] and sent[0]["status"] == 404 and b"only the Fleet API" in sent[1]["body"]
    sent, seen = _ask(FleetOnly, path, kind="websocket")
    assert seen == [] and sent == [{"type": "websocket.close", "code": 1008}]


def test_the_superlink_module_needs_the_merchant_address():
    from fedcvr.server.superlink import split_arguments

    assert split_arguments(["--host", "127.0.0.1", "--merchant-address", "0.0.0.0:9092", "--port", "9093"]) == (
        ("0.0.0.0", 9092), ["--host", "127.0.0.1", "--port", "9093"])
    with pytest.raises(DeployError, match="--merchant-address HOST:PORT missing"):
        split_arguments(["--host", "127.0.0.1"])


def test_the_supernode_wrapper_shortens_only_the_idle_wait_and_checks_its_option():
    from fedcvr.client import supernode

    slept: list[float] = []

    class Clock:
        def sleep(self, seconds):
            slept.append(seconds)

        def monotonic(self):
            return 42.0

    paced = supernode.PacedTime(0.5, Clock())
    paced.sleep(3)  # Flower's idle wait
    paced.sleep(0.2)
    assert slept == [0.5, 0.2] and paced.monotonic() == 42.0  # everything else is the real module's
    assert supernode.split_args(["--superlink", "h:1", "--poll-seconds", "0.25", "--insecure"]) == (
        0.25, ["--superlink", "h:1", "--insecure"])
    assert supernode.split_args(["--insecure"]) == (supernode.POLL_SECONDS, ["--insecure"])
    for bad in ("0", "nan", "10", "soon"):
        with pytest.raises(ValueError, match="--poll-seconds"):
            supernode.split_args(["--poll-seconds", bad])


def test_merchant_plan_refuses_a_bad_poll_interval(market, tmp_path):
    with pytest.raises(DeployError, match="--poll-seconds must be between"):
        merchant_plan(BIN, data_dir=market / "shop-a", model_dir=tmp_path / "m", superlink="127.0.0.1:9092",
                      ca=None, key=None, insecure=True, poll_seconds=30)


def test_flowers_supernode_loop_still_waits_through_the_module_the_wrapper_replaces():
    """The wrapper replaces `time` inside flwr.supernode.start_client_internal; if Flower stops calling
    `time.sleep` there, the wrapper no longer does anything and this test says so."""
    import inspect

    from flwr.supernode import start_client_internal

    assert "time.sleep(3)" in inspect.getsource(start_client_internal)
