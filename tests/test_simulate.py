"""`fedcvr simulate`: the command's checks and output with
a faked run, `launch` against a fake `flwr` executable, and one end-to-end `flwr run` simulation (slow). The run
config, the round records and the launcher's processes have their own tests (`test_run_config.py`,
`test_run_records.py`, `test_processes.py`)."""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from support import sleeper
from typer.testing import CliRunner

from fedcvr.cli import app
from fedcvr.shared import flower_app
from fedcvr.simulations import launcher as sim

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["simulate", *args])


def write_merchant(folder: Path, item_ids: list[str], events: list[tuple[str, str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": item_ids, "title": [f"Item {i}" for i in item_ids]}).to_parquet(folder / "items.parquet")
    pd.DataFrame({"user_id": [e[0] for e in events], "item_id": [e[1] for e in events],
                  "event": [e[2] for e in events],
                  "timestamp": pd.date_range("2024-03-01", periods=len(events), freq="min")}
                 ).to_parquet(folder / "events.parquet")
    return folder


@pytest.fixture
def market(tmp_path: Path) -> Path:
    root = tmp_path / "market"
    for name in ("shop-a", "shop-b", "shop-c"):
        write_merchant(root / name, ["i0", "i1"], [("u1", "i0", "impression"), ("u1", "i0", "click"),
                                                   ("u2", "i1", "impression")])
    return root


ROUND_1 = {"round": 1, "seconds": 3.5, "ctcvr.auc": 0.61, "click.auc": 0.66, "ctcvr.gauc": 0.58,
           "ctcvr.logloss": 0.0512, "ndcg@10": 0.21, "max_epsilon": 1.9312, "delta": 1e-05,
           "bytes_sent": 2_500_000, "bytes_received": 1_250_000, "clients_trained": 3, "clients_declined": 0}
ROUND_2 = {**ROUND_1, "round": 2, "ctcvr.auc": 0.64, "max_epsilon": 2.71, "seconds": 3.1}


# ---------------------------------------------------------------- launch() with a fake `flwr`


def fake_launch(tmp_path: Path, fake_bin: Path, rounds: int = 2, **kwargs):
    run_dir = tmp_path / "run"
    config = flower_app.write_run_config(run_dir / "run-config.toml",
                                         {"out-dir": str(run_dir), "num-server-rounds": rounds})
    seen: list[dict] = []
    outcome = sim.launch(run_dir, REPO, 3, config, on_round=seen.append, poll=0.05, bin_dir=fake_bin, **kwargs)
    return outcome, seen, run_dir


def test_launch_follows_the_rounds_checks_the_status_and_stops_the_superlink(tmp_path, fake_bin, monkeypatch):
    monkeypatch.setenv("FAKE_FLWR_MODE", "ok")
    outcome, seen, run_dir = fake_launch(tmp_path, fake_bin, rounds=3)
    assert outcome.ok and outcome.run_id == "77" and outcome.status == "finished:completed", outcome
    assert [r["round"] for r in seen] == [1, 2, 3]
    log = (run_dir / "flower.log").read_text()
    assert "INFO : Successfully started run 77" in log and "round 3 done" in log and "\x1b" not in log
    assert (run_dir / "flwr" / "config.toml").read_text() == sim.FLWR_CONFIG_TOML
    assert outcome.stopped  # the fake SuperLink
    assert sim.processes_of(run_dir / "flwr") == {}


def test_launch_reports_a_failed_run(tmp_path, fake_bin, monkeypatch):
    monkeypatch.setenv("FAKE_FLWR_MODE", "fail")
    outcome, _, run_dir = fake_launch(tmp_path, fake_bin)
    assert not outcome.ok and outcome.status == "finished:failed"
    assert outcome.details == "ServerApp raised ValueError: boom"
    assert sim.processes_of(run_dir / "flwr") == {}


def test_launch_without_a_run(tmp_path, fake_bin, monkeypatch):
    monkeypatch.setenv("FAKE_FLWR_MODE", "no-run")
    outcome, _, run_dir = fake_launch(tmp_path, fake_bin)
    assert not outcome.ok and outcome.run_id is None and outcome.returncode == 1
    assert "`flwr run` exited with code 1 without starting a run" in outcome.details
    assert sim.processes_of(run_dir / "flwr") == {}


def test_launch_timeout_stops_everything(tmp_path, fake_bin, monkeypatch):
    monkeypatch.setenv("FAKE_FLWR_MODE", "hang")
    started = time.monotonic()
    outcome, _, run_dir = fake_launch(tmp_path, fake_bin, timeout=1.5)
    assert outcome.timed_out and not outcome.ok and "--timeout 1.5 s" in outcome.details
    assert outcome.stopped and outcome.run_id == "77"  # `flwr run` is ended as our child, the SuperLink by PID
    assert sim.processes_of(run_dir / "flwr") == {}
    assert time.monotonic() - started < 20


def test_launch_on_round_interrupt_still_stops_everything(tmp_path, fake_bin, monkeypatch):
    monkeypatch.setenv("FAKE_FLWR_MODE", "ok")
    run_dir = tmp_path / "run"
    config = flower_app.write_run_config(run_dir / "run-config.toml", {"out-dir": str(run_dir), "num-server-rounds": 3})

    def interrupt(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sim.launch(run_dir, REPO, 3, config, on_round=interrupt, poll=0.05, bin_dir=fake_bin)
    assert sim.processes_of(run_dir / "flwr") == {}


def test_launch_refuses_while_processes_of_an_earlier_run_are_alive(tmp_path, fake_bin):
    run_dir = tmp_path / "run"
    process = sleeper(run_dir / "flwr")
    try:
        with pytest.raises(flower_app.LaunchError, match=f"still running \\({process.pid}: "):
            sim.launch(run_dir, REPO, 1, run_dir / "c.toml", bin_dir=fake_bin)
    finally:
        sim.stop_processes(run_dir / "flwr", grace=2)
        process.wait(timeout=5)


# ---------------------------------------------------------------- the command: checks before anything starts


def test_cli_needs_data_or_merchants(tmp_path):
    result = invoke("--rounds", "1", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "--data DIR" in result.output and "--merchants M" in result.output
    both = invoke("--data", str(tmp_path), "--merchants", "3", "--rounds", "1", "--out", str(tmp_path / "run"))
    assert both.exit_code == 2 and "not both" in both.output


@pytest.mark.parametrize(("args", "needle"), [
    (["--strategy", "fedsgd"], "--strategy 'fedsgd' is not one of fedavg, fedprox, fedadam"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--dp-epsilon", "4", "--no-dp"], "pass one of them"),
    (["--dp-epsilon", "0"], "--dp-epsilon must be a number > 0"),
    (["--local-epochs", "0"], "--local-epochs must be at least 1"),
    (["--timeout", "-1"], "--timeout must be a number of seconds > 0"),
    (["--run-config", "strategy=fedprox"], "text goes in quotes"),
    (["--run-config", "no-such-key=1"], "--run-config sets `no-such-key`, but the Flower App"),
    (["--run-config", "out-dir='/x'"], "--run-config may not set `out-dir`"),
    (["--run-config", "dp.max-grad-norm=-1.0"], "dp.max-grad-norm"),
    (["--run-config", "secagg-num-shares=2"], "secagg-num-shares"),
])
def test_cli_refuses_bad_options(market, tmp_path, args, needle):
    result = invoke("--data", str(market), "--rounds", "1", "--out", str(tmp_path / "run"), *args)
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())
    assert not (tmp_path / "run" / "flwr").exists()


def test_cli_secagg_needs_three_merchants(market, tmp_path):
    import shutil

    shutil.rmtree(market / "shop-c")
    result = invoke("--data", str(market), "--rounds", "1", "--out", str(tmp_path / "run"), "--secagg")
    assert result.exit_code == 2 and "min-nodes" in result.output and "secagg" in result.output
    assert not (tmp_path / "run" / "run-config.toml").exists()


def test_cli_refuses_invalid_data_naming_the_problem(market, tmp_path, monkeypatch):
    write_merchant(market / "shop-b", ["i0"], [("u1", "i0", "impression"), ("u1", "i7", "click")])
    monkeypatch.setattr(sim, "launch", lambda *a, **k: pytest.fail("Flower must not start"))
    result = invoke("--data", str(market), "--rounds", "1", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "shop-b" in text and "refers to 1 item id(s) not in the items table" in text
    assert "1 of 3 merchant folder(s) failed validation" in text
    assert not (tmp_path / "run" / "run-config.toml").exists()


def test_cli_refuses_a_folder_without_merchants(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("--data", str(tmp_path / "empty"), "--rounds", "1", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "holds no merchant data" in " ".join(result.output.split())


def test_cli_refuses_a_run_folder_that_flwr_would_pack(market):
    result = invoke("--data", str(market), "--rounds", "1", "--out", str(REPO / "not-ignored-run"))
    assert result.exit_code == 2 and "would pack the run's files" in " ".join(result.output.split())
    assert not (REPO / "not-ignored-run").exists()


# ---------------------------------------------------------------- the command with a faked run


@pytest.fixture
def faked_run(monkeypatch):
    """Replace `launch` with a fake ServerApp: it writes rounds.jsonl and history.json like the real one."""
    calls = {}

    def fake(run_dir, app_dir, nodes, config_file, *, on_round, timeout=None, bin_dir=None, **kwargs):
        calls.update(run_dir=run_dir, app_dir=app_dir, nodes=nodes,
                     config=flower_app.flatten(tomllib.loads(config_file.read_text())),
                     timeout=timeout)
        status = calls.get("status", "finished:completed")
        rows = [ROUND_1, ROUND_2][:calls["config"]["num-server-rounds"]]
        with (run_dir / "rounds.jsonl").open("a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
                on_round(row)
        if calls.get("history", True):
            (run_dir / "history.json").write_text(json.dumps(rows))
        (run_dir / "flower.log").write_text("".join(f"log line {i}\n" for i in range(60)))
        return sim.RunOutcome(returncode=0, run_id="5", status=status,
                              details="" if status == "finished:completed" else "ServerApp raised: boom")

    monkeypatch.setattr(sim, "launch", fake)
    return calls


def test_cli_writes_the_run_config_history_csv_and_table(market, tmp_path, faked_run):
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "rounds.jsonl").write_text(json.dumps({"round": 9}) + "\n")  # an earlier run's
    result = invoke("--data", str(market), "--rounds", "2", "--out", str(run_dir), "--strategy", "FedProx",
                    "--dp-epsilon", "4", "--seed", "7", "--local-epochs", "2", "--timeout", "30",
                    "--run-config", "round-timeout=120 train.lr=0.001")
    assert result.exit_code == 0, result.output
    assert faked_run["nodes"] == 3 and faked_run["app_dir"] == REPO and faked_run["timeout"] == 30
    assert faked_run["config"] == {
        "data-root": str(market.resolve()), "out-dir": str(run_dir.resolve()), "num-server-rounds": 2,
        "min-nodes": 3, "strategy": "fedprox", "dp.enabled": True, "seed": 7, "dp.target-epsilon": 4.0,
        "local-epochs": 2, "round-timeout": 120, "train.lr": 0.001}
    with (run_dir / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["round"] for r in rows] == ["1", "2"] and rows[1]["ctcvr.auc"] == "0.64"
    text = result.output
    assert "replaced the results of an earlier run" in text
    assert "0.6100" in text and "0.6400" in text and "2.71 (δ=1e-05)" in text and "2.50 / 1.25" in text
    assert "completed run 5" in text and "log line" not in text  # Flower's output stays in flower.log


def test_cli_no_dp_and_history_from_rounds_jsonl(market, tmp_path, faked_run):
    faked_run["history"] = False
    result = invoke("--data", str(market), "--rounds", "1", "--out", str(tmp_path / "run"), "--no-dp",
                    "--no-personalise")
    assert result.exit_code == 0, result.output
    assert faked_run["config"]["dp.enabled"] is False and faked_run["config"]["strategy"] == "fedavg"
    assert faked_run["config"]["personalise"] is False
    assert "from rounds.jsonl" in result.output
    assert (tmp_path / "run" / "history.csv").read_text().startswith("round,")


def test_cli_failed_run_exits_1_with_details_and_the_log_tail(market, tmp_path, faked_run):
    faked_run["status"] = "finished:failed"
    result = invoke("--data", str(market), "--rounds", "1", "--out", str(tmp_path / "run"))
    assert result.exit_code == 1
    text = result.output
    assert "run 5 did not complete (finished:failed): ServerApp raised: boom" in " ".join(text.split())
    assert "log line 59" in text and "log line 20" in text and "log line 19\n" not in text


def test_cli_merchants_synthesises_once_and_reuses(tmp_path, faked_run, monkeypatch):
    from fedcvr.simulations import synth

    monkeypatch.setattr(synth, "SynthConfig", functools.partial(synth.SynthConfig, items=60, shoppers=30, events=300))
    run_dir = tmp_path / "run"
    first = invoke("--merchants", "3", "--rounds", "1", "--out", str(run_dir))
    assert first.exit_code == 0, first.output
    assert "wrote a synthetic marketplace of 3 merchants" in " ".join(first.output.split())
    assert faked_run["nodes"] == 3 and faked_run["config"]["data-root"] == str((run_dir / "data").resolve())
    again = invoke("--merchants", "3", "--rounds", "1", "--out", str(run_dir))
    assert again.exit_code == 0 and "reusing the synthetic marketplace" in again.output
    other = invoke("--merchants", "2", "--rounds", "1", "--out", str(run_dir))
    assert other.exit_code == 2 and "holds a synthetic marketplace of 3 merchant(s)" in " ".join(other.output.split())


# ---------------------------------------------------------------- end to end: `fedcvr simulate` with `flwr run`


@pytest.fixture
def synth_market(tmp_path) -> Path:
    """Three tiny synthetic merchants: every node has training, validation and test examples."""
    from fedcvr.simulations.synth import SynthConfig, generate_marketplace

    generate_marketplace(SynthConfig(merchants=3, items=60, shoppers=30, events=300, seed=1), tmp_path / "market")
    return tmp_path / "market"


@pytest.mark.slow
def test_simulate_end_to_end(synth_market, tiny_bert, tmp_path):
    market, run_dir = synth_market, tmp_path / "run"
    small = (f"model.encoder='{tiny_bert}' model.dim=8 model.attention-hidden=8 model.head-hidden=8 "
             "model.max-text-tokens=32 examples.history-length=8")
    command = [str(Path(sys.executable).parent / "fedcvr"), "simulate", "--data", str(market), "--rounds", "1",
               "--out", str(run_dir), "--timeout", "240", "--run-config", f"round-timeout=120 {small}"]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    finally:
        left = sim.processes_of(run_dir / "flwr")
        sim.stop_processes(run_dir / "flwr", grace=2)
    wall = time.monotonic() - started
    log = (run_dir / "flower.log").read_text() if (run_dir / "flower.log").exists() else ""
    report = f"exit code {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}\n--- log\n{log}"
    print(f"\nfedcvr simulate took {wall:.1f} s")
    assert not left, f"processes left running: {left}"
    assert done.returncode == 0, report
    assert re.search(r"completed run \d+", done.stdout), report  # `flwr ls` said finished:completed
    run_id = re.search(r"completed run (\d+)", done.stdout).group(1)
    assert f"Successfully started run {run_id}" in log
    config = tomllib.loads((run_dir / "run-config.toml").read_text())
    assert config["data-root"] == str(market.resolve()) and config["min-nodes"] == 3
    assert config["num-server-rounds"] == 1 and config["out-dir"] == str(run_dir.resolve())
    if (run_dir / "rounds.jsonl").exists():  # the ServerApp trains: one round, one CSV row
        with (run_dir / "history.csv").open() as handle:
            assert [r["round"] for r in csv.DictReader(handle)] == ["1"]
