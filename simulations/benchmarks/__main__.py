"""`python -m fedcvr.simulations.benchmarks` (`make bench`): every benchmark in turn, then one table of the figures
against their targets, written with the machine's description to `<out>/benchmarks.json`.

    python -m fedcvr.simulations.benchmarks [--out runs/bench] [--only dp_overhead encoder ...]

The benchmarks (each also runs alone, see its module): dp_overhead, encoder, communication, serving, serving_load,
scale, ranking, training_throughput (needs the Online Retail file; says so without it), deployed_round, gpu.
Each measures its figures side by side in one run, so the ratios hold on a busy machine; the whole suite takes
about an hour and a half on 2 CPU cores (deployed_round alone about 16 minutes; the serving benchmark's 100k-item
index is built once and kept in `<out>`).
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from typing import Any

from fedcvr.simulations.benchmarks.common import machine, print_table, write_result

ORDER = ("dp_overhead", "encoder", "communication", "serving", "serving_load", "scale", "ranking",
         "training_throughput", "deployed_round", "gpu")


def summary(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, met) rows from the benchmarks' results."""
    rows: list[tuple[str, str, str, str]] = []

    def add(figure: str, value: float, target: str, met: bool, fmt: str = "{:.2f}") -> None:
        rows.append((figure, fmt.format(value), target, "yes" if met else "NO"))

    if "dp_overhead" in results:
        r = results["dp_overhead"]
        for mode, ratio in r["ratio_of_medians"].items():
            add(f"DP step / plain step (adapter.layers {r['adapter_layers']}, {mode})", ratio, "<= 2.0", ratio <= 2.0)
            rows.append((f"  DP step / same step without DP, items encoded per example ({mode})",
                         f"{r['ratio_to_per_example'][mode]:.2f}", "", ""))
    if "encoder" in results:
        r = results["encoder"]
        add("encoder items/s: fedcvr / sentence-transformers", r["throughput"]["ratio"], ">= 1.0",
            r["throughput"]["ratio"] >= 1.0)
        add("re-encode: full forward / cached prefix", r["reencode"]["speedup"], ">= 3", r["reencode"]["speedup"] >= 3,
            "{:.1f}x")
    if "communication" in results:
        for size in results["communication"]["update_sizes"]:
            add(f"update / encoder bytes (adapter.layers {size['adapter_layers']})", size["ratio"] * 100, "<= 2 %",
                size["ratio"] <= 0.02, "{:.2f} %")
        median = results["communication"]["round_times"]["median"]
        rows.append(("round: training / aggregation / rest",
                     f"{median['client_train_s']:.1f} / {median['aggregate_s']:.3f} / {median['rest_s']:.1f} s",
                     "", ""))
    if "serving" in results:
        r = results["serving"]
        ratio = r["retrieval"]["ratio_of_medians"]
        add("top-10 retrieval / numpy matmul + argpartition (100k items)", ratio, "<= 1.5", ratio <= 1.5)
        rows.append(("POST /recommend p50 / p99", f"{r['http']['recommend']['p50_ms']:.1f} / "
                                                  f"{r['http']['recommend']['p99_ms']:.1f} ms", "", ""))
    if "serving_load" in results:
        r = results["serving_load"]
        for run in r["runs"]:
            load = run["load"]
            add(f"POST /recommend p99, {r['clients']} parallel clients, {r['catalog_items']:,} items, "
                f"{run['workers']} worker(s)", load["p99_ms"], "< 100 ms", load["p99_ms"] < 100, "{:.0f} ms")
            rows.append((f"  requests/s at {run['workers']} worker(s) (sequential p99)",
                         f"{load['requests_per_s']:.0f} ({run['sequential']['p99_ms']:.1f} ms)", "", ""))
    if "training_throughput" in results and results["training_throughput"].get("measured"):
        r = results["training_throughput"]
        for e in r["epochs"]:
            add(f"epoch of {r['train_examples']:,} examples, negatives kept {e['rate']:g}", e["seconds"], "< 120 s",
                e["seconds"] < 120, "{:.0f} s")
        rows.append((f"DP epoch, negatives kept {r['dp']['rate']:g}", f"{r['dp']['epoch_s']:.0f} s", "", ""))
    if "scale" in results:
        t, m = results["scale"]["seconds_per_round_fit"], results["scale"]["peak_mb_fit"]
        rows.append(("scale: s/round per merchant (fit)", f"{t['slope']:.3f} s (R^2 {t['r2']:.3f})", "linear",
                     "yes" if t["r2"] >= 0.98 else "NO"))
        rows.append(("scale: peak MB per merchant (fit)", f"{m['slope']:.1f} MB (R^2 {m['r2']:.3f})", "flat", ""))
    if "ranking" in results:
        r = results["ranking"]
        rows.append(("full-catalog ranking: pairs/s together / each pair alone",
                     f"{r['pairs_per_second']['together']:,.0f} / {r['pairs_per_second']['per_pair']:,.0f} "
                     f"({r['speedup']:.1f}x)", "", ""))
    if "deployed_round" in results:
        r = results["deployed_round"]
        for mode in ("plain", "secagg"):
            per = [row["overhead_per_message_s"] for row in r["rounds"] if row["mode"] == mode]
            if per:
                add(f"deployed round overhead per message ({mode}, {r['merchants']} nodes, worst round)", max(per),
                    "<= 3 s", max(per) <= 3.0, "{:.1f} s")
    if "gpu" in results:
        r = results["gpu"]
        rows.append(("GPU / CPU step speed-up", f"{r['speedup']['plain']:.1f}x plain, "
                     f"{r['speedup'][r['grad_sample_mode']]:.1f}x DP ({r['grad_sample_mode']})"
                     if r.get("measured") else f"not measured: {r['reason']}", "", ""))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--only", nargs="+", choices=ORDER, default=list(ORDER))
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for name in [n for n in ORDER if n in args.only]:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        results[name] = importlib.import_module(f"fedcvr.simulations.benchmarks.{name}").main(["--out", str(args.out)])
        seconds[name] = time.perf_counter() - started
    rows = summary(results)
    print()
    print_table([(figure, f"{value}   target {target or '-'}   met {met or '-'}")
                 for figure, value, target, met in rows])
    path = write_result(args.out.resolve() / "benchmarks.json",
                        {"machine": machine(), "seconds": seconds, "summary": rows, "results": results})
    print(f"wrote {path}")
    return {"summary": rows, "results": results}


if __name__ == "__main__":
    main()
