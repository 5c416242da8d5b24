"""Reading typed settings out of a flat run config (`[tool.flwr.app.config]`, kebab-case keys).

The defaults are written once, in the Flower App's pyproject.toml (`[tool.flwr.app.config]`): a key the run config
leaves out takes the value declared there (`declared_defaults`), and the settings classes hold no defaults of
their own. `Section.defaults(**fields)` is the declared settings with some fields replaced."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields, replace
from typing import Any, Self


class SettingsError(ValueError):
    """A run-config value that is missing, mistyped or cannot work. Every section's error is one of these (model
    and training, `dp.*`, examples, personalisation, baselines, the server's keys), and the message names the key,
    the value and the fix."""


def with_defaults(keys: Iterable[str], run_config: Mapping[str, Any],
                  error: type[Exception] = SettingsError) -> dict[str, Any]:
    """The values of `keys`: from `run_config`, else the Flower App's declared default; a key neither sets raises
    `error` naming the key and the fix."""
    from .flower_app import declared_defaults

    declared = declared_defaults()
    values: dict[str, Any] = {}
    for key in keys:
        if key in run_config:
            values[key] = run_config[key]
        elif key in declared:
            values[key] = declared[key]
        else:
            raise error(f"run config key `{key}` is not set and the fedcvr Flower App declares no default for it: "
                        f"set {key} in [tool.flwr.app.config] of its pyproject.toml (or reinstall fedcvr, whose "
                        "pyproject.toml declares every key)")
    return values


def read_section(section: type, keys: Mapping[str, str], run_config: Mapping[str, Any],
                 error: type[Exception] = SettingsError) -> dict[str, Any]:
    """Values of the dataclass `section`'s fields named by `keys` (config key -> field), from `run_config` or else
    the declared defaults, type-checked against the field types; a wrong type raises `error` naming the key, the
    value and the fix."""
    values: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(section)}
    given = with_defaults(keys, run_config, error)
    for key, name in keys.items():
        value = given[key]
        expected = types[name]
        if expected == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise error(f"{key} = {value!r}: expected a whole number, e.g. {key} = 3")
        if expected == "float" and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise error(f"{key} = {value!r}: expected a number, e.g. {key} = 0.5")
        if expected == "str" and not isinstance(value, str):
            raise error(f"{key} = {value!r}: expected text in quotes, e.g. {key} = \"{value}\"")
        if expected == "bool" and not isinstance(value, bool):
            raise error(f"{key} = {value!r}: expected true or false")
        values[name] = float(value) if expected == "float" else value
    return values


class Section:
    """Mixin for a frozen dataclass of settings: `KEYS` maps run-config keys to fields, `ERROR` is the error raised
    for a badly typed value; `from_run_config` reads every key, from the run config or else its declared default
    (explicit non-None overrides win)."""

    KEYS: Mapping[str, str] = {}
    ERROR: type[Exception] = SettingsError

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **overrides: Any) -> Self:
        values = read_section(cls, cls.KEYS, run_config, cls.ERROR)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def defaults(cls, **changes: Any) -> Self:
        """The declared default settings with `changes` made (checked like any other value)."""
        return replace(cls.from_run_config({}), **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
