"""`fedcvr simulate`: the launcher's plain pieces, the command's checks and output with a faked run, `launch`
against a fake `flwr` executable, and one end-to-end `flwr run` simulation (slow)."""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from fedcvr.cli import app
from fedcvr.shared import flower_app, run_records
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


# ---------------------------------------------------------------- rounds.jsonl, history, CSV, table


def test_read_rounds_leaves_a_half_written_last_line_for_the_next_poll(tmp_path):
    path = tmp_path / "rounds.jsonl"
    line2 = json.dumps(ROUND_2)
    path.write_text(json.dumps(ROUND_1) + "\n" + line2[:20])
    records, offset = run_records.read_rounds(path)
    assert records == [ROUND_1] and offset == len(json.dumps(ROUND_1)) + 1
    assert run_records.read_rounds(path, offset) == ([], offset)  # still half written
    with path.open("a") as handle:
        handle.write(line2[20:] + "\n")
    records, offset = run_records.read_rounds(path, offset)
    assert records == [ROUND_2] and offset == path.stat().st_size


def test_read_rounds_final_reads_a_last_line_without_newline_only_if_it_parses(tmp_path):
    path = tmp_path / "rounds.jsonl"
    path.write_text(json.dumps(ROUND_1) + "\n" + json.dumps(ROUND_2))
    assert run_records.read_rounds(path, final=True)[0] == [ROUND_1, ROUND_2]
    path.write_text(json.dumps(ROUND_1) + "\n" + json.dumps(ROUND_2)[:-5])
    assert run_records.read_rounds(path, final=True)[0] == [ROUND_1]


def test_read_rounds_skips_bad_lines_and_tolerates_a_missing_file(tmp_path):
    path = tmp_path / "rounds.jsonl"
    assert run_records.read_rounds(path, 7) == ([], 7)
    path.write_text("not json\n[1, 2]\n\n" + json.dumps(ROUND_1) + "\n")
    assert run_records.read_rounds(path)[0] == [ROUND_1]


def test_load_history_prefers_history_json_then_rounds_jsonl(tmp_path):
    assert run_records.load_history(tmp_path) == ([], None)
    (tmp_path / "rounds.jsonl").write_text(json.dumps(ROUND_2) + "\n" + json.dumps(ROUND_1) + "\n"
                                           + json.dumps({**ROUND_1, "ctcvr.auc": 0.7}) + "\n" + '{"round": 3')
    records, source = run_records.load_history(tmp_path)
    assert source == "rounds.jsonl"
    assert [r["round"] for r in records] == [1, 2] and records[0]["ctcvr.auc"] == 0.7  # the last of round 1
    (tmp_path / "history.json").write_text("[{\"round\": 1")  # unreadable: fall back
    assert run_records.load_history(tmp_path)[1] == "rounds.jsonl"
    (tmp_path / "history.json").write_text(json.dumps([ROUND_1, ROUND_2]))
    assert run_records.load_history(tmp_path) == ([ROUND_1, ROUND_2], "history.json")


def test_history_csv_has_one_row_per_round_with_round_first(tmp_path):
    records = [{"seconds": 1.0, "round": 1, "ctcvr.auc": None, "declined": ["x: no data"], "train": {"loss": 0.5}},
               {"round": 2, "seconds": 2.0, "ctcvr.auc": 0.6, "max-epsilon": 1.5}]
    path = run_records.write_history_csv(records, tmp_path / "history.csv")
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["round", "seconds", "ctcvr.auc", "declined", "train.loss", "max-epsilon"]
    assert rows[0] == {"round": "1", "seconds": "1.0", "ctcvr.auc": "", "declined": '["x: no data"]',
                       "train.loss": "0.5", "max-epsilon": ""}
    assert rows[1]["ctcvr.auc"] == "0.6" and rows[1]["max-epsilon"] == "1.5"


def test_round_cells_format_metrics_epsilon_and_megabytes():
    assert run_records.round_cells(ROUND_1) == ["1", "0.6100", "0.6600", "0.5800", "0.0512", "0.2100", "1.93 (δ=1e-05)",
                                        "2.50 / 1.25", "3.5"]
    sparse = {"round": 4, "ctcvr.auc": float("nan"), "max-epsilon": float("inf"), "bytes_sent": 10**6}
    assert run_records.round_cells(sparse) == ["4", "n/a", "n/a", "n/a", "n/a", "n/a", "∞", "1.00 / n/a", "n/a"]
    assert run_records.round_cells({"round": 5, "max-epsilon": 2.0, "delta": 0.05})[6] == "2.00 (δ=0.05)"
    assert run_records.progress_text(None) == "waiting for round 1"
    assert run_records.progress_text(ROUND_2) == "ctcvr.auc 0.6400  max ε 2.71 (δ=1e-05)"


def test_rounds_table_renders_every_round():
    console = Console(record=True, width=200)
    console.print(run_records.rounds_table([ROUND_1, ROUND_2]))
    text = console.export_text()
    for column in run_records.TABLE_COLUMNS:
        assert column in text
    assert "0.6100" in text and "0.6400" in text and "2.71 (δ=1e-05)" in text


def test_tail_strips_colours_and_keeps_the_last_lines(tmp_path):
    log = tmp_path / "flower.log"
    log.write_text("".join(f"\x1b[92mINFO\x1b[0m: line {i}\n" for i in range(100)))
    text = run_records.tail(log, 40)
    assert text.splitlines() == [f"INFO: line {i}" for i in range(60, 100)]
    assert run_records.tail(tmp_path / "missing.log") == ""


# ---------------------------------------------------------------- run config


def test_parse_run_config_reads_toml_values():
    assert flower_app.parse_run_config("") == {}
    parsed = flower_app.parse_run_config(" round-timeout=120 train.lr=3e-3 dp.enabled=false model.encoder='/m/x y' "
                                  'note="a \\"b\\"" train.seed=-1 ')
    assert parsed == {"round-timeout": 120, "train.lr": 0.003, "dp.enabled": False, "model.encoder": "/m/x y",
                      "note": 'a "b"', "train.seed": -1}


@pytest.mark.parametrize(("text", "needle"), [
    ("strategy=fedprox", "text goes in quotes: strategy='fedprox'"),
    ("round-timeout", "cannot read 'round-timeout'"),
    ("a=1 b", "cannot read 'b'"),
    ("x=[1,2]", "is not a number, true/false or quoted text"),
    ("train.lr=1 train.lr=2", "sets train.lr twice"),
    ("bad/key=1", "'bad/key' is not a run config key"),
    ("model.encoder='/m/x", "cannot read"),
])
def test_parse_run_config_errors_name_the_pair_and_the_fix(text, needle):
    with pytest.raises(flower_app.LaunchError, match=re.escape(needle)):
        flower_app.parse_run_config(text)


DECLARED = {"data-root": "data/demo", "out-dir": "", "num-server-rounds": 1, "min-nodes": 2, "seed": 42,
            "round-timeout": 600, "strategy": "fedavg", "dp.enabled": True, "dp.target-epsilon": 8.0,
            "local-epochs": 1, "train.lr": 0.006}
FIXED = [flower_app.Setting("data-root", "/d"), flower_app.Setting("out-dir", "/o"),
         flower_app.Setting("num-server-rounds", 3), flower_app.Setting("min-nodes", 4)]


def test_build_run_config_sets_options_and_extra_pairs():
    overrides, notes = flower_app.build_run_config(
        DECLARED, REPO,
        [*FIXED, flower_app.Setting("strategy", "fedprox", "--strategy"), flower_app.Setting("seed", 0)],
        {"train.lr": 0.001, "seed": 5})
    assert overrides == {"data-root": "/d", "out-dir": "/o", "num-server-rounds": 3, "min-nodes": 4,
                         "strategy": "fedprox", "seed": 5, "train.lr": 0.001}  # --run-config replaces implied
    assert notes == []


def test_build_run_config_leaves_out_implied_keys_the_app_lacks_with_a_note():
    declared = {k: v for k, v in DECLARED.items() if k not in ("strategy", "dp.enabled")}
    overrides, notes = flower_app.build_run_config(
        declared, REPO, [*FIXED, flower_app.Setting("strategy", "fedavg"), flower_app.Setting("dp.enabled", True)], {})
    assert "strategy" not in overrides and "dp.enabled" not in overrides
    assert notes == ['the Flower App does not declare `strategy`: left out (it would have been "fedavg")',
                     "the Flower App does not declare `dp.enabled`: left out (it would have been true)"]


@pytest.mark.parametrize(("settings", "extra", "needle"), [
    ([flower_app.Setting("local-epoch", 2, "--local-epochs")], {},
     "--local-epochs sets `local-epoch`, but the Flower App in"),
    ([], {"train.rl": 0.1}, "--run-config sets `train.rl`, but the Flower App in .* Did you mean train.lr\\?"),
    ([], {"min-nodes": 2}, "--run-config may not set `min-nodes`: `fedcvr simulate` sets it from the number"),
    ([flower_app.Setting("strategy", "fedadam", "--strategy")], {"strategy": "'fedprox'"},
     "--run-config sets `strategy`, which --strategy sets too"),
])
def test_build_run_config_errors(settings, extra, needle):
    with pytest.raises(flower_app.LaunchError, match=needle):
        flower_app.build_run_config(DECLARED, REPO, [*FIXED, *settings], extra)


def test_build_run_config_needs_the_fixed_keys():
    declared = {k: v for k, v in DECLARED.items() if k != "min-nodes"}
    with pytest.raises(flower_app.LaunchError, match="does not declare `min-nodes`"):
        flower_app.build_run_config(declared, REPO, FIXED, {})


def test_run_config_file_reads_back_as_the_same_flat_keys_in_toml_and_in_flwr(tmp_path):
    from flwr.common.config import parse_config_args

    overrides = {"data-root": "/data/with \"quotes\" and \\ back", "num-server-rounds": 3, "dp.enabled": False,
                 "dp.target-epsilon": 4.0, "train.lr": 1e-4, "model.encoder": "café", "seed": 0}
    path = flower_app.write_run_config(tmp_path / "run-config.toml", overrides)
    assert flower_app.flatten(tomllib.loads(path.read_text())) == overrides
    assert parse_config_args([str(path)]) == overrides
    assert "dp.enabled = false" in path.read_text()


def test_run_config_that_toml_cannot_hold_is_refused(tmp_path):
    with pytest.raises(flower_app.LaunchError, match="cannot be written as TOML"):
        flower_app.write_run_config(tmp_path / "c.toml", {"dp": 1, "dp.enabled": True})


def test_find_app_dir_is_the_repository_with_the_flower_app(tmp_path):
    assert flower_app.find_app_dir() == REPO
    assert flower_app.app_run_config(REPO)["num-server-rounds"] >= 1
    package = tmp_path / "site" / "fedcvr" / "__init__.py"
    package.parent.mkdir(parents=True)
    package.write_text("")
    with pytest.raises(flower_app.LaunchError, match="no pyproject.toml in .*pip install -e"):
        flower_app.find_app_dir(package)
    (tmp_path / "site" / "pyproject.toml").write_text("[project]\nname = 'other'\n")
    with pytest.raises(flower_app.LaunchError, match=r"has no \[tool.flwr.app\] section"):
        flower_app.find_app_dir(package)


def test_run_folders_inside_the_app_must_be_ignored_by_git(tmp_path):
    assert not flower_app.packed_into_app(REPO, REPO / "runs" / "demo")  # /runs/ is in .gitignore
    assert flower_app.packed_into_app(REPO, REPO / "my-run")
    assert flower_app.packed_into_app(REPO, REPO)
    assert not flower_app.packed_into_app(REPO, tmp_path / "run")


# ---------------------------------------------------------------- ports, environment, processes


def test_free_ports_are_different_and_bindable():
    import socket

    ports = sim.free_ports(2)
    assert len(set(ports)) == 2
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_flwr_env_is_offline_on_our_own_ports(tmp_path):
    env = sim.flwr_env(tmp_path / "flwr", Path("/venv/bin"), base={"PATH": "/usr/bin", "KEEP": "1"},
                       ports=(1234, 5678))
    assert env["PATH"] == f"/venv/bin{os.pathsep}/usr/bin" and env["KEEP"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path / "flwr")
    assert env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] == "1234" and env["FLWR_LOCAL_CONTROL_API_PORT"] == "5678"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    command = sim.flwr_run_command(Path("/venv/bin"), REPO, 4, tmp_path / "run-config.toml")
    assert command[:4] == ["/venv/bin/flwr", "run", str(REPO), "--stream"]
    assert "num-supernodes=4 client-resources-num-cpus=1" in command


def _sleeper(flwr_home: Path, *, ignore_term: bool = False, argv0: str | None = None) -> subprocess.Popen:
    code = ("import signal, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
            + "print('ready', flush=True)\ntime.sleep(120)\n")
    process = subprocess.Popen([argv0 or sys.executable, "-c", code], executable=sys.executable,
                               env={**os.environ, "FLWR_HOME": str(flwr_home)}, start_new_session=True,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_process_scan_finds_a_marked_child_and_stop_kills_it_by_pid(tmp_path):
    home = tmp_path / "flwr"
    process = _sleeper(home)
    try:
        assert process.pid in sim.processes_of(home)
        assert process.pid not in sim.processes_of(tmp_path / "other")
        assert os.getpid() not in sim.processes_of(home)
        assert sim.stop_processes(home, grace=5) == [process.pid]
        assert process.wait(timeout=5) == -signal.SIGTERM
        assert sim.processes_of(home) == {}
    finally:
        if process.poll() is None:
            process.kill()


def test_stop_kills_what_ignores_sigterm_after_the_grace_time(tmp_path):
    home = tmp_path / "flwr"
    process = _sleeper(home, ignore_term=True)
    try:
        started = time.monotonic()
        assert sim.stop_processes(home, grace=0.5) == [process.pid]
        assert process.wait(timeout=5) == -signal.SIGKILL
        assert time.monotonic() - started < 5
    finally:
        if process.poll() is None:
            process.kill()


def test_stop_also_ends_unmarked_processes_in_the_session_of_a_flower_process(tmp_path):
    """The SuperLink and SuperExec lead sessions of their own; what runs in them goes too."""
    home = tmp_path / "flwr"
    code = ("import subprocess, sys, time\n"
            f"child = subprocess.Popen([{sys.executable!r}, '-c', 'import time; time.sleep(120)'], env={{}})\n"
            "print(child.pid, flush=True)\ntime.sleep(120)\n")
    leader = subprocess.Popen(["flower-superexec", "-c", code], executable=sys.executable,
                              env={**os.environ, "FLWR_HOME": str(home)}, start_new_session=True,
                              stdout=subprocess.PIPE, text=True)
    child = int(leader.stdout.readline())
    try:
        assert child not in sim.processes_of(home)
        assert sorted(sim.stop_processes(home, grace=5)) == sorted([leader.pid, child])
        leader.wait(timeout=5)
        deadline = time.monotonic() + 5
        while sim.alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not sim.alive(child)
    finally:
        for pid in (leader.pid, child):
            if sim.alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_ancestors_hold_this_process_and_its_parent():
    parent = {os.getppid()} if os.getppid() > 1 else set()  # an orphan's parent is PID 1, which is never listed
    assert {os.getpid(), *parent} <= sim.ancestors()


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
    process = _sleeper(run_dir / "flwr")
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
