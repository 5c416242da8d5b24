"""Deployment commands: `fedcvr keys init`, `coordinator start|register|run`, `merchant start`."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated

import typer

from fedcvr.shared import flower_app, run_records

from .common import (
    PersonaliseOption,
    _check_run_config,
    _fail,
    console,
    coordinator_app,
    err_console,
    keys_app,
    merchant_app,
)


@keys_app.command("init")
def keys_init_command(
    folder: Annotated[Path, typer.Argument(help="Where to write the keys (created; must not hold keys already).")],
    superlink_host: Annotated[list[str], typer.Option(
        "--superlink-host", help="A host name or IP address merchants use to reach the SuperLink; repeat for "
                                 "several. The SuperLink's TLS certificate is valid for exactly these.")] = ...,
    merchants: Annotated[int, typer.Option("--merchants", help="Merchant nodes to make key pairs for.")] = ...,
    days: Annotated[int, typer.Option("--days", help="Validity of the certificates in days.")] = 365,
) -> None:
    """Create a CA, the SuperLink's TLS certificate and one EC P-384 key pair per merchant node (for Flower's node
    authentication). Private keys are written with mode 0600; give each merchant ca.pem and its own key."""
    from fedcvr.server.keys import KeysError, init_keys

    try:
        keys = init_keys(folder.expanduser(), superlink_host, merchants, days)
    except KeysError as error:
        _fail(str(error))
    console.print(f"CA: {keys.ca_cert} (private key {keys.ca_key}, keep it offline)")
    console.print(f"SuperLink TLS: {keys.superlink_cert}, {keys.superlink_key} for {', '.join(superlink_host)}")
    console.print(f"{len(keys.merchant_keys)} merchant key pair(s) in {keys.folder / 'merchants'}: give merchant i "
                  "ca.pem and merchants/merchant-ii (private), register merchants/merchant-ii.pub at the SuperLink")


_STREAM_COPY = re.compile(r"^\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2}:[A-Z]+:")
HomeOption = Annotated[Path, typer.Option(
    "--home", help="The coordinator folder: the SuperLink's database (registered merchants, runs) and the connection "
                   "`register` and `run` use.")]


def _warn_insecure() -> None:
    from fedcvr.server.deploy import INSECURE_WARNING

    err_console.print(f"[bold yellow]WARNING:[/] {INSECURE_WARNING}", highlight=False)


def _exec(command: list[str], env: dict[str, str]) -> None:
    """Replace this process with `command` (its PID stays the same: stop it with `kill PID`)."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(command[0], command, env)
    except OSError as err:
        _fail(f"could not start {command[0]}: {err}. Install fedcvr with its dependencies in this environment "
              "(`pip install -e .`).")


@coordinator_app.command("start")
def coordinator_start_command(
    home: HomeOption = Path("coordinator"),
    keys: Annotated[Path | None, typer.Option(
        "--keys", help="The folder `fedcvr keys init` wrote (ca.pem, superlink.pem, superlink.key).")] = None,
    host: Annotated[str, typer.Option(
        "--host", help="Address the merchants' nodes reach the Fleet API on; 0.0.0.0 = every interface.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(
        "--port", help="The merchants' port: it serves the Fleet API alone (what `merchant start --superlink` "
                       "names).")] = 9092,
    control_address: Annotated[str, typer.Option(
        "--control-address", help="HOST:PORT of the Control API (register, run, ls, stop) and the ServerApp's "
                                  "runtime API: keep it on this machine.")] = "127.0.0.1:9093",
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Plaintext without node authentication: only for a test on one machine.")] = False,
) -> None:
    """Start the SuperLink with TLS and merchant node authentication (runtime dependency installation off).

    Merchants' nodes reach the Fleet API alone on HOST:PORT; the Control API, which registers and unregisters
    nodes, and the runtime API listen on --control-address (127.0.0.1 by default), which only this machine
    reaches. Runs in the foreground until stopped (Ctrl-C or `kill PID`); registered merchants and runs are kept
    in HOME/state.db, so a restarted SuperLink knows its merchants."""
    import sys

    from fedcvr.server import deploy
    from fedcvr.shared import deploy as shared_deploy

    if insecure and keys is not None:
        _fail("--insecure turns TLS and node authentication off, but --keys was given: pass one of them")
    if not insecure and keys is None:
        _fail("--keys DIR missing: the SuperLink needs its TLS certificate and the CA from `fedcvr keys init DIR "
              "--superlink-host HOST --merchants N`. For a plaintext test on one machine only, pass --insecure.")
    if not 0 < port < 65536:
        _fail(f"--port {port} is not a port number, e.g. 9092")
    home_dir = deploy.CoordinatorHome(home.expanduser().resolve())
    try:
        control_host, control_port = shared_deploy.parse_address(control_address, "--control-address")
        tls = None if insecure else deploy.TlsFiles.from_keys_dir(keys.expanduser())
        address = deploy.control_address(control_host, control_port, tls.names() if tls else None, port)
        home_dir.folder.mkdir(parents=True, exist_ok=True)
        deploy.write_connection(home_dir, address, tls.ca if tls else None)
    except shared_deploy.DeployError as err:
        _fail(str(err))
    if insecure:
        _warn_insecure()
    if control_host not in deploy.LOOPBACK:
        err_console.print(f"[bold yellow]WARNING:[/] the Control API listens on {address}: anyone who reaches it "
                          "with the CA certificate can register or unregister nodes and stop runs. Keep that "
                          "address behind a firewall that only the coordinator passes.", highlight=False)
    command = deploy.superlink_command(sys.executable, home_dir, tls, (host, port), (control_host, control_port))
    console.print(f"SuperLink ({'TLS + node authentication' if tls else 'PLAINTEXT'}); database "
                  f"{home_dir.database}.\n  merchants' port (Fleet API only, open it to the merchants): {host}:{port}"
                  f"\n  control address (Control + runtime API, this machine only): {address}", highlight=False)
    if tls:
        console.print(f"Merchants connect with --superlink {'|'.join(tls.names())}:{port} --ca {tls.ca}; register "
                      f"each merchant's key: fedcvr coordinator register merchant-NN.pub --home {home_dir.folder}",
                      highlight=False)
    _exec(command, shared_deploy.env_for(home_dir.flwr_home, shared_deploy.flwr_bin_dir()))


@coordinator_app.command("register")
def coordinator_register_command(
    public_key: Annotated[Path, typer.Argument(help="The merchant's public key (merchants/merchant-NN.pub).")],
    home: HomeOption = Path("coordinator"),
) -> None:
    """Register a merchant node's public key at the running SuperLink; only registered nodes may join."""
    import subprocess

    from fedcvr.server import deploy
    from fedcvr.shared import deploy as shared_deploy

    home_dir = deploy.CoordinatorHome(home.expanduser().resolve())
    try:
        key = deploy.check_public_key(public_key.expanduser())
        connection = home_dir.connection()
    except shared_deploy.DeployError as err:
        _fail(str(err))
    if connection.get("insecure"):
        _fail("this SuperLink runs with --insecure, without node authentication: there is nothing to register")
    bin_dir = shared_deploy.flwr_bin_dir()
    env = shared_deploy.env_for(home_dir.flwr_home, bin_dir)
    done = subprocess.run(deploy.register_command(bin_dir, key), env=env, capture_output=True, text=True,
                          check=False)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or "registered successfully" not in output:
        err_console.print(output, highlight=False, markup=False)
        _fail(f"could not register {key} at {connection.get('address')}: see flwr's message above (is the "
              f"SuperLink running? `fedcvr coordinator start --home {home_dir.folder}`)", code=1)
    console.print(output.splitlines()[-1], highlight=False, markup=False)


@coordinator_app.command("run")
def coordinator_run_command(
    out: Annotated[Path, typer.Option(
        "--out", help="Where the ServerApp writes rounds.jsonl, checkpoints, summary.json and the final model "
                      "(on this machine).")] = ...,
    home: HomeOption = Path("coordinator"),
    rounds: Annotated[int | None, typer.Option("--rounds", help="Rounds of training. (default: the app's)")] = None,
    min_nodes: Annotated[int, typer.Option(
        "--min-nodes", help="Merchant nodes to wait for before the first round.")] = 3,
    secagg: Annotated[bool, typer.Option(
        "--secagg", help="Secure aggregation (SecAgg+): the coordinator sees only the sum of the updates.")] = False,
    personalise: PersonaliseOption = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue a stopped run from its last checkpoint: the stopped run's --out folder.")] = None,
    run_config: Annotated[str, typer.Option(
        "--run-config", help="More run config overrides, \"key=value ...\" with TOML values.")] = "",
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="Give up after this many seconds and stop the run. (default: follow it to its end)")] = None,
) -> None:
    """Launch a training run on the deployment (the app's run config + these overrides) and follow it to the end.

    When flwr's log stream ends early the run is followed through its status and rounds; on Ctrl-C, SIGTERM or
    --timeout the run is stopped at the SuperLink (or the exact `flwr stop` command is printed). Exit code 0 when
    the run finished (OUT/summary.json written), 1 when it failed or was stopped, 2 for bad options."""

    from fedcvr.server import deploy, follow
    from fedcvr.shared import deploy as shared_deploy

    if rounds is not None and rounds < 1:
        _fail(f"--rounds must be at least 1, got {rounds}")
    if timeout is not None and not timeout > 0:
        _fail(f"--timeout must be a number of seconds > 0, got {timeout}")
    if min_nodes < 1:
        _fail(f"--min-nodes must be at least 1, got {min_nodes}")
    home_dir = deploy.CoordinatorHome(home.expanduser().resolve())
    run_dir = out.expanduser().resolve()
    try:
        connection = home_dir.connection()
        extra = flower_app.parse_run_config(run_config)
        app_dir = flower_app.find_app_dir()
        declared = flower_app.app_run_config(app_dir)
        settings = [flower_app.Setting("out-dir", str(run_dir)),
                    flower_app.Setting("min-nodes", min_nodes, "--min-nodes")]
        if rounds is not None:
            settings.append(flower_app.Setting("num-server-rounds", rounds, "--rounds"))
        if secagg:
            settings.append(flower_app.Setting("secagg", True, "--secagg"))
        if personalise is not None:
            settings.append(flower_app.Setting("personalise", personalise,
                                        "--personalise" if personalise else "--no-personalise"))
        if resume is not None:
            from fedcvr.server.checkpoint import CheckpointError, checkpoint_folder

            try:
                settings.append(flower_app.Setting("resume", str(checkpoint_folder(resume.expanduser().resolve())),
                                            "--resume"))
            except CheckpointError as err:
                raise flower_app.LaunchError(str(err).replace("resume = ", "--resume ")) from None
        overrides, _ = flower_app.build_run_config(declared, app_dir, settings, extra, fixed={"out-dir": "--out"},
                                            command="fedcvr coordinator run")
        _check_run_config({**declared, **overrides})
    except (shared_deploy.DeployError, flower_app.LaunchError, ValueError) as err:
        _fail(str(err))
    if flower_app.packed_into_app(app_dir, run_dir):
        _fail(f"--out {out} lies inside the Flower App folder {app_dir}: choose a folder outside it (or under runs/)")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = flower_app.write_run_config(run_dir / flower_app.RUN_CONFIG_FILE, overrides)
    summary = run_dir / "summary.json"
    started = time.time()
    log_path = run_dir / flower_app.FLOWER_LOG
    console.print(f"Run on the SuperLink at {connection.get('address')}; Flower's output goes to {log_path}",
                  highlight=False)
    bin_dir = shared_deploy.flwr_bin_dir()
    env = shared_deploy.env_for(home_dir.flwr_home, bin_dir)

    def on_line(text: str) -> None:
        if text and not _STREAM_COPY.match(text):  # flwr streams each log line twice; once is enough
            console.print(text, highlight=False, markup=False)

    ended = follow.run_to_end(deploy.run_command(bin_dir, app_dir, config_file), env, bin_dir, log_path,
                              run_dir / flower_app.ROUNDS_FILE, on_line=on_line, timeout=timeout,
                              on_note=lambda note: err_console.print(f"[yellow]note:[/] {note}", highlight=False))
    _check_run_ended(ended, deploy.stop_hint(home_dir, bin_dir, ended.run_id), log_path)
    if not summary.is_file() or summary.stat().st_mtime < started:
        _fail(f"the run did not finish (no new {summary}); the end of {log_path}:\n"
              f"{run_records.tail(log_path, 25)}", code=1)
    records, _ = run_records.load_history(run_dir)
    if records:
        console.print(run_records.rounds_table(records))
        console.print(run_records.privacy_line(records), highlight=False)
    console.print(f"[green]done:[/] results in {run_dir}; the final model is in {run_dir / 'model'} and every node "
                  "saved it into its --model-dir", highlight=False)


def _check_run_ended(ended, stop_hint: str, log_path: Path) -> None:
    """Exit 1 with the reason unless the followed run finished: a run given up on says whether it was stopped at
    the SuperLink, or the exact command that stops it."""
    from fedcvr.shared.run_records import tail

    run = f"run {ended.run_id}" if ended.run_id else "the run"
    if ended.gave_up is not None:
        if ended.stopped:
            _fail(f"{ended.gave_up}: stopped {run} at the SuperLink (status {ended.status or 'unknown'}); resume it "
                  "from its last checkpoint with --resume OUT", code=1)
        said = f" (flwr said: {ended.stop_output})" if ended.stop_output else ""
        err_console.print(f"[bold red]error:[/] {ended.gave_up}: could not stop {run} at the SuperLink{said}; it "
                          "may still be running. Stop it with:", highlight=False)
        err_console.print(f"  {stop_hint}", soft_wrap=True, markup=False, highlight=False)  # one line to copy
        raise typer.Exit(1)
    if ended.run_id is None:
        _fail(f"`flwr run` started no run; the end of {log_path}:\n{tail(log_path, 25)}", code=1)
    if ended.status != "finished:completed":
        details = f": {ended.details}" if ended.details else ""
        _fail(f"{run} ended as {ended.status or 'unknown'}{details}; the end of {log_path}:\n{tail(log_path, 25)}",
              code=1)


@merchant_app.command("start")
def merchant_start_command(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Your merchant data folder (items + events).")] = ...,
    model_dir: Annotated[Path, typer.Option(
        "--model-dir", help="Where the final global model is saved when a run ends (serve from it).")] = ...,
    superlink: Annotated[str, typer.Option("--superlink", help="The coordinator's SuperLink, HOST:PORT.")] = ...,
    ca: Annotated[Path | None, typer.Option("--ca", help="The coordinator's CA certificate (ca.pem).")] = None,
    key: Annotated[Path | None, typer.Option(
        "--key", help="This node's private key (merchants/merchant-NN), registered by the coordinator.")] = None,
    port: Annotated[int, typer.Option(
        "--port", help="Local port of the node's API for its training processes (one per node on a machine).")
    ] = 9094,
    state_dir: Annotated[Path | None, typer.Option(
        "--state-dir", help="Where the node keeps its privacy ledger. (default: MODEL_DIR-state next to "
                            "--model-dir)")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Plaintext without node authentication: only for a test on one machine.")] = False,
    poll_seconds: Annotated[float, typer.Option(
        "--poll-seconds", help="How often the idle node asks the SuperLink for a message (0.1-3 s; Flower's own "
                               "is 3 s, which delays every message by 1.5 s on average).")] = 0.5,
) -> None:
    """Validate your data, then start your node (a Flower SuperNode with TLS and node authentication).

    Runs in the foreground until stopped (Ctrl-C or `kill PID`); the node's processes end with it. Your data
    never leaves this machine: the node trains locally with DP-SGD and sends only (masked) weight updates and
    metric sums."""
    from fedcvr.client.deploy import merchant_plan
    from fedcvr.shared.data.contract import DataValidationError
    from fedcvr.shared.deploy import DeployError, env_for, flwr_bin_dir

    try:
        plan = merchant_plan(flwr_bin_dir(), data_dir=data_dir.expanduser(), model_dir=model_dir, superlink=superlink,
                             ca=ca.expanduser() if ca else None, key=key.expanduser() if key else None,
                             insecure=insecure, port=port, state_dir=state_dir, poll_seconds=poll_seconds)
    except DataValidationError as err:
        err_console.print(str(err), highlight=False, markup=False, soft_wrap=True)
        _fail(f"{data_dir} failed validation (problems above): fix the data, then start the node again. "
              "Nothing was started.")
    except DeployError as err:
        _fail(str(err))
    if insecure:
        _warn_insecure()
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"Merchant {plan.data.name}: {len(plan.data.items):,} items, {len(plan.data.events):,} events "
                  f"validated. Connecting to {superlink}; the final model will be saved to {plan.model_dir}.",
                  highlight=False)
    raise typer.Exit(_run_node(plan, env_for(plan.state_dir / "flwr", flwr_bin_dir())))


def _run_node(plan, env: dict[str, str]) -> int:
    """Run the merchant's SuperNode and its SuperExec until either ends or this process gets SIGTERM/SIGINT;
    both end with this process, also when it is killed. The SuperNode's exit code."""
    import sys

    from fedcvr.shared.processes import ChildGroup

    sys.stdout.flush()
    with ChildGroup() as group:
        node = group.start(plan.command, env=env)
        group.start(plan.superexec_command(sys.executable, node.pid), env=env)
        code = group.wait()
    return node.returncode if node.returncode is not None and node.returncode >= 0 else code
