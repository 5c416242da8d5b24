"""The dependency rule: `client/` and `server/` depend on `shared/`, never on each other; `shared/` on neither;
none of them on `simulations/` (the research layer above them). Checked on every import, also inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedcvr.shared import protocol

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"client": ("server", "simulations"), "server": ("client", "simulations"),
             "shared": ("client", "server", "simulations")}


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved inside `fedcvr.<package>`)."""
    base = REPO / package
    parts = ["fedcvr", *([] if package == "fedcvr" else [package]), *path.relative_to(base).with_suffix("").parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[:len(parts) - node.level]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module or "")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for module in imported_modules(path, package):
            for other in FORBIDDEN[package]:
                if module == f"fedcvr.{other}" or module.startswith(f"fedcvr.{other}."):
                    bad.append(f"{path.relative_to(REPO)} imports {module}")
    assert not bad, "\n".join(bad)


def test_what_coordinators_and_merchants_run_never_imports_the_research_layer():
    """The module of the deployment commands (keys, coordinator, merchant) imports nothing from `simulations/`,
    also inside its functions."""
    path = REPO / "fedcvr" / "cli" / "deployment.py"
    found = {m for m in imported_modules(path, "fedcvr") if m.startswith("fedcvr.simulations")}
    assert not found, found


def test_a_declining_node_is_told_apart_from_a_failing_one():
    reason = protocol.declined_reason("the privacy budget is spent")
    assert reason == "declined to train: the privacy budget is spent" and protocol.is_declined(reason)
    # under SecAgg+ the reason arrives inside the secure round's own error text
    assert protocol.is_declined(f"SecureTrainingError: {reason}")
    assert not protocol.is_declined("RuntimeError: out of memory") and not protocol.is_declined(None)
