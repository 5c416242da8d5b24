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


def test_report_names_every_machine_the_runs_ran_on(tmp_path):
    import pandas as pd

    from fedcvr.simulations.report_cost import machines

    rows = []
    for run_id, cpu, seconds, load in (("a", "CPU one", 60.0, 2.1), ("b", "CPU two", 120.0, 4.4),
                                       ("c", "CPU two", 60.0, None)):
        rows.append({"run_id": run_id, "metric": "wall-seconds", "value": seconds})
        folder = tmp_path / "runs" / run_id
        folder.mkdir(parents=True)
        machine = {"cpu": cpu, "cpus": 2, "platform": "Linux", "torch": "2", "torch_threads": 2, "cuda": None}
        record = {"machine": machine, "rows": []}
        if load is not None:  # runs finished before loads were recorded have none
            record["load"] = {"mean": load, "max": load, "samples": 3}
        (folder / "result.json").write_text(json.dumps(record))
    lines = machines(tmp_path, pd.DataFrame(rows), {})
    assert lines[0].startswith("- machines")
    assert any("CPU one" in line and "1 run(s), 1.0 min" in line for line in lines)
    assert any("CPU two" in line and "2 run(s), 3.0 min" in line for line in lines)
    assert lines[-1].startswith("- ran while other work loaded the machine") and lines[-1].endswith("b (load 4.4)")


def test_cli_experiment_refuses_a_bad_config(tmp_path):
    result = CliRunner().invoke(app, ["experiment", str(write(tmp_path, "rounds = -1")), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "`rounds`" in result.output


def test_report_plots_and_tables(tmp_path):
    """A report from a hand-made table: every plot is written and the ordering check reads the curve."""
    import pandas as pd

    from fedcvr.simulations.report import write_report

    rows = []
    for setting, base in (("fedavg", 0.70), ("local-only", 0.60)):
        for eps, drop in ((None, 0.0), (8.0, 0.02), (1.0, 0.08)):
            for seed in (0, 1):
                run = f"{setting}-eps{eps}-seed{seed}"
                common = {"experiment": "hand", "run_id": run, "setting": setting, "epsilon": eps, "seed": seed,
                          "data": "synthetic", "round": 2, "split": "test"}
                rows.append({**common, "merchant": "all", "metric": "ctcvr.auc", "value": base - drop + seed / 100})
                rows.append({**common, "merchant": "all", "metric": "ndcg@10", "value": 0.1 - drop / 10})
                rows.append({**common, "merchant": "all", "metric": "wall-seconds", "value": 60.0})
                for merchant, size, lift in (("m1", 10_000, 0.0), ("m2", 500, 0.1)):
                    rows.append({**common, "merchant": merchant, "metric": "ctcvr.auc",
                                 "value": base - drop + (lift if setting == "fedavg" else 0)})
                    rows.append({**common, "merchant": merchant, "metric": "train-examples", "value": size})
                if setting == "fedavg":
                    for round_ in (1, 2):
                        for metric, value in (("ctcvr.auc", 0.6 + round_ / 20), ("bytes-sent", 2e6),
                                              ("bytes-received", 2e6), ("seconds", 30.0)):
                            rows.append({**common, "round": round_, "split": "validation", "merchant": "all",
                                         "metric": metric, "value": value})
    rows.append({"experiment": "hand", "run_id": "centralized-epsnone-seed0", "setting": "centralized",
                 "epsilon": None, "seed": 0, "data": "synthetic", "round": 0, "split": "test", "merchant": "all",
                 "metric": "ctcvr.auc", "value": 0.8})
    pd.DataFrame(rows).to_parquet(tmp_path / "results.parquet", index=False)
    (tmp_path / "clients.json").write_text(json.dumps({"top": 50, "merchants": [
        {"merchant": "m1", "shoppers": 90, "catalog items": 1200, "items bought": 800, "catalog shared": 0.5,
         "catalog Jaccard": 0.25, "best sellers shared": 0.1},
        {"merchant": "m2", "shoppers": 9, "catalog items": 300, "items bought": 200, "catalog shared": 0.9,
         "catalog Jaccard": 0.25, "best sellers shared": 0.3}]}))
    report = write_report(tmp_path).read_text()
    for image in ("privacy_utility.png", "convergence.png", "merchant_gain.png", "cost.png"):
        assert (tmp_path / image).stat().st_size > 10_000 and f"({image})" in report
    assert "fedavg: more ε never lowered the mean test CTCVR AUC" in report
    assert "local-only: more ε never lowered the mean test NDCG@10" in report
    assert "| m2 | 500 | 0.2000 |" in report and "| m1 | 10000 | 0.1000 |" in report  # fedavg gains, small first
    assert "| merchant | training examples | no DP | ε 8 | ε 1 |" in report  # gains per ε, no DP first
    # clients: largest first, share, AUC alone without DP, then how alike (clients.json)
    assert "| m1 | 10000 | 0.9524 | 0.6000 | 1200 | 0.5000 | 0.2500 | 0.1000 |" in report
    assert "best sellers shared = |own top 50 ∩ other's top 50| / 50" in report
    # the findings: fedavg 0.705 without DP (mean of seeds 0.70, 0.71), 0.625 at ε 1; federated beats alone by
    # 0.10 at every ε; centralized 0.8
    assert "## Findings" in report
    assert "fedavg 0.7050 without DP, 0.6850 at ε 8 (-0.0200), 0.6250 at ε 1 (-0.0800)" in report
    assert "no DP +0.1000 (fedavg), ε 8 +0.1000 (fedavg), ε 1 +0.1000 (fedavg)" in report
    assert "Centralized training on the union of the data (no DP, no federation; the upper line): 0.8000" in report
    assert "reaches 0.7050 (88.1% of it)" in report


def test_findings_say_who_gains():
    import pandas as pd

    from fedcvr.simulations.report import findings

    auc = pd.DataFrame({"setting": ["fedavg"], "eps": ["no DP"], "mean": [0.7], "std": [0.01], "count": [2],
                        "epsilon": [None]})
    sizes = {"s": 100, "m": 1_000, "l": 10_000, "xl": 100_000}
    for gains_of, verdict in (({"s": 0.2, "m": 0.1, "l": 0.0, "xl": -0.1}, "the smaller the merchant, the more"),
                              ({"s": -0.1, "m": 0.0, "l": 0.1, "xl": 0.2}, "the larger the merchant, the more"),
                              ({"s": 0.1, "m": -0.1, "l": -0.1, "xl": 0.1}, "no clear relation")):
        gains = pd.DataFrame([{"setting": "fedavg", "epsilon": None, "seed": 0, "merchant": m,
                               "train_examples": sizes[m], "gain": g} for m, g in gains_of.items()])
        [line] = findings(auc, gains)
        assert verdict in line and f"the smallest, s (100 training examples), {gains_of['s']:+.4f}" in line


def test_findings_say_whether_the_merchants_most_like_the_others_gain_most():
    import pandas as pd

    from fedcvr.simulations.report import findings

    auc = pd.DataFrame({"setting": ["fedavg"], "eps": ["no DP"], "mean": [0.7], "std": [0.01], "count": [2],
                        "epsilon": [None]})
    gains = pd.DataFrame([{"setting": "fedavg", "epsilon": None, "seed": 0, "merchant": m, "train_examples": 100,
                           "gain": g} for m, g in (("uk", -0.08), ("fr", 0.0), ("de", 0.01), ("be", 0.03))])
    overlap = pd.DataFrame({"merchant": ["uk", "fr", "de", "be"], "best sellers shared": [0.15, 0.45, 0.4, 0.5]})
    overlap.attrs["top"] = 50
    line = findings(auc, gains, overlap)[-1]
    assert "the more a merchant's best sellers are also the others', the more it gains" in line
    assert "(rank correlation +0.80 over 4 merchants)" in line
    assert "the least alike, uk (15.0% shared), -0.0800; the most alike, be (50.0%), +0.0300" in line
    assert "cannot tell the two apart" not in line  # all of size 100
    assert "top 50 items" in line
    gains["train_examples"] = gains["merchant"].map({"uk": 400, "fr": 300, "de": 200, "be": 100})
    assert "size and alikeness go together (rank correlation -0.80): these merchants cannot tell the two apart" \
        in findings(auc, gains, overlap)[-1]
    overlap["best sellers shared"] = 0.4  # all alike: nothing to say
    assert not any("how alike" in line for line in findings(auc, gains, overlap))


def test_cli_report_without_results(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "fedcvr experiment" in result.output


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


def test_report_says_when_runs_saw_other_data():
    import pandas as pd

    from fedcvr.simulations.report import data_mismatch

    rows = [{"run_id": run, "merchant": merchant, "metric": "train-examples", "value": size}
            for run, uk in (("fedavg-epsnone-seed0", 31_840), ("fedavg-epsnone-seed1", 37_340),
                            ("local-only-epsnone-seed1", 37_340))
            for merchant, size in (("germany", 34_280), ("united-kingdom", uk))]
    table = pd.DataFrame(rows)
    [line] = data_mismatch(table)
    assert "germany" not in line
    assert ("united-kingdom: 31,840 training examples in 1 run(s) (fedavg-epsnone-seed0); 37,340 training examples "
            "in 2 run(s) (fedavg-epsnone-seed1, local-only-epsnone-seed1)") in line
    assert data_mismatch(table[table.run_id != "fedavg-epsnone-seed0"]) == []


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


def test_the_ordering_check_says_where_and_how_much_utility_fell():
    import pandas as pd

    from fedcvr.simulations.report import ordering_lines

    curve = pd.DataFrame({"setting": ["fedavg"] * 3 + ["fedprox"] * 3 + ["local-only"] * 2,
                          "eps": ["1", "8", "no DP"] * 2 + ["1", "no DP"],
                          "epsilon": [1.0, 8.0, None] * 2 + [1.0, None],
                          "mean": [0.60, 0.70, 0.68, 0.60, 0.70, 0.75, 0.70, 0.60],
                          "std": [0.01, 0.03, 0.03, 0.01, 0.01, 0.01, float("nan"), float("nan")]})
    lines = ordering_lines(curve, "test CTCVR AUC")
    assert lines[0] == ("- fedavg: NOT monotone in ε: the mean test CTCVR AUC falls by 0.0200 from ε 8 to no DP; "
                        "smaller than the spread over seeds (std up to 0.0300): noise, not an effect.")
    assert lines[1] == "- fedprox: more ε never lowered the mean test CTCVR AUC (the expected ordering)."
    assert "one seed so far, so the spread is unknown" in lines[2] and "from ε 1 to no DP" in lines[2]


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


def test_cost_table_times_rounds_on_runs_that_had_the_machine_alone():
    import pandas as pd

    from fedcvr.simulations.report_cost import cost_table

    rows = []
    for run_id, setting, eps, seconds in (("a0", "fedavg", 8.0, 50.0), ("a1", "fedavg", 8.0, 400.0),
                                          ("b0", "fedavg", 1.0, 300.0), ("c0", "fedadam", 8.0, 60.0)):
        for metric, value in (("seconds", seconds), ("bytes-sent", 2e6), ("bytes-received", 1e6)):
            rows.append({"run_id": run_id, "setting": setting, "epsilon": eps, "split": "validation",
                         "merchant": "all", "round": 1, "metric": metric, "value": value})
    costs = cost_table(pd.DataFrame(rows), busy={"a1", "b0"}).set_index(["setting", "ε"])
    assert costs.loc[("fedavg", "8"), "s / round"] == 50.0  # a1 shared the machine; a0 had it alone
    assert costs.loc[("fedavg", "8"), "timed"] == "1 run(s)"
    assert costs.loc[("fedavg", "1"), "s / round"] == 300.0  # only a shared run: kept, and said so
    assert costs.loc[("fedavg", "1"), "timed"] == "1 run(s), machine shared: slower"
    assert costs.loc[("fedadam", "8"), "MB sent / round"] == 2.0 and costs.loc[("fedadam", "8"), "timed"] == "1 run(s)"
    assert list(costs.index.get_level_values(0)) == ["fedavg", "fedavg", "fedadam"]  # setting order, large ε first
