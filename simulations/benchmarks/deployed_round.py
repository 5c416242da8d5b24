"""What a deployed round costs beyond the work: a SuperLink and N merchant nodes on this machine (TLS, node
authentication, the runbooks' commands), one run without and one with SecAgg+, and for each round its wall time
against the slowest node's own training and evaluation time; the rest is overhead (Flower's messages and each
message's fresh ClientApp process on a node), shown per message a node handles in the round.

    python -m fedcvr.simulations.benchmarks.deployed_round [--data MARKET] [--merchants 3] [--rounds 2]
        [--modes plain secagg] [--run-config "k=v ..."] [--out runs/bench-deployed]

Without --data the default synthetic marketplace (seed 0) is written into OUT/data. The prefix cache is filled
before the nodes start (its one-time encoding is not a round's cost). Every process is started in a session of
its own and stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedcvr.shared.processes import end_session, interrupt_on_sigterm
from fedcvr.simulations.benchmarks.common import command, machine, print_table, write_result
from fedcvr.simulations.launcher import free_ports

# Messages a node handles in one round: plain, train and evaluate; under SecAgg+, the workflow's four training
# stages (setup, share keys, collect masked vectors, unmask) and evaluate.
MESSAGES = {"plain": 2, "secagg": 5}


class Processes:
    """Background processes, each in a session of its own, stopped by PID (process group)."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs, self.env = logs, env
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        self.running[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                              start_new_session=True)
        return self.running[name]

    def stop_all(self) -> None:
        for name in list(self.running):
            end_session(self.running.pop(name))


def _fedcvr() -> str:
    return str(Path(sys.executable).parent / "fedcvr")


def _wait_for_port(port: int, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s: see the SuperLink's log")


def _run(argv: list[str], env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({done.returncode}): {done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")
    return done.stdout


def fill_prefix_cache(folders: list[Path], run_config: dict[str, Any]) -> None:
    """Encode every merchant's catalog into the prefix cache the nodes will read ($FEDCVR_CACHE)."""
    from fedcvr.client.node import NodeSettings
    from fedcvr.shared import flower_app
    from fedcvr.shared.data.loader import load_merchant
    from fedcvr.shared.model.encoder import load_backbone
    from fedcvr.shared.model.prefix_cache import PrefixCache
    from fedcvr.shared.training.data import Catalog

    settings = NodeSettings.from_run_config({**flower_app.declared_defaults(), **run_config})
    cache = PrefixCache(load_backbone(settings.model.encoder), settings.model.adapter_layers,
                        settings.model.max_text_tokens)
    for folder in folders:
        cache.states(Catalog.from_items([load_merchant(folder).items]).texts)


def round_rows(run_dir: Path, mode: str) -> list[dict[str, Any]]:
    """Each round's wall time, the slowest node's training and evaluation, and the overhead per message."""
    rows = []
    for line in (run_dir / "rounds.jsonl").read_text().splitlines():
        record = json.loads(line)
        train = float(record.get("client-train-seconds-max", 0.0))
        evaluate = float(record.get("client-evaluate-seconds-max", 0.0))
        overhead = float(record["seconds"]) - train - evaluate
        rows.append({"mode": mode, "round": record["round"], "round_s": float(record["seconds"]), "train_s": train,
                     "evaluate_s": evaluate, "overhead_s": overhead, "messages": MESSAGES[mode],
                     "overhead_per_message_s": overhead / MESSAGES[mode]})
    return rows


def _run_federation(args: argparse.Namespace, folders: list[Path], work: Path, env: dict[str, str],
                    procs: Processes, rows: list[dict[str, Any]]) -> None:
    """Keys, a SuperLink, the merchants' nodes, then one run per mode; each round's row appended to `rows`."""
    keys, home = work / "keys", work / "coordinator"
    link_port, control_port, *node_ports = free_ports(2 + args.merchants)
    _run([_fedcvr(), "keys", "init", str(keys), "--superlink-host", "127.0.0.1", "--merchants",
          str(args.merchants)], env)
    procs.start("superlink", [_fedcvr(), "coordinator", "start", "--home", str(home), "--keys", str(keys),
                              "--host", "127.0.0.1", "--port", str(link_port),
                              "--control-address", f"127.0.0.1:{control_port}"])
    _wait_for_port(link_port, 60)
    _wait_for_port(control_port, 60)
    for i, folder in enumerate(folders, start=1):
        _run([_fedcvr(), "coordinator", "register", str(keys / "merchants" / f"merchant-{i:02d}.pub"),
              "--home", str(home)], env)
        procs.start(f"merchant-{i}", [
            _fedcvr(), "merchant", "start", "--data-dir", str(folder), "--model-dir",
            str(work / f"merchant-{i}" / "model"), "--superlink", f"127.0.0.1:{link_port}",
            "--ca", str(keys / "ca.pem"), "--key", str(keys / "merchants" / f"merchant-{i:02d}"),
            "--port", str(node_ports[i - 1])])
    for mode in args.modes:
        run_dir = work / f"run-{mode}"
        run = [_fedcvr(), "coordinator", "run", "--home", str(home), "--out", str(run_dir), "--rounds",
               str(args.rounds)] + (["--secagg"] if mode == "secagg" else [])
        if args.run_config:
            run += ["--run-config", args.run_config]
        started = time.perf_counter()
        _run(run, env, timeout=3600)
        print(f"{mode}: {args.rounds} round(s) in {time.perf_counter() - started:.0f} s", flush=True)
        failed = [r for r in round_rows(run_dir, mode) if r["train_s"] == 0.0]
        if failed:
            raise RuntimeError(f"{mode}: round(s) {[r['round'] for r in failed]} trained on no node: see "
                               f"{run_dir / 'rounds.jsonl'} (failed) and the logs in {work / 'logs'}")
        rows += round_rows(run_dir, mode)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="Marketplace folder (default: the synthetic default in OUT/data)")
    parser.add_argument("--merchants", type=int, default=3, help="Merchant nodes (>= 3 for SecAgg+)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=sorted(MESSAGES), default=["plain", "secagg"])
    parser.add_argument("--run-config", default="", help="Extra run config, \"key=value ...\"")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-deployed"))
    args = parser.parse_args(argv)
    if args.merchants < 3 and "secagg" in args.modes:
        parser.error("SecAgg+ needs at least 3 merchants: --merchants 3 or more")
    from fedcvr.shared.data.loader import merchant_folders
    from fedcvr.shared.flower_app import parse_run_config

    out = args.out.resolve()
    work = out / "work"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
           "FEDCVR_CACHE": os.environ.get("FEDCVR_CACHE", str(out / "prefix-cache"))}
    os.environ["FEDCVR_CACHE"] = env["FEDCVR_CACHE"]
    data = args.data
    if data is None:
        data = out / "data"
        if not data.exists():
            _run([_fedcvr(), "data", "synth", "--out", str(data), "--seed", "0"], env)
    folders = merchant_folders(data.resolve())[:args.merchants]
    if len(folders) < args.merchants:
        parser.error(f"{data} has {len(folders)} merchant folders, fewer than --merchants {args.merchants}")
    fill_prefix_cache(folders, parse_run_config(args.run_config))

    procs = Processes(work / "logs", env)
    rows: list[dict[str, Any]] = []
    with interrupt_on_sigterm():  # a benchmark stopped with SIGTERM still stops every process it started
        try:
            _run_federation(args, folders, work, env, procs, rows)
        finally:
            procs.stop_all()
    table = [(f"{r['mode']} round {r['round']}",
              f"{r['round_s']:6.1f} s = slowest training {r['train_s']:5.1f} s + slowest evaluation "
              f"{r['evaluate_s']:4.1f} s + overhead {r['overhead_s']:5.1f} s ({r['messages']} messages: "
              f"{r['overhead_per_message_s']:.1f} s each)") for r in rows]
    print_table(table)
    result = {"benchmark": "deployed_round", "command": command("fedcvr.simulations.benchmarks.deployed_round", argv),
              "machine": machine(), "merchants": args.merchants, "rounds": rows,
              "data": str(data), "run_config": args.run_config}
    write_result(out / "deployed_round.json", result)
    return result


if __name__ == "__main__":
    main()
