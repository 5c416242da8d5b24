"""Where a node finds its merchant's data.

Deployment: the SuperNode's node config sets `data-dir`, the merchant's own data folder
(`flower-supernode ... --node-config "data-dir='/srv/shop/data'"`).
Simulation: the node config has `partition-id` and `num-partitions`, and the run config has `data-root`,
a marketplace folder; partition i reads the i-th merchant folder of `merchant_folders(data-root)` (sorted).

flwr runs the ClientApp in a folder of its own, so relative paths rarely point where the user meant: whoever
launches the run (`fedcvr`) makes `data-root` absolute; here a missing folder is reported with its key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


class DataSourceError(ValueError):
    """The node cannot tell, or cannot find, its merchant's data folder."""


def _where(key: str, value: str, path: Path) -> str:
    relative = "" if Path(value).expanduser().is_absolute() else (
        f" It is a relative path, read from the ClientApp's working folder {os.getcwd()}; flwr runs apps in "
        "folders of its own, so pass an absolute path (`fedcvr` makes it absolute when it launches the run)."
    )
    return f"{key} = '{value}': the folder {path} does not exist.{relative}"


def _folder(key: str, value: object, origin: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise DataSourceError(f"{origin} `{key}` is {value!r}; set it to the path of a data folder.")
    path = Path(value.strip()).expanduser()
    if not path.is_dir():
        raise DataSourceError(f"{origin} {_where(key, value.strip(), path)}")
    return path


def _int(node_config: Mapping[str, object], key: str) -> int:
    value = node_config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataSourceError(f"node config `{key}` is {value!r}; a whole number >= 0 is expected.")
    return value


def resolve_data_dir(node_config: Mapping[str, object], run_config: Mapping[str, object]) -> Path:
    """The merchant data folder this node reads: `data-dir` from the node config (deployment), else the
    `partition-id`-th merchant folder under the run config's `data-root` (simulation).

    Raises DataSourceError naming the key, the value and the fix when the folder cannot be determined.
    """
    if "data-dir" in node_config:
        return _folder("data-dir", node_config["data-dir"], "node config")
    if "partition-id" not in node_config:
        raise DataSourceError(
            "the node config has neither `data-dir` (deployment: start the SuperNode with "
            "--node-config \"data-dir='/path/to/merchant'\") nor `partition-id` (simulation).")
    partition = _int(node_config, "partition-id")
    if "data-root" not in run_config:
        raise DataSourceError(
            "the run config has no `data-root`: in a simulation it names the marketplace folder with one "
            "sub-folder per merchant (e.g. --run-config \"data-root='/abs/path/to/marketplace'\").")
    root = _folder("data-root", run_config["data-root"], "run config")
    from fedcvr.shared.data.tables import merchant_folders  # pandas: only in simulation, where it is loaded anyway

    try:
        folders = merchant_folders(root)
    except FileNotFoundError as err:
        raise DataSourceError(f"run config `data-root`: {err}") from err
    if partition >= len(folders):
        names = ", ".join(f.name for f in folders)
        raise DataSourceError(
            f"partition-id {partition} has no merchant: data-root '{root}' holds {len(folders)} merchant "
            f"folder(s) ({names}), so num-supernodes must not exceed {len(folders)}.")
    return folders[partition]
