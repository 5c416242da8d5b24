"""The Flower App: data folder resolution, the ClientApp's query handlers and errors, waiting for nodes (with a fake
Grid that runs the real ClientApp in process) and one end-to-end `flwr run` training simulation (slow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Message, Metadata, RecordDict
from support import (
    MERCHANTS,
    REPO,
    break_merchant,
    node_context,
    pyproject_run_config,
    sim_node,
    write_merchant,
)

from fedcvr.client.app import app as client_app
from fedcvr.client.data_source import DataSourceError, resolve_data_dir
from fedcvr.server.app import NodesError, wait_for_nodes
from fedcvr.server.config import ConfigError, ServerConfig
from fedcvr.shared import protocol
from fedcvr.shared.data.contract import DataValidationError
from fedcvr.shared.data.loader import load_merchant
from fedcvr.simulations import launcher as sim

# ---------------------------------------------------------------- data


@pytest.fixture
def marketplace(tmp_path: Path) -> Path:
    root = tmp_path / "market"
    for name, (n_items, rows) in MERCHANTS.items():
        write_merchant(root / name, n_items, rows)
    return root


# ---------------------------------------------------------------- data_source


def test_simulation_partition_i_is_the_ith_merchant_folder_in_sorted_order(marketplace):
    run_config = {"data-root": str(marketplace)}
    found = [resolve_data_dir(sim_node(i), run_config).name for i in range(3)]
    assert found == ["shop-a", "shop-b", "shop-c"]


def test_simulation_data_root_may_be_one_merchant_folder(marketplace):
    shop = marketplace / "shop-b"
    assert resolve_data_dir(sim_node(0, 1), {"data-root": str(shop)}) == shop


def test_deployment_reads_data_dir_from_the_node_config(marketplace):
    folder = marketplace / "shop-c"
    assert resolve_data_dir({"data-dir": str(folder)}, {"data-root": "ignored"}) == folder


def test_deployment_data_dir_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataSourceError, match=r"node config data-dir = '.*nope': the folder .* does not"):
        resolve_data_dir({"data-dir": str(missing)}, {})


def test_simulation_without_data_root():
    with pytest.raises(DataSourceError, match=r"run config has no `data-root`"):
        resolve_data_dir(sim_node(0), {})
    with pytest.raises(DataSourceError, match=r"run config `data-root` is ''"):
        resolve_data_dir(sim_node(0), {"data-root": ""})


def test_relative_data_root_that_does_not_exist_names_key_path_and_fix():
    with pytest.raises(DataSourceError) as err:
        resolve_data_dir(sim_node(0), {"data-root": "data/no-such-demo"})
    text = str(err.value)
    assert "data-root = 'data/no-such-demo'" in text
    assert "relative path" in text and "absolute path" in text


def test_partition_beyond_the_merchant_folders(marketplace):
    with pytest.raises(DataSourceError) as err:
        resolve_data_dir(sim_node(3, 4), {"data-root": str(marketplace)})
    text = str(err.value)
    assert "partition-id 3" in text and "holds 3 merchant folder(s) (shop-a, shop-b, shop-c)" in text
    assert "num-supernodes must not exceed 3" in text


def test_data_root_without_merchants(tmp_path):
    with pytest.raises(DataSourceError, match="holds no merchant data"):
        resolve_data_dir(sim_node(0), {"data-root": str(tmp_path)})


def test_node_config_without_data_dir_or_partition():
    with pytest.raises(DataSourceError, match="neither `data-dir`.*nor `partition-id`"):
        resolve_data_dir({}, {"data-root": "/x"})


def test_bad_partition_id(marketplace):
    with pytest.raises(DataSourceError, match=r"`partition-id` is -1"):
        resolve_data_dir({"partition-id": -1}, {"data-root": str(marketplace)})


# ---------------------------------------------------------------- ClientApp handler


def query_message(node_id: int, action: str = protocol.TRAIN_SIZE, message_id: str = "m1") -> Message:
    """A query as it arrives at a node (built from public Metadata, no run needed)."""
    metadata = Metadata(run_id=1, message_id=message_id, src_node_id=0, dst_node_id=node_id,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=600.0,
                        message_type=f"query.{action}")
    return Message(content=RecordDict(), metadata=metadata)


def test_client_replies_with_the_size_of_its_training_split(marketplace, tiny_bert):
    run_config = {"data-root": str(marketplace), "model.encoder": str(tiny_bert), "model.dim": 8}
    reply = client_app(query_message(node_id=11), node_context(11, sim_node(1), run_config))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content[protocol.SIZE][protocol.TRAIN_SIZE_KEY] > 0
    assert reply.metadata.reply_to_message_id == "m1"
    assert reply.metadata.src_node_id == 11 and reply.metadata.dst_node_id == 0


def test_client_replies_with_the_data_validation_error_text(marketplace):
    break_merchant(marketplace / "shop-a")
    with pytest.raises(DataValidationError) as err:
        load_merchant(marketplace / "shop-a")
    reply = client_app(query_message(5), node_context(5, {"data-dir": str(marketplace / "shop-a")}, {}))
    assert reply.has_error()
    assert str(err.value) in reply.error.reason
    assert reply.error.reason.startswith("DataValidationError: ")


def test_client_replies_with_the_data_source_error(marketplace):
    reply = client_app(query_message(5), node_context(5, sim_node(7, 8), {"data-root": str(marketplace)}))
    assert reply.has_error() and "num-supernodes must not exceed 3" in reply.error.reason


def test_client_has_no_handler_for_other_messages(marketplace):
    with pytest.raises(ValueError, match="unknown"):
        client_app(query_message(1, "unknown"), node_context(1, sim_node(0), {"data-root": str(marketplace)}))


# ---------------------------------------------------------------- ServerApp config


def test_server_config_from_pyproject_defaults():
    config = ServerConfig.from_run_config(pyproject_run_config())
    assert config.min_nodes >= 1 and config.num_server_rounds >= 1 and config.round_timeout > 0
    assert 0 < config.fraction_evaluate <= 1 and config.out_dir is None


def test_server_config_out_dir(tmp_path):
    config = ServerConfig.from_run_config({**pyproject_run_config(), "out-dir": str(tmp_path)})
    assert config.out_dir == tmp_path


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("min-nodes", 0, "min-nodes must be a whole number >= 1"),
    ("min-nodes", True, "min-nodes must be a whole number >= 1"),
    ("num-server-rounds", 0, ">= 1"),
    ("round-timeout", -5, "round-timeout must be a number of seconds > 0"),
    ("fraction-evaluate", 1.5, "0 < f <= 1"),
    ("fraction-evaluate", 0.0, "0 < f <= 1"),
    ("seed", "x", "seed must be a whole number"),
    ("out-dir", "runs/out", "relative path"),
    ("rank-validation", "no", "it must be true or false"),
])
def test_server_config_errors_name_key_value_and_fix(key, value, needle):
    with pytest.raises(ConfigError) as err:
        ServerConfig.from_run_config({**pyproject_run_config(), key: value})
    text = str(err.value)
    assert f"`{key}` = {value!r}" in text and needle in text


def test_server_config_key_neither_set_nor_declared(monkeypatch):
    from fedcvr.shared import flower_app

    config = pyproject_run_config()
    del config["round-timeout"]
    assert ServerConfig.from_run_config(config).round_timeout == pyproject_run_config()["round-timeout"]
    declared = {k: v for k, v in flower_app.declared_defaults().items() if k != "round-timeout"}
    monkeypatch.setattr(flower_app, "declared_defaults", lambda: declared)
    with pytest.raises(ConfigError, match="`round-timeout` is not set and the fedcvr Flower App declares no default"):
        ServerConfig.from_run_config(config)


# ---------------------------------------------------------------- ServerApp, in process


class ConnectedNodes:
    """The one thing `wait_for_nodes` asks of a Grid: which nodes are connected now."""

    def __init__(self, nodes):
        self.contexts = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)


def test_wait_for_nodes_times_out_with_a_clear_error():
    now = [0.0]
    grid = ConnectedNodes({1: None})
    with pytest.raises(NodesError) as err:
        wait_for_nodes(grid, 3, 10, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert "only 1 node(s) connected within round-timeout = 10 s, but min-nodes = 3" in str(err.value)
    assert now[0] >= 10


def test_wait_for_nodes_returns_once_enough_are_connected():
    grid = ConnectedNodes({})
    arrivals = iter([{}, {5: None}, {5: None, 3: None}])

    def sleep(_):
        grid.contexts = next(arrivals)

    assert wait_for_nodes(grid, 2, 60, sleep=sleep, clock=lambda: 0.0) == [3, 5]


# ---------------------------------------------------------------- end to end: `flwr run`, local simulation

FLWR_CONFIG_TOML = """\
[superlink]
default = "local"

[superlink.local]
address = ":local:"
"""


@pytest.mark.slow
def test_flwr_run_simulation_end_to_end(marketplace, tmp_path):
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(FLWR_CONFIG_TOML)
    out_dir = tmp_path / "out"
    bin_dir = Path(sys.executable).parent
    env = sim.flwr_env(flwr_home, bin_dir)  # our own SuperLink on free ports, offline, no installs
    command = [
        str(bin_dir / "flwr"), "run", str(REPO), "--stream",
        "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
        "--run-config", f"data-root='{marketplace}' out-dir='{out_dir}' min-nodes=3 round-timeout=60 "
                        "num-server-rounds=1",
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150,
                              check=False)
        wall = time.monotonic() - started
        # `flwr run --stream` exits 0 even when the ServerApp fails: the run's status tells.
        run_id = re.search(r"Successfully started run (\d+)", done.stdout)
        status = subprocess.run(
            [str(bin_dir / "flwr"), "ls", "--run-id", run_id.group(1), "--format", "json"]
            if run_id else ["true"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False)
    finally:
        stopping = time.monotonic()
        signalled = sim.stop_processes(flwr_home)  # the launcher's own clean-up, by PID
        stop_wall = time.monotonic() - stopping
    log = f"exit code {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    print(f"\nflwr run took {wall:.1f} s; stopping PIDs {signalled} took {stop_wall:.1f} s")
    left = sim.processes_of(flwr_home)
    assert not left, f"processes left running: {left}"
    assert done.returncode == 0 and run_id, log
    run = json.loads(status.stdout)["runs"][0]
    assert run["status"] == "finished:completed", f"{run['status']}: {run['status-details']}\n{log}"
    # one round of federated training with DP on three real processes, then the model pushed back to every node;
    # shop-c has a single impression, so no training example: its node says so and the others go on
    summary = json.loads((out_dir / "summary.json").read_text())
    assert len(summary["rounds"]) == 1 and summary["rounds"][0]["nodes-trained"] == 2, log
    assert 0 < summary["rounds"][0]["max-epsilon"] <= 8.0 * 1.0001
    # its node cannot build a training split at all: a failure with the reason (a decline is a node that has its
    # data but no budget or no example this round)
    failed = summary["rounds"][0]["failed"]
    assert len(failed) == 1 and "the training split is empty" in failed[0]["reason"], failed
    assert summary["rounds"][0]["nodes-failed"] == 1 and summary["rounds"][0]["nodes-declined"] == 0
    saved = list(summary["saved_by_nodes"].values())
    assert sorted(v for v in saved if not v.startswith("error")) == [summary["model_version"]] * 2
    for shop in ("shop-a", "shop-b"):
        assert (out_dir / "models" / shop / "VERSION").read_text().strip() == summary["model_version"]
    assert wall < 120, f"flwr run took {wall:.0f} s"


def test_one_list_of_strategies_names_what_the_server_builds():
    from fedcvr.server.strategy import FLOWER_STRATEGIES
    from fedcvr.shared.flower_app import STRATEGIES, declared_defaults

    assert tuple(FLOWER_STRATEGIES) == STRATEGIES and declared_defaults()["strategy"] in STRATEGIES


def test_run_configs_of_before_federated_training_get_the_declared_defaults():
    old = {k: v for k, v in pyproject_run_config().items() if k not in ("strategy", "reject-norm-factor", "secagg")}
    config = ServerConfig.from_run_config(old)
    assert config.strategy == "fedavg" and config.reject_norm_factor == pyproject_run_config()["reject-norm-factor"]
    assert config.secagg.enabled is pyproject_run_config()["secagg"]
