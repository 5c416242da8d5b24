"""The Flower App and its run config (`shared/flower_app.py`): parsing --run-config, building and writing the
overrides, finding the app, and run folders the app must not pack."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fedcvr.shared import flower_app

REPO = Path(__file__).resolve().parents[1]


def test_parse_run_config_reads_toml_values():
    assert flower_app.parse_run_config("") == {}
    parsed = flower_app.parse_run_config(" round-timeout=120 train.lr=3e-3 dp.enabled=false model.encoder='/m/x y' "
                                  'note="a \\"b\\"" train.seed=-1 ')
    assert parsed == {"round-timeout": 120, "train.lr": 0.003, "dp.enabled": False, "model.encoder": "/m/x y",
                      "note": 'a "b"', "train.seed": -1}


@pytest.mark.parametrize(("text", "needle"), [
    ("strategy=fedprox", "text goes in quotes: strategy='fedprox'"),
    ("round-timeout", "cannot read 'round-timeout'"),
    ("a=1 b", "cannot read 'b'"),
    ("x=[1,2]", "is not a number, true/false or quoted text"),
    ("train.lr=1 train.lr=2", "sets train.lr twice"),
    ("bad/key=1", "'bad/key' is not a run config key"),
    ("model.encoder='/m/x", "cannot read"),
])
def test_parse_run_config_errors_name_the_pair_and_the_fix(text, needle):
    with pytest.raises(flower_app.LaunchError, match=re.escape(needle)):
        flower_app.parse_run_config(text)


DECLARED = {"data-root": "data/demo", "out-dir": "", "num-server-rounds": 1, "min-nodes": 2, "seed": 42,
            "round-timeout": 600, "strategy": "fedavg", "dp.enabled": True, "dp.target-epsilon": 8.0,
            "local-epochs": 1, "train.lr": 0.006}
FIXED = [flower_app.Setting("data-root", "/d"), flower_app.Setting("out-dir", "/o"),
         flower_app.Setting("num-server-rounds", 3), flower_app.Setting("min-nodes", 4)]


def test_build_run_config_sets_options_and_extra_pairs():
    overrides, notes = flower_app.build_run_config(
        DECLARED, REPO,
        [*FIXED, flower_app.Setting("strategy", "fedprox", "--strategy"), flower_app.Setting("seed", 0)],
        {"train.lr": 0.001, "seed": 5})
    assert overrides == {"data-root": "/d", "out-dir": "/o", "num-server-rounds": 3, "min-nodes": 4,
                         "strategy": "fedprox", "seed": 5, "train.lr": 0.001}  # --run-config replaces implied
    assert notes == []


def test_build_run_config_leaves_out_implied_keys_the_app_lacks_with_a_note():
    declared = {k: v for k, v in DECLARED.items() if k not in ("strategy", "dp.enabled")}
    overrides, notes = flower_app.build_run_config(
        declared, REPO, [*FIXED, flower_app.Setting("strategy", "fedavg"), flower_app.Setting("dp.enabled", True)], {})
    assert "strategy" not in overrides and "dp.enabled" not in overrides
    assert notes == ['the Flower App does not declare `strategy`: left out (it would have been "fedavg")',
                     "the Flower App does not declare `dp.enabled`: left out (it would have been true)"]


@pytest.mark.parametrize(("settings", "extra", "needle"), [
    ([flower_app.Setting("local-epoch", 2, "--local-epochs")], {},
     "--local-epochs sets `local-epoch`, but the Flower App in"),
    ([], {"train.rl": 0.1}, "--run-config sets `train.rl`, but the Flower App in .* Did you mean train.lr\\?"),
    ([], {"min-nodes": 2}, "--run-config may not set `min-nodes`: `fedcvr simulate` sets it from the number"),
    ([flower_app.Setting("strategy", "fedadam", "--strategy")], {"strategy": "'fedprox'"},
     "--run-config sets `strategy`, which --strategy sets too"),
])
def test_build_run_config_errors(settings, extra, needle):
    with pytest.raises(flower_app.LaunchError, match=needle):
        flower_app.build_run_config(DECLARED, REPO, [*FIXED, *settings], extra)


def test_build_run_config_needs_the_fixed_keys():
    declared = {k: v for k, v in DECLARED.items() if k != "min-nodes"}
    with pytest.raises(flower_app.LaunchError, match="does not declare `min-nodes`"):
        flower_app.build_run_config(declared, REPO, FIXED, {})


def test_run_config_file_reads_back_as_the_same_flat_keys_in_toml_and_in_flwr(tmp_path):
    from flwr.common.config import parse_config_args

    overrides = {"data-root": "/data/with \"quotes\" and \\ back", "num-server-rounds": 3, "dp.enabled": False,
                 "dp.target-epsilon": 4.0, "train.lr": 1e-4, "model.encoder": "café", "seed": 0}
    path = flower_app.write_run_config(tmp_path / "run-config.toml", overrides)
    assert flower_app.flatten(tomllib.loads(path.read_text())) == overrides
    assert parse_config_args([str(path)]) == overrides
    assert "dp.enabled = false" in path.read_text()


def test_run_config_that_toml_cannot_hold_is_refused(tmp_path):
    with pytest.raises(flower_app.LaunchError, match="cannot be written as TOML"):
        flower_app.write_run_config(tmp_path / "c.toml", {"dp": 1, "dp.enabled": True})


def test_find_app_dir_is_the_repository_with_the_flower_app(tmp_path):
    assert flower_app.find_app_dir() == REPO
    assert flower_app.app_run_config(REPO)["num-server-rounds"] >= 1
    package = tmp_path / "site" / "fedcvr" / "__init__.py"
    package.parent.mkdir(parents=True)
    package.write_text("")
    with pytest.raises(flower_app.LaunchError, match="no pyproject.toml in .*pip install -e"):
        flower_app.find_app_dir(package)
    (tmp_path / "site" / "pyproject.toml").write_text("[project]\nname = 'other'\n")
    with pytest.raises(flower_app.LaunchError, match=r"has no \[tool.flwr.app\] section"):
        flower_app.find_app_dir(package)


def test_run_folders_inside_the_app_must_be_ignored_by_git(tmp_path):
    assert not flower_app.packed_into_app(REPO, REPO / "runs" / "demo")  # /runs/ is in .gitignore
    assert flower_app.packed_into_app(REPO, REPO / "my-run")
    assert flower_app.packed_into_app(REPO, REPO)
    assert not flower_app.packed_into_app(REPO, tmp_path / "run")


SECTIONS = ("fedcvr.shared.model.config:ModelConfig", "fedcvr.shared.model.config:TrainConfig",
            "fedcvr.shared.data.examples:ExampleConfig", "fedcvr.shared.dp_config:DPConfig",
            "fedcvr.shared.training.personalise:PersonaliseConfig",
            "fedcvr.shared.evaluation.baselines:BaselineConfig")


def _section(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", SECTIONS)
def test_defaults_are_written_only_in_the_pyproject(path):
    import dataclasses

    section = _section(path)
    declared = flower_app.flatten(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
                                  ["config"])
    assert set(section.KEYS) <= set(declared), set(section.KEYS) - set(declared)
    # no field that a run-config key sets carries a default of its own in code
    keyed = set(section.KEYS.values())
    assert [f.name for f in dataclasses.fields(section) if f.name in keyed
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING] == sorted(
        keyed, key=[f.name for f in dataclasses.fields(section)].index)
    settings = section.defaults()
    for key, name in section.KEYS.items():
        expected = None if key == "dp.target-delta" and declared[key] == 0 else declared[key]
        assert getattr(settings, name) == expected, key


def test_a_run_config_key_left_out_takes_the_declared_default(monkeypatch):
    from fedcvr.client.node import NodeSettings
    from fedcvr.shared.model.config import ModelConfig
    from fedcvr.shared.settings import SettingsError

    declared = dict(flower_app.declared_defaults())
    monkeypatch.setattr(flower_app, "declared_defaults", lambda: {**declared, "model.dim": 24, "local-epochs": 3})
    assert ModelConfig.from_run_config({}).dim == 24
    assert ModelConfig.from_run_config({"model.dim": 16}).dim == 16
    settings = NodeSettings.from_run_config({"num-server-rounds": 2})
    assert (settings.rounds, settings.local_epochs, settings.model.dim) == (2, 3, 24)
    with pytest.raises(SettingsError, match=r"local-epochs = 0: must be a whole number >= 1"):
        NodeSettings.from_run_config({"local-epochs": 0})
    monkeypatch.setattr(flower_app, "declared_defaults",
                        lambda: {k: v for k, v in declared.items() if k != "model.dim"})
    with pytest.raises(SettingsError, match=r"`model.dim` is not set and the fedcvr Flower App declares no default"):
        ModelConfig.from_run_config({})
