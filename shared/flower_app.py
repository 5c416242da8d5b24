"""The fedcvr Flower App and its run config: finding the app folder (the checkout's, or the copy a wheel carries),
reading its declared run config, building the overrides a command passes to `flwr run` (every key checked against
the declared ones) and writing them as TOML. What `fedcvr simulate` and `fedcvr coordinator run` share, and the names
of the files a run writes."""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
import tomllib
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROUNDS_FILE = "rounds.jsonl"


HISTORY_FILE = "history.json"


HISTORY_CSV = "history.csv"


RUN_CONFIG_FILE = "run-config.toml"


FLOWER_LOG = "flower.log"


STRATEGIES = ("fedavg", "fedprox", "fedadam")  # the `strategy` values the ServerApp accepts


# Keys `fedcvr simulate` always sets itself: the app must declare them and --run-config may not set them.
FIXED_KEYS = {"data-root": "--data/--merchants", "out-dir": "--out", "num-server-rounds": "--rounds",
              "min-nodes": "the number of merchant folders"}


_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


class LaunchError(ValueError):
    """A problem with the inputs of a simulation, found before Flower starts; the text names the fix."""


PACKAGED_APP = "flower-app"  # the Flower App a wheel carries inside the fedcvr package (setup.py writes it)


def _app_problem(folder: Path) -> str | None:
    """Why `folder` is not the fedcvr Flower App, or None when it is."""
    pyproject = folder / "pyproject.toml"
    if not pyproject.is_file():
        return f"no pyproject.toml in {folder}"
    try:
        config = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        return f"{pyproject} cannot be read as TOML ({err})"
    if not isinstance(config.get("tool", {}).get("flwr", {}).get("app"), dict):
        return f"{pyproject} has no [tool.flwr.app] section, so {folder} is not the fedcvr Flower App"
    return None


def find_app_dir(package_file: str | Path | None = None) -> Path:
    """The folder of the fedcvr Flower App: the one holding the pyproject.toml with `[tool.flwr.app]` next to
    the `fedcvr` package (the repository root for an editable install), else the copy a wheel installs inside
    the package (`fedcvr/flower-app/`)."""
    if package_file is None:
        import fedcvr

        package_file = fedcvr.__file__
    package = Path(package_file).resolve().parent
    problems = []
    for folder in (package.parent, package / PACKAGED_APP):
        problem = _app_problem(folder)
        if problem is None:
            return folder
        problems.append(problem)
    raise LaunchError("; ".join(problems) + ". The fedcvr Flower App travels with fedcvr: install fedcvr from its "
                      "repository (`pip install -e .` or `make install`) or from a wheel built from it "
                      "(`pip wheel . --no-deps`), not by copying its folders.")


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"dp": {"enabled": true}} -> {"dp.enabled": true}, the way flwr flattens run configs."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def app_run_config(app_dir: Path) -> dict[str, Any]:
    """The app's default run config (`[tool.flwr.app.config]`, flattened): the keys `flwr run` accepts."""
    config = tomllib.loads((app_dir / "pyproject.toml").read_text())
    return flatten(config["tool"]["flwr"]["app"].get("config", {}))


@functools.cache
def _declared() -> dict[str, Any]:
    return app_run_config(find_app_dir())


def declared_defaults() -> dict[str, Any]:
    """The default run config of the fedcvr Flower App this code belongs to (`[tool.flwr.app.config]`): the one
    place defaults are written. Read once; each caller gets its own copy (changing it changes no one else's)."""
    return dict(_declared())


def defaults_with(overrides: str, **fixed: Any) -> dict[str, Any]:
    """This app's default run config with `fixed` keys and then the --run-config text `overrides` on top: the run
    config the in-process research scripts use."""
    return {**declared_defaults(), **fixed, **parse_run_config(overrides)}


def packed_into_app(app_dir: Path, path: Path) -> bool:
    """Whether files written under `path` would be packed into the app bundle (FAB) by `flwr run app_dir`: true
    when `path` lies inside the app folder and its .gitignore does not exclude it."""
    try:
        relative = path.resolve().relative_to(app_dir.resolve())
    except ValueError:
        return False
    if not relative.parts:
        return True
    probe = (relative / "history.json").as_posix()
    gitignore = app_dir / ".gitignore"
    try:
        from flwr.cli.utils import filter_paths_for_publish

        with warnings.catch_warnings():  # pathspec's deprecation of the pattern name flwr uses
            warnings.simplefilter("ignore", DeprecationWarning)
            kept = filter_paths_for_publish({probe: b"", "pyproject.toml": b"",
                                             ".gitignore": gitignore.read_bytes() if gitignore.is_file() else b""})
        return probe in kept
    except Exception:  # noqa: BLE001 - a different flwr: fall back to a plain .gitignore check
        import pathspec

        lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return not pathspec.PathSpec.from_lines("gitwildmatch", lines).match_file(probe)


def parse_run_config(text: str) -> dict[str, Any]:
    """Parse --run-config "k=v k2='text' dp.enabled=false": space-separated key=value pairs, values as TOML
    (numbers, true/false, text in single or double quotes)."""
    pairs: dict[str, Any] = {}
    pattern = re.compile(r"""\s*([^=\s]+)=('[^']*'|"(?:[^"\\]|\\.)*"|[^\s'"]\S*)(?=\s|$)""")
    position, text = 0, text.strip()
    while position < len(text):
        match = pattern.match(text, position)
        if match is None:
            rest = text[position:].strip()
            raise LaunchError(f"--run-config: cannot read {rest!r}: write key=value pairs separated by spaces, "
                              "with text in quotes, e.g. --run-config \"round-timeout=120 model.encoder='/models/x'\"")
        key, raw = match.group(1), match.group(2)
        if not _KEY.fullmatch(key):
            raise LaunchError(f"--run-config: {key!r} is not a run config key (letters, digits, - and _, "
                              "sections joined by dots, e.g. train.lr)")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            hint = f"; text goes in quotes: {key}='{raw}'" if re.fullmatch(r"[^'\"]+", raw) else ""
            raise LaunchError(f"--run-config: {key}={raw} is not a number, true/false or quoted text{hint}") from None
        if not isinstance(value, bool | int | float | str):
            raise LaunchError(f"--run-config: {key}={raw} is not a number, true/false or quoted text (a run "
                              "config holds no lists or tables)")
        if key in pairs:
            raise LaunchError(f"--run-config sets {key} twice")
        pairs[key] = value
        position = match.end()
    return pairs


@dataclass(frozen=True)
class Setting:
    """One run config override: `option` names the command-line option that asked for it (None: implied)."""

    key: str
    value: Any
    option: str | None = None


def _unknown_key(key: str, declared: Iterable[str], app_dir: Path, how: str) -> LaunchError:
    close = difflib.get_close_matches(key, list(declared), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return LaunchError(f"{how} sets `{key}`, but the Flower App in {app_dir} does not declare it in "
                       f"[tool.flwr.app.config] of its pyproject.toml, and flwr refuses run config keys the app "
                       f"does not declare.{hint}")


def build_run_config(declared: Mapping[str, Any], app_dir: Path, settings: Iterable[Setting],
                     extra: Mapping[str, Any], fixed: Mapping[str, str] | None = None,
                     command: str = "fedcvr simulate") -> tuple[dict[str, Any], list[str]]:
    """The overrides to pass to `flwr run` and notes for the user.

    `settings` come from the command's options (FIXED_KEYS among them); `extra` from --run-config. A key the app
    does not declare is an error when an option or --run-config asks for it and is left out with a note when it
    is only implied (a default of `fedcvr simulate`). --run-config may replace implied values, not the fixed keys
    (`fixed`: key -> the option that sets it; FIXED_KEYS for `command` = simulate) and not values that an option
    sets explicitly."""
    fixed = FIXED_KEYS if fixed is None else fixed
    overrides: dict[str, Any] = {}
    notes: list[str] = []
    explicit: dict[str, str] = {}
    for setting in settings:
        if setting.key not in declared:
            if setting.key in fixed:
                raise LaunchError(f"the Flower App in {app_dir} does not declare `{setting.key}` in "
                                  f"[tool.flwr.app.config]; `{command}` needs it to run the app")
            if setting.option is not None:
                raise _unknown_key(setting.key, declared, app_dir, setting.option)
            notes.append(f"the Flower App does not declare `{setting.key}`: left out (it would have been "
                         f"{format_toml_value(setting.value)})")
            continue
        overrides[setting.key] = setting.value
        if setting.option is not None or setting.key in fixed:
            explicit[setting.key] = setting.option or fixed[setting.key]
    for key, value in extra.items():
        if key in fixed:
            raise LaunchError(f"--run-config may not set `{key}`: `{command}` sets it from "
                              f"{fixed[key]}")
        if key in explicit:
            raise LaunchError(f"--run-config sets `{key}`, which {explicit[key]} sets too: use one of them")
        if key not in declared:
            raise _unknown_key(key, declared, app_dir, "--run-config")
        overrides[key] = value
    return overrides, notes


def _toml_key(key: str) -> str:
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else json.dumps(p) for p in key.split("."))


def format_toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    raise TypeError(f"a run config value is a bool, number or text, not {type(value).__name__}: {value!r}")


def run_config_toml(overrides: Mapping[str, Any]) -> str:
    """TOML text of flat, dotted run config keys, read back by flwr (and tomllib) as the same flat keys."""
    lines = ["# Run config overrides written by `fedcvr simulate` and passed to `flwr run --run-config`."]
    lines += [f"{_toml_key(k)} = {format_toml_value(v)}" for k, v in overrides.items()]
    return "\n".join(lines) + "\n"


def write_run_config(path: Path, overrides: Mapping[str, Any]) -> Path:
    text = run_config_toml(overrides)
    try:
        same = flatten(tomllib.loads(text)) == dict(overrides)
    except tomllib.TOMLDecodeError:  # e.g. a key that is also the section of another key
        same = False
    if not same:
        raise LaunchError(f"the run config overrides cannot be written as TOML without changing them: {overrides}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
