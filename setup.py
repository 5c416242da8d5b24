"""Package discovery for fedcvr's layout (the rest of the metadata is in pyproject.toml).

The product keeps `server/`, `client/`, `shared/` and `simulations/` at the top level; they install as subpackages
of `fedcvr` (`fedcvr.server`, ...), so nothing generic lands in site-packages. Every package under those folders is
found here, so a new subpackage is never left out of the wheel (tests/test_wheel.py builds and installs one).

The wheel also carries this pyproject.toml as `fedcvr/flower-app/pyproject.toml`: the Flower App (`[tool.flwr.app]`,
its components and default run config) that `fedcvr simulate`, `local-only` and `coordinator run` hand to `flwr run`
when fedcvr is installed from a wheel rather than from a checkout (`simulations/launcher.py`, `find_app_dir`)."""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOTS = {"fedcvr": "fedcvr", "fedcvr.server": "server", "fedcvr.client": "client", "fedcvr.shared": "shared",
         "fedcvr.simulations": "simulations"}


def packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        found += [name, *(f"{name}.{sub}" for sub in find_packages(where=folder))]
    return found


APP_FOLDER = "flower-app"  # inside the installed fedcvr package; a valid Flower App name (letters and hyphens)


class BuildWithApp(build_py):
    """build_py, plus the Flower App's pyproject.toml next to the installed package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install runs the app from the checkout itself
            return
        target = Path(self.build_lib) / "fedcvr" / APP_FOLDER / "pyproject.toml"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(__file__).with_name("pyproject.toml"), target)


setup(package_dir=ROOTS, packages=packages(), cmdclass={"build_py": BuildWithApp})
