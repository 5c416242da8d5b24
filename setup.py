"""Package discovery for fedcvr's layout (the rest of the metadata is in pyproject.toml).

The product keeps `server/`, `client/`, `shared/` and `simulations/` at the top level; they install as subpackages
of `fedcvr` (`fedcvr.server`, ...), so nothing generic lands in site-packages. Every package under those folders is
found here, so a new subpackage is never left out of the wheel (tests/test_wheel.py builds and installs one)."""

from setuptools import find_packages, setup

ROOTS = {"fedcvr": "fedcvr", "fedcvr.server": "server", "fedcvr.client": "client", "fedcvr.shared": "shared",
         "fedcvr.simulations": "simulations"}


def packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        found += [name, *(f"{name}.{sub}" for sub in find_packages(where=folder))]
    return found


setup(package_dir=ROOTS, packages=packages())
