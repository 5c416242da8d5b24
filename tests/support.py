"""What several test modules share (no test module imports another): small merchant folders, node contexts, the
app's default run config, in-process federations over the real ServerApp and ClientApp, a fake `flwr`, process
lookup by PID, tiny served models."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
from flwr.app import Context, Message, RecordDict

from fedcvr.shared.model.config import ModelConfig
from fedcvr.shared.model.esmm import initial_model
from fedcvr.shared.model.folder import save_model_folder
from fedcvr.simulations import launcher as sim
from fedcvr.simulations.inprocess import InProcessGrid

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- merchant folders

# (user_id, item_id, event) rows per merchant; items are i0..i{n-1}. Counts are known by construction.
# shop-a and shop-b each have a clicked and an unclicked impression in their training split (training refuses one
# class of labels); shop-c has no training example at all.
MERCHANTS: dict[str, tuple[int, list[tuple[str, str, str]]]] = {
    "shop-a": (3, [("u3", "i1", "impression"), ("u1", "i0", "impression"), ("u1", "i0", "click"),
                   ("u2", "i1", "impression"), ("u2", "i2", "impression"), ("u2", "i2", "click"),
                   ("u2", "i2", "cart"), ("u2", "i2", "purchase")]),
    "shop-b": (2, [("v4", "i0", "impression"), ("v4", "i0", "click"), ("v1", "i0", "impression"),
                   ("v1", "i1", "impression"), ("v2", "i1", "impression"), ("v3", "i1", "impression"),
                   ("v3", "i1", "click")]),
    "shop-c": (4, [("w1", "i3", "impression"), ("w1", "i3", "click"), ("w1", "i3", "purchase")]),
}


def write_merchant(folder: Path, n_items: int, rows: list[tuple[str, str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)],
                  "title": [f"Item {k}" for k in range(n_items)]}).to_parquet(folder / "items.parquet")
    pd.DataFrame({
        "user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows], "event": [r[2] for r in rows],
        "timestamp": pd.date_range("2024-03-01", periods=len(rows), freq="min"),
    }).to_parquet(folder / "events.parquet")
    return folder


def break_merchant(folder: Path) -> None:
    """Make the events refer to an item the catalog lacks (a DataValidationError)."""
    write_merchant(folder, 1, [("u1", "i0", "impression"), ("u1", "i7", "click")])


# ---------------------------------------------------------------- nodes and federations in process

def sim_node(partition: int, partitions: int = 3) -> dict[str, object]:
    return {"partition-id": partition, "num-partitions": partitions}


def node_context(node_id: int, node_config: dict, run_config: dict) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config=run_config)


def pyproject_run_config() -> dict[str, object]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


class RecordingGrid(InProcessGrid):
    """The in-process runner's Grid (`simulations/inprocess.py`, the real ClientApp of each node), keeping every
    message sent (`sent`) and every reply (`replies`); `silent` nodes never answer (as past a round's timeout)."""

    def __init__(self, run_config, nodes: int, silent: tuple[int, ...] = ()):
        super().__init__(run_config, nodes)
        self.silent = silent
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def deliver(self, message: Message) -> Message | None:
        self.sent.append(message)
        if message.metadata.dst_node_id in self.silent:
            return None
        reply = super().deliver(message)
        self.replies.append(reply)
        return reply

    def send_and_receive(self, messages, *, timeout=None):
        return [r for r in super().send_and_receive(messages, timeout=timeout) if r is not None]


class TamperingGrid(RecordingGrid):
    """An in-process federation where `tamper(node, sent, reply)` may change a node's training reply, or drop it
    (None: the node hangs past the round's timeout)."""

    def __init__(self, run_config, nodes, tamper):
        super().__init__(run_config, nodes)
        self.tamper = tamper

    def deliver(self, message: Message) -> Message | None:
        reply = super().deliver(message)
        if message.metadata.message_type != "train" or reply.has_error():
            return reply
        return self.tamper(message.metadata.dst_node_id, message.content["arrays"], reply)



def federation(market, tiny_bert, out, **overrides):
    run_config = {**pyproject_run_config(), "data-root": str(market), "out-dir": str(out), "min-nodes": 3,
                  "model.encoder": str(tiny_bert), "model.dim": 8, "model.attention-hidden": 8,
                  "model.head-hidden": 8, "model.max-text-tokens": 32, "examples.history-length": 8,
                  "train.batch-size": 128, "num-server-rounds": 2, **overrides}
    grid = RecordingGrid(run_config, 3)
    return grid, run_config


# ---------------------------------------------------------------- processes

FAKE_FLWR = """\
#!{python}
import json, os, subprocess, sys, time, tomllib
from pathlib import Path

args, mode = sys.argv[1:], os.environ.get("FAKE_FLWR_MODE", "ok")
if args[0] == "ls":
    failed = mode == "fail"
    print(json.dumps({{"success": True, "runs": [{{"run-id": int(args[2]),
          "status": "finished:failed" if failed else "finished:completed",
          "status-details": "ServerApp raised ValueError: boom" if failed else ""}}]}}))
    sys.exit(0)
assert args[0] == "run" and "--stream" in args, args
config = tomllib.loads(Path(args[args.index("--run-config") + 1]).read_text())
home = os.environ["FLWR_HOME"]
# like flwr: a detached SuperLink that keeps running after `flwr run` ends
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "flower-superlink", "--log-file",
                  home + "/local-superlink/superlink.log"], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
if mode == "no-run":
    print("Error: could not start the run", flush=True)
    sys.exit(1)
print("\\x1b[92mINFO \\x1b[0m: Successfully started run 77", flush=True)
if mode == "hang":
    time.sleep(120)
out = Path(config["out-dir"])
rows = []
with (out / "rounds.jsonl").open("a") as handle:
    for r in range(1, config["num-server-rounds"] + 1):
        rows.append({{"round": r, "ctcvr.auc": 0.5 + r / 100, "max-epsilon": float(r)}})
        line = json.dumps(rows[-1]) + "\\n"
        handle.write(line[:10]); handle.flush(); time.sleep(0.3)
        handle.write(line[10:]); handle.flush()
        print("round", r, "done", flush=True)
(out / "history.json").write_text(json.dumps(rows))
"""


def write_fake_flwr(folder: Path) -> Path:
    """A fake `flwr` in `folder` (FAKE_FLWR, run by this Python); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    flwr = folder / "flwr"
    flwr.write_text(FAKE_FLWR.format(python=sys.executable))
    flwr.chmod(0o755)
    return folder


def descendants(pid: int) -> set[int]:
    """Every process below `pid` now, by the parent PIDs in /proc."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and len(fields := sim._stat(int(proc.name))) > 1:
            children.setdefault(int(fields[1]), []).append(int(proc.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def sleeper(flwr_home: Path, *, ignore_term: bool = False, argv0: str | None = None) -> subprocess.Popen:
    """A process marked as part of the run under `flwr_home` (FLWR_HOME in its environment), in a session of its
    own; `ignore_term` makes it ignore SIGTERM, `argv0` names it."""
    code = ("import signal, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
            + "print('ready', flush=True)\ntime.sleep(120)\n")
    process = subprocess.Popen([argv0 or sys.executable, "-c", code], executable=sys.executable,
                               env={**os.environ, "FLWR_HOME": str(flwr_home)}, start_new_session=True,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


# ---------------------------------------------------------------- served models

def make_model(folder: Path, tiny_bert: Path, seed: int = 0, version: str = "v1") -> Path:
    config = ModelConfig.defaults(encoder=str(tiny_bert), dim=8, attention_hidden=8, head_hidden=8, max_text_tokens=32)
    model, backbone = initial_model(config, seed)
    save_model_folder(folder, model, backbone, {"version": version, "examples": {"history_length": 8}})
    (folder / "VERSION").write_text(version + "\n")
    return folder


def a_shopper(folder: Path, with_purchase: bool = False) -> str:
    events = pd.read_parquet(folder / "events.parquet")
    if with_purchase:
        events = events[events["event"] == "purchase"]
    return str(events["user_id"].value_counts().index[0])


def start_serving(model_dir: Path, data_dir: Path, log: Path, *extra: str, timeout: float = 120
                  ) -> tuple[subprocess.Popen, str]:
    """`fedcvr serve` on 127.0.0.1 and a free port (with `extra` options), once GET /health answers 200 ->
    (the process, to stop by its PID; the base URL). AssertionError with the log if it does not start."""
    import time

    import httpx

    port = sim.free_ports(1)[0]
    with log.open("wb") as handle:
        process = subprocess.Popen([str(Path(sys.executable).parent / "fedcvr"), "serve", "--model-dir",
                                    str(model_dir), "--data-dir", str(data_dir), "--port", str(port), *extra],
                                   stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.3)
