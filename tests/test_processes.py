"""Nothing fedcvr starts outlives it, and ended children are reaped (`shared/processes.py`, the watchdog of
`fedcvr simulate`'s launcher). Processes are looked up by PID in /proc, never by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import descendants, sleeper

from fedcvr.shared import flower_app, processes
from fedcvr.simulations import launcher as sim

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc, prctl)")


def gone(pids: set[int], timeout: float = 20.0) -> set[int]:
    """The PIDs still alive (zombies count as ended) after waiting up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(sim.alive(p) for p in pids):
        time.sleep(0.2)
    return {p for p in pids if sim.alive(p)}


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        if sim.alive(pid):
            os.kill(pid, signal.SIGKILL)


def wait_for(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_sigkill_of_the_simulate_launcher_leaves_no_process_of_its_run(tmp_path, fake_bin):  # noqa: F811
    """`flwr run` starts its SuperLink in a session of its own (the fake does too): a SIGKILL of the launcher's
    process group does not reach it, the launcher's watchdog stops it."""
    run_dir = tmp_path / "run"
    config = flower_app.write_run_config(run_dir / "run-config.toml", {"out-dir": str(run_dir), "num-server-rounds": 2})
    script = textwrap.dedent(f"""
        from pathlib import Path
        from fedcvr.simulations import launcher as sim
        sim.launch(Path({str(run_dir)!r}), Path({str(REPO)!r}), 3, Path({str(config)!r}),
                   bin_dir=Path({str(fake_bin)!r}))
    """)
    launcher = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                                env={**os.environ, "FAKE_FLWR_MODE": "hang"})
    flwr_home = run_dir / "flwr"
    try:
        superlink = wait_for(lambda: [p for p, cmd in sim.processes_of(flwr_home).items() if "flower-superlink" in cmd])
        started = descendants(launcher.pid) | set(sim.processes_of(flwr_home))
        assert set(superlink) <= started and len(started) >= 3  # flwr run, its SuperLink, the watchdog
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        assert gone(started) == set()
        assert sim.processes_of(flwr_home) == {}
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        kill_all(set(sim.processes_of(flwr_home)))


SUPERVISOR = """
import sys
from fedcvr.shared.processes import ChildGroup
with ChildGroup(grace=2) as group:
    for _ in range(2):
        child = group.start([sys.executable, "-c", "import time; time.sleep(120)"])
        print(child.pid, flush=True)
    sys.exit(group.wait())
"""


def _supervisor() -> tuple[subprocess.Popen, set[int]]:
    parent = subprocess.Popen([sys.executable, "-c", SUPERVISOR], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    children = {int(parent.stdout.readline()) for _ in range(2)}
    return parent, children


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_children_of_a_child_group_end_with_it_however_it_ends(sig):
    parent, children = _supervisor()
    try:
        assert children <= descendants(parent.pid)
        os.kill(parent.pid, sig)  # the parent alone, not its process group
        code = parent.wait(timeout=20)
        assert gone(children) == set()
        if sig != signal.SIGKILL:
            assert code == 128 + sig  # it stopped its children, then exited saying why
    finally:
        kill_all(children)
        if parent.poll() is None:
            parent.kill()


def test_when_one_child_ends_the_group_stops_the_others():
    parent, children = _supervisor()
    try:
        first = min(children)
        os.kill(first, signal.SIGKILL)
        assert parent.wait(timeout=20) == 128 + signal.SIGKILL
        assert gone(children) == set()
    finally:
        kill_all(children)


@pytest.mark.parametrize("ignore_term", [False, True])
def test_end_session_stops_a_leader_and_the_children_it_leaves(ignore_term):
    """The leader of a session of its own leaves a child behind (as a SuperNode leaves its ClientApp): both end,
    whether the leader heeds SIGTERM or has to be killed after the grace time."""
    trap = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else ""
    code = (f"import signal, subprocess, sys, time\n{trap}"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print(child.pid, flush=True)\ntime.sleep(120)\n")
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    child = int(leader.stdout.readline())
    try:
        started = time.monotonic()
        processes.end_session(leader, grace=1.0)
        assert leader.poll() is not None and gone({child}) == set()
        assert (time.monotonic() - started >= 1.0) == ignore_term  # SIGKILL only after the grace time
    finally:
        kill_all({child})
        if leader.poll() is None:
            leader.kill()


def test_reap_dead_children_leaves_no_zombie_and_spares_the_running():
    ended = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(3)]
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pids = {p.pid for p in ended}
        wait_for(lambda: all(sim._stat(p)[:1] == ["Z"] for p in pids))  # ended, not waited for: zombies
        assert set(processes.reap_dead_children()) == pids
        assert all(not Path(f"/proc/{p}").exists() for p in pids)
        assert sim.alive(running.pid) and processes.reap_dead_children() == []
    finally:
        running.kill()
        running.wait()


def test_the_superexec_wrapper_reaps_what_flower_starts_and_never_waits_for(tmp_path):
    """Flower's SuperExec starts each task with `subprocess.Popen(args)` and drops it; run through
    `fedcvr.shared.superexec` (here with a stand-in for Flower's main) none of them stays a zombie."""
    code = textwrap.dedent("""
        import subprocess, sys, time
        import fedcvr.shared.superexec as wrapper
        import flwr.supercore.cli as flower

        def fake_superexec():
            pids = [subprocess.Popen([sys.executable, "-c", "pass"]).pid for _ in range(4)]  # never waited for
            print(*pids, flush=True)
            time.sleep(60)

        flower.flower_superexec = fake_superexec
        wrapper.main([])
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        started = {int(pid) for pid in process.stdout.readline().split()}
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{pid}").exists() for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(started) == 4 and descendants(process.pid) == set()  # ended and reaped: no zombie left
        assert not any(Path(f"/proc/{pid}").exists() for pid in started)
    finally:
        process.kill()
        process.wait()


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


def test_process_scan_finds_a_marked_child_and_stop_kills_it_by_pid(tmp_path):
    home = tmp_path / "flwr"
    process = sleeper(home)
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
    process = sleeper(home, ignore_term=True)
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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child (POSIX)")
@pytest.mark.parametrize(("body", "code"), [("pass", 0), ("sys.exit(3)", 3), ("sys.exit()", 0),
                                            ("sys.exit('bad')", 1), ("raise ValueError('x')", 1)])
def test_a_forked_child_leaves_with_its_own_exit_code(body, code):
    from fedcvr.shared.processes import exit_after

    pid = os.fork()
    if pid == 0:
        exit_after(lambda: exec(body, {"sys": sys}))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == code
