"""Reading typed settings out of a flat run config (`[tool.flwr.app.config]`, kebab-case keys)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any


class SettingsError(ValueError):
    """A run-config value that is missing, mistyped or cannot work. Every section's error is one of these (model
    and training, `dp.*`, examples, personalisation, baselines, the server's keys), and the message names the key,
    the value and the fix."""


def read_section(section: type, keys: Mapping[str, str], run_config: Mapping[str, Any],
                 error: type[Exception] = SettingsError) -> dict[str, Any]:
    """Values of the dataclass `section`'s fields named by `keys` (config key -> field) that `run_config` sets,
    type-checked against the field types; a wrong type raises `error` naming the key, the value and the fix."""
    values: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(section)}
    for key, name in keys.items():
        if key not in run_config:
            continue
        value = run_config[key]
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
    for a badly typed value; `from_run_config` reads the keys it finds (explicit non-None overrides win)."""

    KEYS: Mapping[str, str] = {}
    ERROR: type[Exception] = SettingsError

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **overrides: Any):
        values = read_section(cls, cls.KEYS, run_config, cls.ERROR)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
