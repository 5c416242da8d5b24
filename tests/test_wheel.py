"""fedcvr works from a built wheel, not only from the editable install of `make install`.

The wheel is built from this checkout and installed, without its dependencies, into a fresh virtual environment
that sees this environment's dependencies (torch, flwr, ...) but not its editable fedcvr: every subpackage must be
in the wheel, or the imports below fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


_EVERYWHERE = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache", ".hypothesis")
_AT_THE_ROOT = {".git", ".venv", "build", "dist", "runs", "data"}


def _left_out(folder: str, names: list[str]) -> set[str]:
    """What the source copy leaves out: caches anywhere, and the checkout's own environment, runs and data."""
    skipped = set(_EVERYWHERE(folder, names))
    if Path(folder) == REPO_ROOT:
        skipped |= _AT_THE_ROOT & set(names)
    if Path(folder) == REPO_ROOT / "simulations":
        skipped.add("results")
    return skipped


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(wheel file, python of a fresh venv with that wheel installed, its bin folder)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: building in the checkout would leave build/ there
    shutil.copytree(REPO_ROOT, source, ignore=_left_out)
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--quiet",
          "--wheel-dir", str(dist)])
    wheels = list(dist.glob("fedcvr-*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # this environment's dependencies, as a plain path: its .pth files (the editable fedcvr) are not processed
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
          str(wheels[0])])
    return wheels[0], python, venv / "bin"


def test_the_wheel_holds_every_package_of_the_source_tree(wheel_env):
    wheel, _, _ = wheel_env
    names = set(zipfile.ZipFile(wheel).namelist())
    roots = {"fedcvr": "fedcvr", "server": "fedcvr/server", "client": "fedcvr/client", "shared": "fedcvr/shared",
             "simulations": "fedcvr/simulations"}
    expected = {f"{target}/{init.relative_to(REPO_ROOT / source).as_posix()}"
                for source, target in roots.items() for init in (REPO_ROOT / source).rglob("__init__.py")}
    assert expected - names == set()
    assert "fedcvr/simulations/experiments/synthetic-default.toml" in names


def test_the_installed_wheel_imports_the_apps_and_runs_the_cli(wheel_env, tmp_path):
    _, python, bin_dir = wheel_env
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    where = _run([str(python), "-c", "import fedcvr, fedcvr.client.node, fedcvr.shared.model.esmm, "
                  "fedcvr.shared.training.local; from fedcvr.server.app import app as s; "
                  "from fedcvr.client.app import app as c; print(fedcvr.__file__, type(s).__name__, type(c).__name__)"],
                 cwd=tmp_path, env=env).stdout.split()
    assert Path(where[0]).is_relative_to(bin_dir.parent), where  # the wheel's copy, not the checkout's
    assert where[1:] == ["ServerApp", "ClientApp"]
    app = _run([str(python), "-c", "from fedcvr.shared.flower_app import app_run_config, find_app_dir; "
                "d = find_app_dir(); print(d); print(app_run_config(d)['num-server-rounds'])"],
               cwd=tmp_path, env=env).stdout.split()
    assert Path(app[0]) == Path(where[0]).parent / "flower-app", app  # the Flower App the wheel carries
    assert int(app[1]) >= 1
    assert "Usage" in _run([str(bin_dir / "fedcvr"), "--help"], cwd=tmp_path, env=env).stdout
    _run([str(bin_dir / "fedcvr"), "data", "synth", "--out", str(tmp_path / "market"), "--merchants", "2",
          "--items", "100", "--shoppers", "200", "--events", "5000", "--seed", "0"], cwd=tmp_path, env=env)
    _run([str(bin_dir / "fedcvr"), "data", "validate", str(tmp_path / "market")], cwd=tmp_path, env=env)
