"""The benchmark scripts run end to end on tiny data (the figures themselves come from full runs, BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest

from fedcvr.simulations.benchmarks import communication, dp_overhead


def test_dp_overhead_benchmark_times_plain_and_dp_steps_on_the_same_batches(tmp_path, tiny_market, tiny_bert,
                                                                             capsys):
    result = dp_overhead.main(["--data", str(tiny_market), "--merchant", "merchant-01", "--adapter-layers", "1",
                               "--batch-size", "32", "--steps", "2", "--warmup", "1", "--encoder", str(tiny_bert),
                               "--out", str(tmp_path)])
    assert set(result["seconds"]) == {"plain", "per-example", "hooks", "ghost"}
    assert all(len(v) == 2 and min(v) > 0 for v in result["seconds"].values())
    assert result["ratio_of_medians"]["hooks"] == result["median_s"]["hooks"] / result["median_s"]["plain"]
    assert result["ratio_to_per_example"]["ghost"] == result["median_s"]["ghost"] / result["median_s"]["per-example"]
    assert json.loads((tmp_path / "dp_overhead.json").read_text())["machine"]["cpus"] >= 1
    assert "DP overhead (ratio of medians; target <= 2.0)" in capsys.readouterr().out


def test_communication_benchmark_sizes_the_update_and_splits_the_round(tmp_path, tiny_market, tiny_bert, capsys):
    result = communication.main(["--data", str(tiny_market), "--rounds", "1", "--adapter-layers", "0", "1",
                                 "--no-dp", "--encoder", str(tiny_bert), "--out", str(tmp_path)])
    small, adapted = result["update_sizes"]
    assert 0 < small["update_bytes"] < adapted["update_bytes"]  # adapters add weights
    # every trainable weight travels as float32 (4 bytes each, plus a little framing per array), nothing else
    for size in (small, adapted):
        assert 4 * size["update_parameters"] <= size["update_bytes"] < 4 * size["update_parameters"] + 20_000
    assert small["encoder_bytes"] == adapted["encoder_bytes"] > 0 and small["ratio"] > 0
    (record,) = result["round_times"]["per_round"]
    assert record["client_train_s"] > 0 and record["aggregate_s"] >= 0
    assert abs(record["client_train_s"] + record["aggregate_s"] + record["rest_s"] - record["seconds"]) < 1e-6
    assert record["bytes_received"] > 0
    printed = capsys.readouterr().out
    assert "nodes' training (summed)" in printed and "of the encoder's" in printed


def test_encoder_benchmark_compares_throughput_and_reencoding(tmp_path, tiny_market, tiny_bert, capsys):
    pytest.importorskip("sentence_transformers")
    from fedcvr.simulations.benchmarks import encoder

    result = encoder.main(["--data", str(tiny_market), "--items", "40", "--repeats", "1", "--encoder",
                           str(tiny_bert), "--out", str(tmp_path)])
    assert result["items"] == 40
    assert result["throughput"]["fedcvr_items_per_s"] > 0 and result["throughput"]["ratio"] > 0
    assert result["reencode"]["cached_s"] > 0 and result["reencode"]["speedup"] > 0
    assert result["reencode"]["max_embedding_difference"] < 1e-5  # the cache changes the time, not the result
    assert "sentence-transformers encode" in capsys.readouterr().out


def test_scale_benchmark_fits_time_and_memory_over_federation_sizes(tmp_path, tiny_bert, capsys):
    from fedcvr.simulations.benchmarks import scale

    result = scale.main(["--merchants", "2", "3", "--rounds", "1", "--shoppers", "40", "--items", "120",
                         "--events", "800", "--no-dp", "--encoder", str(tiny_bert), "--out", str(tmp_path)])
    assert [r["merchants"] for r in result["runs"]] == [2, 3]
    assert all(r["seconds_per_round"] > 0 and r["peak_mb"] > 0 for r in result["runs"])
    assert {"intercept", "slope", "r2"} <= set(result["seconds_per_round_fit"])
    # every merchant of a federation holds the same data
    folders = sorted((tmp_path / "scale-3").iterdir())
    assert len(folders) == 3 and len({f.resolve() for f in folders}) == 1
    assert "fit: s/round" in capsys.readouterr().out


def test_gpu_benchmark_says_when_there_is_no_gpu(tmp_path, capsys):
    import torch

    from fedcvr.simulations.benchmarks import gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the benchmark measures instead (see BENCHMARKS.md)")
    result = gpu.main(["--out", str(tmp_path)])
    assert result["measured"] is False and "no CUDA device" in result["reason"]
    assert json.loads((tmp_path / "gpu.json").read_text())["measured"] is False
    assert "not measured" in capsys.readouterr().out


def test_the_suite_summarises_every_figure_against_its_target():
    from fedcvr.simulations.benchmarks.__main__ import summary

    results = {
        "dp_overhead": {"adapter_layers": 1, "ratio_of_medians": {"hooks": 2.5, "ghost": 1.9},
                        "ratio_to_per_example": {"hooks": 1.6, "ghost": 1.2}},
        "encoder": {"throughput": {"ratio": 1.1}, "reencode": {"speedup": 40.0}},
        "communication": {"update_sizes": [{"adapter_layers": 0, "ratio": 0.004}],
                          "round_times": {"median": {"client_train_s": 30.0, "aggregate_s": 0.01, "rest_s": 5.0}}},
        "serving": {"retrieval": {"ratio_of_medians": 1.3}, "http": {"recommend": {"p50_ms": 5.0, "p99_ms": 17.0}}},
        "scale": {"seconds_per_round_fit": {"slope": 1.5, "r2": 0.999}, "peak_mb_fit": {"slope": 20.0, "r2": 0.99}},
        "gpu": {"measured": False, "reason": "no CUDA device is visible"},
        "serving_load": {"clients": 50, "catalog_items": 10_000, "runs": [
            {"workers": 1, "load": {"p99_ms": 240.0, "requests_per_s": 150.0}, "sequential": {"p99_ms": 9.0}},
            {"workers": 2, "load": {"p99_ms": 90.0, "requests_per_s": 400.0}, "sequential": {"p99_ms": 9.5}}]},
        "training_throughput": {"measured": True, "train_examples": 1_000, "epochs": [
            {"rate": 1.0, "seconds": 150.0}, {"rate": 0.25, "seconds": 60.0}], "dp": {"rate": 0.25, "epoch_s": 300.0}},
        "deployed_round": {"merchants": 3, "rounds": [
            {"mode": "plain", "overhead_per_message_s": 2.5}, {"mode": "plain", "overhead_per_message_s": 3.5},
            {"mode": "secagg", "overhead_per_message_s": 1.2}]},
    }
    rows = {figure: (value, target, met) for figure, value, target, met in summary(results)}
    assert rows["DP step / plain step (adapter.layers 1, hooks)"] == ("2.50", "<= 2.0", "NO")
    assert rows["DP step / plain step (adapter.layers 1, ghost)"][2] == "yes"
    assert rows["  DP step / same step without DP, items encoded per example (ghost)"][0] == "1.20"
    assert rows["update / encoder bytes (adapter.layers 0)"] == ("0.40 %", "<= 2 %", "yes")
    assert rows["re-encode: full forward / cached prefix"] == ("40.0x", ">= 3", "yes")
    assert rows["scale: s/round per merchant (fit)"][2] == "yes"
    assert rows["GPU / CPU step speed-up"][0].startswith("not measured")
    assert rows["POST /recommend p99, 50 parallel clients, 10,000 items, 1 worker(s)"] == ("240 ms", "< 100 ms", "NO")
    assert rows["POST /recommend p99, 50 parallel clients, 10,000 items, 2 worker(s)"][2] == "yes"
    assert rows["epoch of 1,000 examples, negatives kept 1"] == ("150 s", "< 120 s", "NO")
    assert rows["epoch of 1,000 examples, negatives kept 0.25"][2] == "yes"
    # the worst round counts
    assert rows["deployed round overhead per message (plain, 3 nodes, worst round)"] == ("3.5 s", "<= 3 s", "NO")
    assert rows["deployed round overhead per message (secagg, 3 nodes, worst round)"][2] == "yes"


def test_deployed_round_splits_each_round_into_work_and_overhead(tmp_path):
    from fedcvr.simulations.benchmarks.deployed_round import round_rows

    (tmp_path / "rounds.jsonl").write_text(
        json.dumps({"round": 1, "seconds": 20.0, "client-train-seconds-max": 12.0,
                    "client-evaluate-seconds-max": 2.0}) + "\n" + json.dumps({"round": 2, "seconds": 9.0}) + "\n")
    first, second = round_rows(tmp_path, "secagg")
    assert first["overhead_s"] == pytest.approx(6.0) and first["overhead_per_message_s"] == pytest.approx(1.2)
    assert second["overhead_s"] == pytest.approx(9.0)  # nothing measured: all of it counts as overhead


def test_ranking_benchmark_scores_the_same_both_ways_and_times_them(tmp_path, tiny_bert, capsys):
    from fedcvr.simulations.benchmarks import ranking

    result = ranking.main(["--catalog", "40", "--shoppers", "3", "--repeats", "2", "--encoder", str(tiny_bert),
                           "--out", str(tmp_path)])
    assert result["max_score_difference"] < 1e-5
    assert all(v > 0 for v in result["pairs_per_second"].values())
    assert result["speedup"] == result["pairs_per_second"]["together"] / result["pairs_per_second"]["per_pair"]
    assert json.loads((tmp_path / "ranking.json").read_text())["catalog"] == 40
    assert "together (score_candidates)" in capsys.readouterr().out


def test_cold_start_benchmark_times_each_step_of_a_node_before_it_trains(tmp_path, tiny_market):
    from fedcvr.shared.data.loader import merchant_folders
    from fedcvr.simulations.benchmarks import cold_start

    result = cold_start.main(["--merchant", str(merchant_folders(tiny_market)[0]), "--out", str(tmp_path)])
    assert list(result["steps"]) == ["import the ClientApp", "import the node's code", "the backbone",
                                     "load the merchant's folder", "prepare its examples",
                                     "the catalog's prefix states"]
    assert all(seconds >= 0 for seconds in result["steps"].values()) and result["total_s"] > 0
    assert json.loads((tmp_path / "cold_start.json").read_text())["merchant"] == result["merchant"]


@pytest.mark.slow  # 15-30 s: the integration lane
def test_training_throughput_times_epochs_with_and_without_subsampling_and_dp_steps(tmp_path, tiny_bert, tiny_market,
                                                                                      capsys):
    from fedcvr.simulations.benchmarks import training_throughput

    result = training_throughput.main(["--data", str(tiny_market), "--rates", "1", "0.5", "--dp-rate", "0.5",
                                       "--dp-steps", "2", "--encoder", str(tiny_bert), "--out", str(tmp_path)])
    full, half = result["epochs"]
    assert full["examples"] == result["train_examples"] > half["examples"] > 0
    assert full["examples_per_s"] > 0 and half["seconds"] > 0
    assert result["dp"]["steps_timed"] >= 1 and result["dp"]["epoch_s"] > 0 and not result["dp"]["epoch_measured"]
    assert "DP epoch, negatives kept 0.5" in capsys.readouterr().out
    missing = training_throughput.main(["--data", f"online-retail:{tmp_path / 'nowhere.parquet'}",
                                        "--out", str(tmp_path / "m")])
    assert missing["measured"] is False and "not found" in missing["reason"]
