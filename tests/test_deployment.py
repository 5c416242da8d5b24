"""A real deployment on loopback, following the runbooks of docs/deployment.md command for command.

One SuperLink (`fedcvr coordinator start`, TLS + node authentication) and three merchant nodes
(`fedcvr merchant start`) run `fedcvr coordinator run --secagg` with DP-SGD. Along the way: a client that holds
ca.pem but not the coordinator's machine finds only the Fleet API on the merchants' port and cannot register,
unregister or list nodes or runs; a node whose key is not registered is refused; a node killed mid-round does not
stop the run (SecAgg+ recovers without it, the merchant restarts it); the SuperLink is killed and restarted (its
SuperExec goes with it), and the run resumed from its checkpoint ends with the planned number of rounds; no
ClientApp process stays a zombie under a node. Every process is started in a session of its own and stopped by its
PID (its process group).

About 6-8 minutes on 2 cores: marked `deployment`, left out of `make test`; run it with `make test-deployment`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import descendants

from fedcvr.shared.processes import end_session
from fedcvr.simulations.launcher import _stat, alive, free_ports

pytestmark = pytest.mark.deployment

FEDCVR = str(Path(sys.executable).parent / "fedcvr")
FLWR = str(Path(sys.executable).parent / "flwr")
ROUNDS = 3


class Processes:
    """Background processes of the test, each in its own session; stopped by PID (process group)."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.running[name] = process
        return process

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        end_session(self.running.pop(name), sig, grace)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name, grace=10.0)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def fedcvr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([FEDCVR, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"})


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def flwr(flwr_home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FLWR, *args], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1"})


def registered_nodes(home: Path) -> list[str]:
    """The node ids registered at the SuperLink, asked through the coordinator's own connection."""
    done = flwr(home / "flwr", "supernode", "list", "fedcvr", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    return sorted(str(node["node-id"]) for node in json.loads(done.stdout)["nodes"])


def zombies_below(pid: int) -> set[int]:
    return {p for p in descendants(pid) if _stat(p)[:1] == ["Z"]}


def rounds_written(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_runbooks_on_loopback_tls_auth_dp_secagg_dropout_and_restart(tmp_path, tiny_market, tiny_bert):
    keys, home, logs = tmp_path / "keys", tmp_path / "coordinator", tmp_path / "logs"
    logs.mkdir()
    link_port, control_port, *node_ports = free_ports(6)
    merchants = sorted(p for p in tiny_market.iterdir() if p.is_dir())
    procs = Processes(logs)
    try:
        # ---- coordinator: keys, SuperLink, registration (docs/deployment.md "Runbook: coordinator")
        made = fedcvr("keys", "init", str(keys), "--superlink-host", "127.0.0.1", "--merchants", "4")
        assert made.returncode == 0, made.stderr
        start_link = [FEDCVR, "coordinator", "start", "--home", str(home), "--keys", str(keys),
                      "--host", "127.0.0.1", "--port", str(link_port), "--control-address", f"127.0.0.1:{control_port}"]
        procs.start("superlink", start_link)
        wait_for("the SuperLink to listen", lambda: port_open(link_port) and port_open(control_port), 60)
        for i in (1, 2, 3):
            done = fedcvr("coordinator", "register", str(keys / "merchants" / f"merchant-0{i}.pub"), "--home",
                          str(home))
            assert done.returncode == 0, done.stdout + done.stderr
        registered = registered_nodes(home)
        assert len(registered) == 3

        # ---- someone with ca.pem and the merchants' address, but not the coordinator's machine (docs/deployment.md:
        # the merchants' port serves the Fleet API alone): no register, unregister or listing of nodes or runs
        rogue = tmp_path / "rogue-flwr"
        rogue.mkdir()
        (rogue / "config.toml").write_text(f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = '
                                           f'"127.0.0.1:{link_port}"\nroot-certificates = "{keys / "ca.pem"}"\n')
        for attempt in (["supernode", "register", str(keys / "merchants" / "merchant-04.pub")],
                        ["supernode", "unregister", registered[0]], ["supernode", "list"], ["ls"]):
            done = flwr(rogue, *attempt)
            assert done.returncode != 0 and "404 Not Found" in done.stdout + done.stderr, (attempt, done.stdout)
            assert "successfully" not in done.stdout
        assert registered_nodes(home) == registered  # nothing was registered or unregistered

        # ---- merchants (docs/deployment.md "Runbook: merchant")
        def merchant(i: int, key: int) -> list[str]:
            return [FEDCVR, "merchant", "start", "--data-dir", str(merchants[(i - 1) % 3]),
                    "--model-dir", str(tmp_path / f"merchant-{i}" / "model"), "--superlink", f"127.0.0.1:{link_port}",
                    "--ca", str(keys / "ca.pem"), "--key", str(keys / "merchants" / f"merchant-0{key}"),
                    "--port", str(node_ports[i - 1])]

        for i in (1, 2, 3):
            procs.start(f"merchant-{i}", merchant(i, i))
        # a node whose key was never registered is refused and gives up
        intruder = procs.start("unregistered", merchant(4, 4))
        code = wait_for("the unregistered node to be refused", lambda: intruder.poll() is not None, 120)
        assert code and intruder.returncode != 0
        assert "Failed to activate SuperNode" in procs.log("unregistered") or "305" in procs.log("unregistered")
        procs.running.pop("unregistered")

        # ---- a training run with DP-SGD and SecAgg+
        run_dir = tmp_path / "run"
        small = (f"model.encoder='{tiny_bert}' model.dim=8 model.attention-hidden=8 model.head-hidden=8 "
                 "model.max-text-tokens=32 examples.history-length=8 train.batch-size=128 round-timeout=180")
        procs.start("run", [FEDCVR, "coordinator", "run", "--home", str(home), "--out", str(run_dir),
                            "--rounds", str(ROUNDS), "--secagg", "--run-config", small])
        wait_for("round 1", lambda: len(rounds_written(run_dir)) >= 1, 300)
        # a merchant's node dies in round 2: the round goes on without it
        procs.stop("merchant-3", signal.SIGKILL)
        wait_for("round 2 to unmask without merchant 3",
                 lambda: "Round 2: unmasked the mean of 2 node(s)" in procs.log("run"), 300)
        procs.start("merchant-3", merchant(3, 3))  # the merchant restarts it
        wait_for("round 2", lambda: len(rounds_written(run_dir)) >= 2, 300)
        assert rounds_written(run_dir)[1]["nodes-trained"] == 2

        # ---- the SuperLink crashes after round 2 and is restarted; the run resumes from its checkpoint
        below_link = descendants(procs.running["superlink"].pid)  # its SuperExec (a session of its own) and tasks
        assert below_link
        procs.stop("superlink", signal.SIGKILL)
        wait_for("the SuperLink's SuperExec to end with it", lambda: not any(alive(p) for p in below_link), 30)
        run = procs.running["run"]
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        procs.stop("run")
        assert not (run_dir / "summary.json").exists()
        procs.start("superlink", start_link)
        wait_for("the restarted SuperLink to listen", lambda: port_open(link_port), 60)
        resumed_dir = tmp_path / "resumed"
        resumed = fedcvr("coordinator", "run", "--home", str(home), "--out", str(resumed_dir), "--rounds",
                         str(ROUNDS), "--secagg", "--resume", str(run_dir), "--run-config", small, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

        summary = json.loads((resumed_dir / "summary.json").read_text())
        assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
        assert summary["resumed_from_round"] == 2
        assert [r["nodes-trained"] for r in summary["rounds"]] == [3, 2, 3]
        assert 0 < summary["rounds"][-1]["max-epsilon"] <= 8.0 * 1.0001
        assert 0 < summary["test"]["ctcvr.auc"] < 1
        # every merchant's node saved the final model into its --model-dir
        for i in (1, 2, 3):
            version = (tmp_path / f"merchant-{i}" / "model" / "VERSION").read_text().strip()
            assert version == summary["model_version"]
        # each message ran in a ClientApp process of its own: every one that ended was reaped
        for i in (1, 2, 3):
            node = procs.running[f"merchant-{i}"].pid
            wait_for(f"no zombie under merchant {i}'s node", lambda node=node: not zombies_below(node), 15)
    except BaseException:
        for name in ("superlink", "run", "merchant-1", "merchant-3", "unregistered"):
            print(f"==== {name}\n{procs.log(name)[-4000:]}")
        raise
    finally:
        procs.stop_all()
