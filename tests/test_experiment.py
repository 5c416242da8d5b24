"""Experiment grids: configs, the in-process federation, the tidy table, resuming."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedcvr.cli import app
from fedcvr.simulations.experiment import TABLE_COLUMNS, run_grid
from fedcvr.simulations.experiment_config import LOCAL_SUFFIX, Experiment, ExperimentError, Run

TINY = """
name = "tiny"
data = "{data}"
settings = ["local-only", "fedavg", "fedadam"]
epsilons = ["none", 8]
seeds = [0]
rounds = 1
audit-epsilons = [8]
audit-max-members = 50

[run-config]
model.encoder = "{bert}"
model.dim = 8
model.attention-hidden = 8
model.head-hidden = 8
model.max-text-tokens = 32
examples.history-length = 8
train.batch-size = 256
"""


def write(tmp_path, text: str):
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


def test_grid_expansion_and_run_ids(tmp_path):
    experiment = Experiment.from_toml(write(tmp_path, 'settings = ["centralized", "fedavg"]\nepsilons = ["none", 8]'
                                                      "\nseeds = [0, 1]\n"))
    ids = [run.run_id for run in experiment.runs()]
    assert ids == ["centralized-epsnone-seed0", "fedavg-epsnone-seed0", "fedavg-eps8-seed0",
                   "centralized-epsnone-seed1", "fedavg-epsnone-seed1", "fedavg-eps8-seed1"]
    only_dp = Experiment.from_toml(write(tmp_path, 'settings = ["centralized", "fedavg"]\nepsilons = [8]\n'))
    assert [run.run_id for run in only_dp.runs()] == ["fedavg-eps8-seed0", "centralized-epsnone-seed0"]
    assert Run("fedprox", 2.0, 3).run_id == "fedprox-eps2-seed3"
    audited = Experiment.from_toml(write(tmp_path, 'settings = ["fedavg"]\nseeds = [0, 1]\n'
                                                   'audit-epsilons = ["none", 1]\n'))
    assert [run.run_id for run in audited.runs()][-4:] == ["audit-epsnone-seed0", "audit-eps1-seed0",
                                                           "audit-epsnone-seed1", "audit-eps1-seed1"]


@pytest.mark.parametrize("text, needle", [
    ('settings = ["fedsgd"]', "`settings`"),
    ("epsilons = [0]", "`epsilons`"),
    ('epsilons = ["inf"]', "`epsilons`"),
    ("seeds = []", "`seeds`"),
    ("rounds = 0", "`rounds`"),
    ("round = 3", "unknown key"),
    ("rounds = [", "not valid TOML"),
    ("audit-epsilons = [0]", "`audit-epsilons`"),
    ("audit-max-members = 5", "`audit-max-members`"),
    ("audit-merchant = 3", "`audit-merchant`"),
])
def test_bad_configs_name_the_field(tmp_path, text, needle):
    with pytest.raises(ExperimentError, match=needle):
        Experiment.from_toml(write(tmp_path, text))


@pytest.mark.slow  # whole runs: the integration lane (`make test-slow`)
def test_a_grid_runs_into_a_tidy_table_and_resumes(tmp_path, tiny_market, tiny_bert):
    experiment = Experiment.from_toml(write(tmp_path, TINY.format(data=tiny_market, bert=tiny_bert)))
    seen, progressed = [], []
    table = run_grid(experiment, tmp_path / "out", lambda run, status: seen.append((run.run_id, status)),
                     on_progress=lambda run, text: progressed.append((run.run_id, text)))
    assert list(table.columns) == ["experiment", *TABLE_COLUMNS]
    # progress within runs: each federated round, each merchant alone; the merchants' test rows of a federated run
    # come from the nodes' replies to the final test evaluation, with no second pass to show
    fed_progress = [text for run_id, text in progressed if run_id == "fedavg-eps8-seed0"]
    assert fed_progress[0].startswith("round 1/1: validation CTCVR AUC 0.") and ", ε " in fed_progress[0]
    assert fed_progress[1:] == []
    assert ("local-only-eps8-seed0", "merchant-02 alone (2/3): round 1/1") in progressed
    own = ~table["setting"].str.endswith(LOCAL_SUFFIX)
    assert set(table.loc[own, "run_id"]) == {r.run_id for r in experiment.runs()}
    # global + local (personalise = true, the default): every federated and local-only run adds its rows
    assert set(table.loc[~own, "run_id"]) == {f"{s}{LOCAL_SUFFIX}-{e}-seed0"
                                              for s in ("local-only", "fedavg", "fedadam") for e in ("epsnone", "eps8")}
    fed = table[(table.run_id == "fedavg-eps8-seed0")]
    auc = fed[(fed.metric == "ctcvr.auc") & (fed.split == "test") & (fed.merchant == "all")]["value"]
    assert len(auc) == 1 and 0 < auc.iloc[0] < 1
    assert set(fed[fed.split == "validation"]["round"]) == {1}
    assert 0 < fed[(fed.metric == "max-epsilon")]["value"].iloc[0] <= 8.0 * 1.0001
    merchants = set(fed[(fed.split == "test") & (fed.metric == "train-examples")]["merchant"])
    assert merchants == {"merchant-01", "merchant-02", "merchant-03"}
    # every merchant's ε holds at its own δ = min(1 / (10 x its training examples), 1e-5), recorded next to it
    for run_id in ("fedavg-eps8-seed0", "local-only-eps8-seed0"):
        rows = table[(table.run_id == run_id) & (table.merchant != "all")]
        sizes = rows[rows.metric == "train-examples"].set_index("merchant")["value"]
        deltas = rows[rows.metric == "delta"].set_index("merchant")["value"]
        assert sorted(deltas.index) == sorted(sizes.index)
        assert all(abs(deltas[m] - min(1 / (10 * sizes[m]), 1e-5)) < 1e-15 for m in sizes.index)
    assert table[(table.run_id == "fedavg-epsnone-seed0") & (table.metric == "delta")].empty
    alone = table[(table.run_id == "local-only-epsnone-seed0")]
    assert set(alone[alone.metric == "train-examples"]["merchant"]) == {"merchant-01", "merchant-02", "merchant-03"}
    assert "all" in set(alone[alone.metric == "ctcvr.auc"]["merchant"])  # a merchant without test purchases has none
    assert (tmp_path / "out" / "results.parquet").is_file() and (tmp_path / "out" / "results.csv").is_file()
    # a second pass finds every run finished and only rewrites the table
    again = []
    same = run_grid(experiment, tmp_path / "out", lambda run, status: again.append(status))
    assert set(again) == {"skipped (finished earlier)"} and len(same) == len(table)
    # an interrupted run (no result.json) runs again
    (tmp_path / "out" / "runs" / "fedadam-eps8-seed0" / "result.json").unlink()
    rerun = []
    run_grid(experiment, tmp_path / "out", lambda run, status: rerun.append((run.run_id, status)))
    assert [r for r, s in rerun if s == "running"] == ["fedadam-eps8-seed0"]
    assert json.loads((tmp_path / "out" / "runs" / "fedadam-eps8-seed0" / "result.json").read_text())["rows"]
    # and the report reads it, collecting the finished runs again (a grid stopped by Ctrl-C wrote no table)
    (tmp_path / "out" / "results.parquet").unlink()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "out" / "report.md").read_text()
    assert "tiny" in report and "(privacy_utility.png)" in report and "seeds: [0]" in report
    assert "δ per merchant" in report and "e-0" in report
    finished = json.loads((tmp_path / "out" / "runs" / "fedavg-eps8-seed0" / "result.json").read_text())
    assert finished["machine"]["cpus"] >= 1 and finished["machine"]["cpu"] and finished["finished"]
    assert finished["load"]["samples"] >= 1 and finished["load"]["max"] >= finished["load"]["mean"] >= 0
    assert f"- machine: {finished['machine']['cpu']}" in report
    # the privacy audit ran on the first merchant and has its section
    audit = table[(table.run_id == "audit-eps8-seed0") & (table.metric != "wall-seconds")]
    assert set(audit.merchant) == {"merchant-01"} and set(audit.split) == {"train"}
    assert 0 <= audit[audit.metric == "mia.lr.auc"]["value"].iloc[0] <= 1
    assert "## Privacy audit: membership inference" in report and "| ε 8 | merchant-01 | 1 | " in report
    # one command regenerates the report: `fedcvr experiment` runs what is missing (nothing here), then writes it
    (tmp_path / "out" / "report.md").unlink()
    config = tmp_path / "experiment.toml"
    result = CliRunner().invoke(app, ["experiment", str(config), "--out", str(tmp_path / "out"), "--no-report"])
    assert result.exit_code == 0, result.output
    assert "skipped (finished earlier)" in result.output and not (tmp_path / "out" / "report.md").exists()
    result = CliRunner().invoke(app, ["experiment", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "report.md" in result.output and "(privacy_utility.png)" in (tmp_path / "out" / "report.md").read_text()


def test_cli_experiment_refuses_a_bad_config(tmp_path):
    result = CliRunner().invoke(app, ["experiment", str(write(tmp_path, "rounds = -1")), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "`rounds`" in result.output


def test_dirichlet_partition_by_category_keeps_every_item_and_event_once(tmp_path, tiny_market):
    import pandas as pd

    from fedcvr.shared.data.loader import load_merchant, merchant_folders
    from fedcvr.simulations.partition import dirichlet_partition

    pooled = [load_merchant(f) for f in merchant_folders(tiny_market)]
    items = pd.concat([d.items for d in pooled])
    events = pd.concat([d.events for d in pooled])
    out = dirichlet_partition(tiny_market, tmp_path / "dir", alpha=0.3, clients=3, seed=1)
    parts = [load_merchant(f) for f in merchant_folders(out)]  # every client passes the data contract
    assert [p.name for p in parts] == ["client-01", "client-02", "client-03"]
    assert sum(len(p.items) for p in parts) == items["item_id"].nunique()
    assert sum(len(p.events) for p in parts) == len(events)
    # small alpha: a category's items mostly sit with one client
    shares = []
    for _, group in items.groupby("category"):
        owners = [int(part.items["item_id"].isin(group["item_id"]).sum()) for part in parts]
        shares.append(max(owners) / sum(owners))
    assert sum(shares) / len(shares) > 0.6
    with pytest.raises(ValueError, match="alpha > 0"):
        dirichlet_partition(tiny_market, tmp_path / "bad", alpha=0, clients=3)


def test_min_shoppers_keeps_the_large_merchants(tmp_path, tiny_market):
    import pandas as pd

    from fedcvr.simulations.partition import select_merchants

    counts = {f.name: pd.read_parquet(f / "events.parquet")["user_id"].nunique()
              for f in sorted(tiny_market.iterdir()) if f.is_dir()}
    cut = sorted(counts.values())[1]
    out = select_merchants(tiny_market, cut, tmp_path / "sel")
    assert sorted(p.name for p in out.iterdir()) == sorted(n for n, c in counts.items() if c >= cut)
    with pytest.raises(ValueError, match="lower min-shoppers"):
        select_merchants(tiny_market, 10**9, tmp_path / "none")


def test_max_shoppers_keeps_whole_shoppers_of_the_large_merchants(tmp_path, tiny_market):
    import pandas as pd

    from fedcvr.shared.data.loader import load_merchant, merchant_folders
    from fedcvr.simulations.partition import cap_shoppers

    before = {f.name: load_merchant(f) for f in merchant_folders(tiny_market)}
    counts = {name: d.events["user_id"].nunique() for name, d in before.items()}
    cap = sorted(counts.values())[1]
    out = cap_shoppers(tiny_market, cap, tmp_path / "cap", seed=3)
    after = {f.name: load_merchant(f) for f in merchant_folders(out)}  # every folder passes the data contract
    assert sorted(after) == sorted(before)
    for name, data in after.items():
        assert data.events["user_id"].nunique() == min(counts[name], cap)
        assert len(data.items) == len(before[name].items)  # the whole catalog stays
        # a kept shopper keeps every one of their events
        full = before[name].events
        kept = full[full["user_id"].isin(set(data.events["user_id"]))]
        assert len(kept) == len(data.events)
        pd.testing.assert_series_equal(kept["item_id"].reset_index(drop=True),
                                       data.events["item_id"].reset_index(drop=True), check_names=False)
    # the same seed draws the same shoppers; another seed others
    again = cap_shoppers(tiny_market, cap, tmp_path / "again", seed=3)
    other = cap_shoppers(tiny_market, cap, tmp_path / "other", seed=4)
    largest = max(counts, key=counts.get)
    users = [set(load_merchant(root / largest).events["user_id"]) for root in (out, again, other)]
    assert users[0] == users[1] and users[0] != users[2]
    with pytest.raises(ValueError, match="max-shoppers must be >= 1"):
        cap_shoppers(tiny_market, 0, tmp_path / "zero")


def test_max_shoppers_draws_the_same_shoppers_whatever_their_pseudonyms(tmp_path, tiny_market):
    """Each import pseudonymises shopper ids under a new key: the cut must draw the same shoppers from every import
    of the same data, so a grid resumed on a fresh import goes on with the same data."""
    import numpy as np
    import pandas as pd

    from fedcvr.shared.data.loader import load_merchant, merchant_folders
    from fedcvr.shared.data.writer import write_merchant
    from fedcvr.simulations.partition import cap_shoppers

    folder = max(merchant_folders(tiny_market), key=lambda f: load_merchant(f).events["user_id"].nunique())
    data = load_merchant(folder)
    shoppers = data.events["user_id"].astype(str).unique()
    kept = []
    for key in (1, 2):  # two imports: the same shoppers under unrelated pseudonyms, sorted differently
        names = dict(zip(shoppers, (f"p{n:06d}" for n in np.random.default_rng(key).permutation(len(shoppers)))))
        events = data.events.assign(user_id=data.events["user_id"].astype(str).map(names))
        write_merchant(tmp_path / f"import-{key}" / folder.name, data.items, events)
        out = cap_shoppers(tmp_path / f"import-{key}", len(shoppers) // 3, tmp_path / f"cut-{key}", seed=3)
        cut = load_merchant(out / folder.name).events.drop(columns="user_id")
        kept.append(cut.sort_values(list(cut.columns)).reset_index(drop=True))
    pd.testing.assert_frame_equal(kept[0], kept[1])


def test_a_resumed_grid_refuses_data_that_changed(tmp_path, tiny_market):
    from fedcvr.shared.data.loader import merchant_folders
    from fedcvr.simulations.experiment_config import RESULT
    from fedcvr.simulations.experiment_meta import check_data, data_fingerprint

    prints = data_fingerprint(merchant_folders(tiny_market))
    assert all(set(p) == {"events", "shoppers", "items"} and p["events"] > 0 for p in prints.values())
    out = tmp_path / "grid"
    (out / "runs" / "fedavg-epsnone-seed0").mkdir(parents=True)
    (out / "experiment.json").write_text(json.dumps({"data_fingerprint": prints}))
    check_data(out, prints)  # same data: fine
    changed = {**prints, "merchant-01": {**prints["merchant-01"], "events": 1}}
    check_data(out, changed)  # no finished run yet: nothing to mix with
    (out / "runs" / "fedavg-epsnone-seed0" / RESULT).write_text("{}")
    with pytest.raises(ExperimentError, match="merchant-01: .* then, .* now.*another --out"):
        check_data(out, changed)


def test_max_shoppers_is_checked(tmp_path):
    path = tmp_path / "bad.toml"
    for value, fix in (("-1", "a whole number >= 0"), ("true", "a whole number >= 0"), ("5", "at least min-shoppers")):
        path.write_text(f"data = 'synthetic'\nmin-shoppers = 10\nmax-shoppers = {value}\n")
        with pytest.raises(ExperimentError, match=f"max-shoppers.*{fix}"):
            Experiment.from_toml(path)


def test_the_online_retail_reference_uses_countries_with_20_customers(tmp_path, monkeypatch):
    from pathlib import Path

    import pandas as pd

    repo = Path(__file__).resolve().parents[1]
    if not (repo.parent / "shared/data/online-retail/online_retail.parquet").is_file():
        pytest.skip("the shared Online Retail data set is not beside this checkout")
    monkeypatch.chdir(repo)
    experiment = Experiment.from_toml(repo / "simulations/experiments/online-retail.toml")
    root = experiment.data_root(tmp_path)
    customers = {p.name: pd.read_parquet(p / "events.parquet")["user_id"].nunique() for p in root.iterdir()}
    assert len(customers) >= 2 and min(customers.values()) >= 20
    assert experiment.max_shoppers == 0 and customers["united-kingdom"] > 3_800  # the United Kingdom in full
    imported = {p.name for p in (tmp_path / "data-online-retail").iterdir() if p.is_dir()}
    assert len(imported) > len(customers)  # the small countries were left out
    assert experiment.baselines == ("popularity", "repeat", "item-knn", "als", "text")
    assert experiment.run_config["examples.test-from"] == "2011-11-01"


def test_the_amazon_magazine_reference_imports_its_files(tmp_path, monkeypatch):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    if not (repo.parent / "shared/data/amazon-magazine/Magazine_Subscriptions_5.json.gz").is_file():
        pytest.skip("the shared Amazon Magazine Subscriptions data set is not beside this checkout")
    monkeypatch.chdir(repo)
    experiment = Experiment.from_toml(repo / "simulations/experiments/amazon-magazine.toml")
    root = experiment.data_root(tmp_path)
    assert len([p for p in root.iterdir() if (p / "events.parquet").is_file()]) == experiment.clients == 3
    assert (tmp_path / "data-amazon" / "magazine-subscriptions" / "events.parquet").is_file()


def test_amazon_data_needs_one_reviews_and_one_meta_file(tmp_path):
    (tmp_path / "reviews.json").write_text("")
    config = tmp_path / "x.toml"
    config.write_text(f'data = "amazon:{tmp_path}"\n')
    with pytest.raises(ExperimentError, match="one reviews file and one meta_"):
        Experiment.from_toml(config).data_root(tmp_path / "out")


def test_audit_runs_get_their_own_run_config(tmp_path, tiny_market):
    from fedcvr.simulations.experiment import run_config_of

    experiment = Experiment.from_toml(write(tmp_path, 'settings = ["fedavg"]\naudit-epsilons = [8]\n'
                                                      "[run-config]\nlocal-epochs = 2\n"
                                                      "[audit-run-config]\nlocal-epochs = 30\ntrain.batch-size = 64\n"))
    assert experiment.audit_run_config == {"local-epochs": 30, "train.batch-size": 64}
    audit, fedavg = (run_config_of(experiment, Run(setting, 8.0, 0), tiny_market, tmp_path / "run")
                     for setting in ("audit", "fedavg"))
    assert (audit["local-epochs"], audit["train.batch-size"]) == (30, 64)
    assert fedavg["local-epochs"] == 2 and fedavg["train.batch-size"] != 64
    with pytest.raises(ExperimentError, match="`audit-run-config`"):
        Experiment.from_toml(write(tmp_path, "audit-run-config = 3\n"))


def test_only_runs_the_named_settings_and_refuses_unknown_ones(tmp_path, tiny_market):
    experiment = Experiment.from_toml(write(tmp_path, f'data = "{tiny_market}"\nsettings = ["fedavg"]\n'
                                                      'epsilons = ["none"]\naudit-epsilons = [8]\n'))
    seen = []
    table = run_grid(experiment, tmp_path / "out", lambda run, status: seen.append((run.run_id, status)),
                     only={"centralized"})
    assert seen == [] and table.empty  # nothing of that setting in the grid: nothing ran
    described = json.loads((tmp_path / "out" / "experiment.json").read_text())
    assert described["settings"] == ["fedavg"] and described["audit_epsilons"] == [8.0]  # the whole grid
    result = CliRunner().invoke(app, ["experiment", str(tmp_path / "experiment.toml"), "--out",
                                      str(tmp_path / "out"), "--only", "fedsgd"])
    assert result.exit_code == 2 and "--only fedsgd: not a setting" in result.output


