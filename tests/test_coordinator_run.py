"""`fedcvr coordinator run` against a fake `flwr`: it follows a run whose log stream ends early to the run's end,
and when it gives up (--timeout, SIGTERM) it stops the run at the SuperLink or prints the exact command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcvr.cli import app
from fedcvr.server import deploy, follow

FAKE_FLWR = """\
#!{python}
import json, os, sys, time, tomllib
from pathlib import Path

args, mode = sys.argv[1:], os.environ["FAKE_FLWR_MODE"]
home = Path(os.environ["FLWR_HOME"])
state = home / "fake-state.json"
known = json.loads(state.read_text()) if state.exists() else {{"asked": 0}}

def save():
    state.write_text(json.dumps(known))

def finish(out):
    (out / "rounds.jsonl").write_text(json.dumps({{"round": 1, "ctcvr.auc": 0.6}}) + "\\n")
    (out / "history.json").write_text(json.dumps([{{"round": 1, "ctcvr.auc": 0.6}}]))
    (out / "summary.json").write_text(json.dumps({{"rounds": []}}))

if args[0] == "run":
    out = Path(tomllib.loads(Path(args[args.index("--run-config") + 1]).read_text())["out-dir"])
    known["out"] = str(out); save()
    print("\\x1b[92mINFO \\x1b[0m: Successfully started run 5", flush=True)
    if mode == "ok":
        finish(out)
    elif mode in ("hang", "hang-nostop"):
        (home / "flwr-run.pid").write_text(str(os.getpid()))
        time.sleep(120)
    sys.exit(0)  # "early": the stream ends while the run goes on
if args[0] == "ls":
    known["asked"] += 1; save()
    if known.get("stopped"):
        status = "finished:stopped"
    elif mode == "early" and known["asked"] >= 3:
        finish(Path(known["out"])); status = "finished:completed"
    elif mode == "ok":
        status = "finished:completed"
    else:
        status = "running"
    print(json.dumps({{"success": True, "runs": [{{"run-id": 5, "status": status, "status-details": ""}}]}}))
    sys.exit(0)
if args[0] == "stop":
    assert args[1:] == ["5", "fedcvr"], args
    if mode == "hang-nostop":
        print("Connection to the SuperLink is unavailable.")
        sys.exit(1)
    known["stopped"] = True; save()
    print("Run 5 stopped")
    sys.exit(0)
sys.exit(f"unexpected {{args}}")
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A coordinator home with a connection, and a fake `flwr` that `coordinator run` finds."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "flwr").write_text(FAKE_FLWR.format(python=sys.executable))
    (folder / "flwr").chmod(0o755)
    home = deploy.CoordinatorHome(tmp_path / "home")
    deploy.write_connection(home, "127.0.0.1:9093", None)
    monkeypatch.setattr("fedcvr.shared.deploy.flwr_bin_dir", lambda: folder)
    monkeypatch.setattr(follow, "FOLLOW_SECONDS", 0.1)
    return folder, home


def run(home: deploy.CoordinatorHome, out: Path, mode: str, monkeypatch, *extra: str):
    monkeypatch.setenv("FAKE_FLWR_MODE", mode)
    return CliRunner().invoke(app, ["coordinator", "run", "--home", str(home.folder), "--out", str(out), *extra])


def test_a_finished_run_exits_0(fake, tmp_path, monkeypatch):
    _, home = fake
    result = run(home, tmp_path / "out", "ok", monkeypatch)
    assert result.exit_code == 0, result.output
    assert "done:" in result.output


def test_when_the_stream_ends_early_the_run_is_followed_to_its_end(fake, tmp_path, monkeypatch):
    """The log stream ended while the run went on at the SuperLink: `run` used to exit 1 at once."""
    _, home = fake
    result = run(home, tmp_path / "out", "early", monkeypatch)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "stream ended while run 5 is running" in output and "round 1 done" in output
    assert (tmp_path / "out" / "summary.json").exists()


def test_on_its_timeout_run_stops_the_run_at_the_superlink(fake, tmp_path, monkeypatch):
    _, home = fake
    started = time.monotonic()
    result = run(home, tmp_path / "out", "hang", monkeypatch, "--timeout", "2")
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "no end within --timeout 2 s: stopped run 5 at the SuperLink" in output
    assert "finished:stopped" in output and "--resume" in output
    assert json.loads((home.flwr_home / "fake-state.json").read_text())["stopped"] is True
    flwr_run = int((home.flwr_home / "flwr-run.pid").read_text())
    assert not Path(f"/proc/{flwr_run}").exists() or "Z" in Path(f"/proc/{flwr_run}/stat").read_text().split()[2]
    assert time.monotonic() - started < 30


def test_when_stopping_fails_run_prints_the_exact_command(fake, tmp_path, monkeypatch):
    folder, home = fake
    result = run(home, tmp_path / "out", "hang-nostop", monkeypatch, "--timeout", "1")
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "could not stop run 5" in output and "Connection to the SuperLink is unavailable" in output
    assert f"  FLWR_HOME={home.flwr_home} {folder / 'flwr'} stop 5 fedcvr\n" in result.output  # one line


def test_sigterm_stops_the_run_and_flwr_run(fake, tmp_path):
    folder, home = fake
    code = ("import sys\nfrom pathlib import Path\nimport fedcvr.shared.deploy as shared_deploy\n"
            f"shared_deploy.flwr_bin_dir = lambda: Path({str(folder)!r})\nfrom fedcvr.cli import app\n"
            f"app(['coordinator', 'run', '--home', {str(home.folder)!r}, '--out', {str(tmp_path / 'out')!r}])\n")
    process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "FAKE_FLWR_MODE": "hang"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid_file = home.flwr_home / "flwr-run.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    flwr_run = int(pid_file.read_text())
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1, output
    assert "interrupted: stopped run 5 at the SuperLink" in " ".join(output.split())
    assert json.loads((home.flwr_home / "fake-state.json").read_text())["stopped"] is True
    deadline = time.monotonic() + 10
    while Path(f"/proc/{flwr_run}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{flwr_run}").exists()  # flwr run ended and was waited for
