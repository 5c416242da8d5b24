"""A merchant node's SuperExec forks each ClientApp process from a warm parent (`fedcvr.client.superexec`): the
child runs Flower's `flwr-clientapp` entry point with exactly the arguments Flower's executor builds, starts with
the preloaded modules, gets fresh numpy randomness, and when the warm parent is gone Flower's own Popen runs the
command instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the warm parent needs os.fork (POSIX)")

# Runs in a fresh interpreter: replaces Flower's flwr-clientapp entry point with one that records what the child
# saw, starts the warm parent, and launches tasks through Flower's own SubprocessExecutor.
SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])

    import flwr.supernode.cli.flwr_clientapp
    entry = sys.modules["flwr.supernode.cli.flwr_clientapp"]  # the module (the package re-exports the function)

    def fake_clientapp():
        import numpy
        record = {"argv": sys.argv, "ppid": os.getppid(), "pid": os.getpid(),
                  "preloaded": "email.mime.text" in sys.modules, "draw": float(numpy.random.random())}
        (out / f"{os.getpid()}.json").write_text(json.dumps(record))
        if "--fail" in sys.argv:
            raise RuntimeError("boom")
        sys.exit(3)

    entry.flwr_clientapp = fake_clientapp  # inherited by the fork

    from fedcvr.client import superexec
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    warm_pid, write_fd = superexec.start_warm_parent(("numpy", "email.mime.text"))
    superexec.install(write_fd)

    def spec(token, quiet=False):
        return ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token=token,
                             insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                             parent_pid=os.getpid(), suppress_output=quiet, task_id=1)

    executor = SubprocessExecutor()
    print(warm_pid, flush=True)
    executor.launch(spec("tok-a"))
    executor.launch(spec("tok-b", quiet=True))
    sys.stdin.readline()  # the test kills the warm parent, then asks for one more task
    executor.launch(spec("tok-c"))
    time.sleep(3)
""")


def _records(out: Path, count: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(out.glob("*.json"))
        if len(files) >= count:
            time.sleep(0.2)
            return [json.loads(f.read_text()) for f in files]
        time.sleep(0.1)
    raise AssertionError(f"{count} ClientApp records expected in {out}, found {len(list(out.glob('*.json')))}")


def test_clientapp_processes_fork_from_the_warm_parent_with_flowers_arguments(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # the cold path runs the `flwr-clientapp` command: a stand-in that records its arguments
    (fake_bin / "flwr-clientapp").write_text(f"#!/bin/sh\necho cold \"$@\" > {tmp_path}/cold.txt\n")
    (fake_bin / "flwr-clientapp").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "records"
    out.mkdir()
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    try:
        warm_pid = int(process.stdout.readline())
        first, second = sorted(_records(out, 2), key=lambda r: r["argv"][r["argv"].index("--token") + 1])
        for record, token in ((first, "tok-a"), (second, "tok-b")):
            assert record["ppid"] == warm_pid  # forked from the warm parent, not started by Popen
            assert record["preloaded"]  # the parent's imports come with it
            assert record["argv"][0] == "flwr-clientapp"
            args = record["argv"]
            assert args[args.index("--token") + 1] == token and "--insecure" in args
            assert args[args.index("--runtime-api-address") + 1] == "127.0.0.1:9094"
            assert args[args.index("--parent-pid") + 1] == str(process.pid)
        assert first["draw"] != second["draw"]  # numpy reseeded in each child
        os.kill(warm_pid, 9)
        time.sleep(0.5)
        process.stdin.write("\n")
        process.stdin.flush()
        deadline = time.monotonic() + 15
        while not (tmp_path / "cold.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        cold = (tmp_path / "cold.txt").read_text().split()
        assert cold[0] == "cold" and cold[cold.index("--token") + 1] == "tok-c"  # nothing lost without the parent
        assert len(list(out.glob("*.json"))) == 2
    finally:
        process.kill()
        process.wait()


def test_the_warm_parent_ends_when_the_superexec_does(tmp_path):
    code = textwrap.dedent("""
        from fedcvr.client import superexec
        pid, _ = superexec.start_warm_parent(("json",))
        print(pid, flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    warm_pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{warm_pid}").exists() and time.monotonic() < deadline:
        status = Path(f"/proc/{warm_pid}/stat").read_text().split()[2] if Path(f"/proc/{warm_pid}").exists() else ""
        if status == "Z":
            break
        time.sleep(0.1)
    gone = not Path(f"/proc/{warm_pid}").exists() or Path(f"/proc/{warm_pid}/stat").read_text().split()[2] == "Z"
    assert gone  # its pipe closed with the SuperExec, so it left


def test_only_clientapp_commands_are_forked(tmp_path):
    from fedcvr.client.superexec import WarmLauncher

    read_fd, write_fd = os.pipe()
    launcher = WarmLauncher(write_fd)
    try:
        proc = launcher.Popen([sys.executable, "-c", "pass"])  # not a ClientApp: the real Popen
        assert proc is not None and proc.wait(timeout=30) == 0
        assert launcher.Popen(["/somewhere/bin/flwr-clientapp", "--token", "t"], stdout=subprocess.DEVNULL) is None
        request = json.loads(os.read(read_fd, 65536).decode())
        assert request == {"argv": ["/somewhere/bin/flwr-clientapp", "--token", "t"], "quiet": True}
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_missing_message_contents_are_retried_within_a_tenth_of_a_second_not_seconds():
    """Flower retries a message's contents not yet stored after 1 s, 2 s, 4 s; after `faster_object_pulls`
    (a node's SuperNode and ClientApps and the ServerApp call it) four misses cost about 0.2 s, not 15 s."""
    code = textwrap.dedent("""
        import time
        from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects
        from fedcvr.shared.object_pulls import LOCAL, faster_object_pulls

        assert faster_object_pulls(*LOCAL)
        misses = {"a": 4}

        def pull(object_id):
            if misses[object_id]:
                misses[object_id] -= 1
                raise ObjectUnavailableError(object_id)
            return b"content"

        start = time.monotonic()
        assert pull_objects(["a"], pull) == {"a": b"content"}
        print(time.monotonic() - start)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[-1]) < 1.0  # 0.02 + 0.04 + 0.08 + 0.1 s (capped) instead of 1 + 2 + 4 + 8 s
