"""Next basket where users see it: train-central, local-only and experiments rank the model beside the baselines."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedcvr.cli import app
from fedcvr.shared import flower_app
from fedcvr.shared.data.examples import ExampleConfig
from fedcvr.shared.data.loader import load_merchant, merchant_folders
from fedcvr.shared.evaluation import BASELINES, basket_metrics
from fedcvr.shared.evaluation.baselines import BaselineConfig
from fedcvr.shared.model.config import ModelConfig
from fedcvr.shared.model.esmm import initial_model
from fedcvr.shared.model.prefix_cache import PrefixCache
from fedcvr.shared.training.loop import ItemSide, basket_scorer, embed_catalog, model_sums
from fedcvr.shared.training.prepare import prepare

CUT = "2024-03-01"


def test_train_central_prints_the_next_basket_tables_with_every_baseline(tmp_path, tiny_purchase_market, tiny_bert):
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["train-central", "--data", str(tiny_purchase_market), "--out", str(out),
                                      "--epochs", "1", "--encoder", str(tiny_bert), "--test-from", CUT,
                                      "--batch-size", "256"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "next basket: every item" in text and "next basket: new items" in text
    for name in BASELINES:
        assert f"{name} (pooled;" in text
    assert "NDCG@10" in text and "Recall@10" in text and "NDCG@50" in text
    assert "hr@10" not in text  # purchase logs are ranked by next basket, not per purchase
    saved = json.loads((out / "metrics.json").read_text())
    test = saved["splits"]["test"]["model"]
    assert 0 <= test["nb.all.ndcg@10.lo"] <= test["nb.all.ndcg@10"] <= test["nb.all.ndcg@10.hi"] <= 1
    assert {b["name"] for b in saved["baselines"]} == set(BASELINES)
    assert all(b["scope"] == "pooled" and b["metrics"]["nb.all.n"] == test["nb.all.n"] for b in saved["baselines"])


def test_train_central_refuses_a_bad_date_and_an_unknown_baseline(tmp_path, tiny_purchase_market):
    runner = CliRunner()
    bad_date = runner.invoke(app, ["train-central", "--data", str(tiny_purchase_market), "--out", str(tmp_path / "m"),
                                   "--test-from", "next tuesday"])
    assert bad_date.exit_code != 0 and "--test-from" in bad_date.output and "2011-11-01" in bad_date.output
    bad_name = runner.invoke(app, ["train-central", "--data", str(tiny_purchase_market), "--out", str(tmp_path / "m"),
                                   "--baselines", "popularity,bestseller"])
    assert bad_name.exit_code != 0 and "'bestseller'" in bad_name.output and "item-knn" in bad_name.output
    assert not (tmp_path / "m").exists()


def test_the_test_split_and_the_next_basket_cut_start_at_test_from(tiny_purchase_market):
    config = ExampleConfig.defaults(test_from=CUT)
    prepared = prepare([load_merchant(f) for f in merchant_folders(tiny_purchase_market)], config)
    cut = pd.Timestamp(CUT).value
    assert set(prepared.baskets["test"].cut) == {cut}
    assert (prepared.baskets["validation"].cut < cut).all()
    # the baselines' fits at the cut see only the purchases before it, every merchant's up to the same cut
    fitted = []
    from fedcvr.shared.evaluation import next_basket

    original = next_basket.fit
    try:
        next_basket.fit = lambda name, params, data, n, at, *rest: fitted.append((data, at)) or original(
            name, params, data, n, at, *rest)
        next_basket.baseline_sums("popularity", {"days": 30.0}, prepared.baskets["test"], prepared.candidates,
                                  len(prepared.catalog), BaselineConfig.defaults(), "pooled")
    finally:
        next_basket.fit = original
    assert [at for _, at in fitted] == [cut] and (fitted[0][0].t < cut).all()
    assert set(fitted[0][0].merchant) == {0, 1, 2}
    # every shopper in the test task bought again at or after the cut and is scored from history before it
    assert len(prepared.baskets["test"]) > 30 and all(len(r) for r in prepared.baskets["test"].relevant)


def test_the_model_ranks_a_next_basket_as_scoring_each_item_of_the_catalog_would(tiny_purchase_market, tiny_bert):
    prepared = prepare([load_merchant(merchant_folders(tiny_purchase_market)[0])],
                       ExampleConfig.defaults(test_from=CUT))
    config = ModelConfig.defaults(encoder=str(tiny_bert))
    model, backbone = initial_model(config, 0)
    side = ItemSide(PrefixCache(backbone, 0, config.max_text_tokens).states(prepared.catalog.texts),
                    torch.from_numpy(prepared.catalog.numeric))
    device = torch.device("cpu")
    embeddings = embed_catalog(model, side, device)
    task, pool = prepared.baskets["test"].subset(np.arange(3)), prepared.candidates[0]
    scores = basket_scorer(model, embeddings, device)(task, pool)
    # one shopper, one candidate at a time: the same pCTCVR
    one = basket_scorer(model, embeddings, device)(task.subset([1]), pool[5:6])
    assert np.isclose(one[0, 0], scores[1, 5], rtol=1e-5)
    sums = model_sums(model, side, prepared.splits["test"], prepared.candidates, prepared.logs, device, embeddings,
                      basket=prepared.baskets["test"])
    assert sums["nb.all.n"] == len(prepared.baskets["test"]) and "rank.n" not in sums


def _experiment(tmp_path, data, bert) -> object:
    config = tmp_path / "experiment.toml"
    config.write_text(textwrap.dedent(f"""
        name = "tiny-shops"
        data = "{data}"
        settings = ["centralized", "local-only", "fedavg"]
        epsilons = ["none"]
        seeds = [0]
        rounds = 1
        baselines = ["popularity", "repeat", "item-knn", "als", "text"]
        [run-config]
        "model.encoder" = "{bert}"
        "examples.test-from" = "{CUT}"
        "train.batch-size" = 256
        "train.epochs" = 1
    """))
    return config


@pytest.mark.slow  # whole runs: the integration lane (`make test-slow`)
def test_an_experiment_reports_the_model_beside_the_baselines(tmp_path, tiny_purchase_market, tiny_bert):
    from fedcvr.simulations.experiment import run_grid
    from fedcvr.simulations.experiment_config import Experiment
    from fedcvr.simulations.report import write_report

    experiment = Experiment.from_toml(_experiment(tmp_path, tiny_purchase_market, tiny_bert))
    table = run_grid(experiment, tmp_path / "out")
    test = table[(table.split == "test") & (table.merchant == "all") & (table.metric == "nb.all.ndcg@10")]
    settings = set(test.setting)
    assert {"centralized", "local-only", "fedavg"} <= settings
    # personalise = true (the default): every model run also reports global + local, centralized included
    assert {"centralized + local", "local-only + local", "fedavg + local"} <= settings
    assert {f"{name} ({scope})" for name in BASELINES for scope in ("pooled", "local")} <= settings
    # each merchant's own baselines also have rows of their own, and one shopper count holds for every row
    assert {"shop-1", "shop-2", "shop-3"} <= set(table[table.setting == "popularity (local)"].merchant)
    counts = table[(table.split == "test") & (table.merchant == "all") & (table.metric == "nb.all.n")]
    assert counts["value"].nunique() == 1
    # the command prints the same tables once the grid is done (every run is finished: nothing runs again)
    printed = CliRunner().invoke(app, ["experiment", str(tmp_path / "experiment.toml"), "--out",
                                       str(tmp_path / "out"), "--no-report"])
    assert printed.exit_code == 0, printed.output
    assert "next basket: every item" in printed.output and "item-knn (local)" in printed.output
    report = write_report(tmp_path / "out").read_text()
    assert "## Next basket (purchase logs)" in report and "Where the model stands today" in report
    assert "| popularity (pooled): days " in report and "| item-knn (local) |" in report
    assert "New items (items bought before the cut left out)" in report


def test_an_experiment_refuses_unknown_baselines(tmp_path):
    from fedcvr.simulations.experiment_config import Experiment, ExperimentError

    config = tmp_path / "bad.toml"
    config.write_text('baselines = ["popularity", "magic"]\n')
    try:
        Experiment.from_toml(config)
    except ExperimentError as err:
        assert "`baselines`" in str(err) and "item-knn" in str(err)
    else:
        raise AssertionError("an unknown baseline was accepted")


def test_local_only_pools_each_merchants_models_and_baselines(tmp_path, tiny_purchase_market, tiny_bert):
    from fedcvr.simulations.local_only import compare, pooled_next_basket

    out = tmp_path / "central"
    result = CliRunner().invoke(app, ["train-central", "--data", str(tiny_purchase_market), "--out", str(out),
                                      "--epochs", "1", "--encoder", str(tiny_bert), "--test-from", CUT,
                                      "--baselines", ""])
    assert result.exit_code == 0, result.output
    run_config = flower_app.defaults_with("", **{"data-root": str(tiny_purchase_market), "num-server-rounds": 1,
                                               "dp.enabled": False, "model.encoder": str(tiny_bert),
                                               "examples.test-from": CUT, "train.batch-size": 256})
    folders = merchant_folders(tiny_purchase_market)
    results = compare(folders, run_config, out, baselines=["popularity", "repeat"])
    rows = dict(pooled_next_basket(results))
    assert set(rows) == {"model, each merchant alone", "federated model", "popularity (each merchant alone)",
                         "repeat (each merchant alone)"}
    shoppers = sum(r.alone_sums["nb.all.n"] for r in results)
    assert all(m["nb.all.n"] == shoppers for m in rows.values())
    # the pooled figure is the shopper-weighted mean of the merchants' own
    per_merchant = [basket_metrics.finalise(r.baselines[0].sums, bootstrap=0) for r in results]
    weighted = sum(m["nb.all.ndcg@10"] * m["nb.all.n"] for m in per_merchant) / shoppers
    assert np.isclose(rows["popularity (each merchant alone)"]["nb.all.ndcg@10"], weighted)


def test_local_only_cli_prints_the_next_basket_tables(tmp_path, tiny_purchase_market, tiny_bert):
    from fedcvr.shared.flower_app import RUN_CONFIG_FILE, write_run_config

    run = tmp_path / "run"
    runner = CliRunner()
    made = runner.invoke(app, ["train-central", "--data", str(tiny_purchase_market), "--out", str(run / "model"),
                               "--epochs", "1", "--encoder", str(tiny_bert), "--test-from", CUT, "--baselines", ""])
    assert made.exit_code == 0, made.output
    write_run_config(run / RUN_CONFIG_FILE, {
        "data-root": str(tiny_purchase_market), "out-dir": str(run), "num-server-rounds": 1, "min-nodes": 3,
        "model.encoder": str(tiny_bert), "examples.test-from": CUT, "train.batch-size": 256, "dp.enabled": False})
    result = runner.invoke(app, ["local-only", "--run", str(run), "--baselines", "popularity,repeat"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "next basket, all merchants' shoppers: every item" in text and "new items" in text
    for row in ("model, each merchant alone", "federated model", "popularity (each merchant alone)",
                "repeat (each merchant alone)"):
        assert row in text
    assert "nb.all.ndcg@10" in text  # the per-merchant table's next-basket column
    saved = json.loads((run / "local-only.json").read_text())
    assert [b["name"] for b in saved[0]["baselines"]] == ["popularity", "repeat"]
    refused = runner.invoke(app, ["local-only", "--run", str(run), "--baselines", "pagerank"])
    assert refused.exit_code == 2 and "'pagerank'" in refused.output
