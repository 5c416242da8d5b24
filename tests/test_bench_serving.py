"""The serving benchmark script runs end to end on a small catalog (the figures themselves come from full runs)."""

from __future__ import annotations

import json

import pytest

from fedcvr.simulations.benchmarks import serving


def test_serving_benchmark_reports_latency_and_the_retrieval_ratio(tmp_path, tiny_bert, capsys):
    result = serving.main(["--items", "400", "--shoppers", "60", "--events", "3000", "--requests", "8",
                           "--warmup", "2", "--candidates", "50", "--encoder", str(tiny_bert), "--out",
                           str(tmp_path)])
    assert result["catalog_items"] == 400 and result["index_built"]
    retrieval = result["retrieval"]
    assert retrieval["ours"]["n"] == retrieval["reference"]["n"] > 0 and retrieval["ratio_of_medians"] > 0
    http = result["http"]["recommend"]
    assert http["n"] == 8 and 0 < http["p50_ms"] <= http["p99_ms"]
    assert json.loads((tmp_path / "serving.json").read_text())["machine"]["cpus"] >= 1
    printed = capsys.readouterr().out
    assert "POST /recommend k=10 p50 / p99" in printed and "retrieval ratio" in printed


@pytest.mark.slow  # 15-30 s: the integration lane
def test_the_load_benchmark_measures_sequential_and_parallel_clients_at_each_worker_count(tmp_path, tiny_bert, capsys):
    from fedcvr.simulations.benchmarks import serving_load

    result = serving_load.main(["--items", "300", "--shoppers", "40", "--events", "2000", "--clients", "4",
                                "--seconds", "1", "--sequential", "5", "--warmup", "1", "--workers", "1", "2",
                                "--encoder", str(tiny_bert), "--out", str(tmp_path)])
    assert [run["workers"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert run["sequential"]["requests"] == 5 and run["load"]["requests"] > 0
        assert 0 < run["load"]["p50_ms"] <= run["load"]["p99_ms"] and run["load"]["requests_per_s"] > 0
    assert json.loads((tmp_path / "serving_load.json").read_text())["clients"] == 4
    assert "parallel clients p50 / p95 / p99" in capsys.readouterr().out
