"""The experiment report (`simulations/report*.py`): plots and tables from a tidy table, findings, the ordering
check, cost and machines."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedcvr.cli import app


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
