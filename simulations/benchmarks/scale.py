"""Scale benchmark: wall time per round and peak memory of a simulated federation of 10, 50 and 100 merchants
with the same data per merchant, and the fitted growth in the number of merchants.

    python -m fedcvr.simulations.benchmarks.scale [--merchants 10 50 100] [--rounds 2] [--no-dp] [--out runs/bench]

1. One small synthetic merchant (`--shoppers`, `--items`, `--events`, seed 0) is generated once; a federation of
   N merchants is N copies of it (links), so every merchant holds the same data and the cost per merchant is the
   same by construction.
2. For each N, a fresh Python process runs `--rounds` rounds of the app's ServerApp and ClientApp logic in one
   process (`simulations/inprocess.py`: nodes train and evaluate one after another, each keeping its state between
   rounds as a SuperNode does), with the app's defaults (DP-SGD unless `--no-dp`); it reports the median seconds
   per round after the first (the first also builds every node) and its peak resident memory (ru_maxrss).
3. Least-squares lines seconds/round = a + b N and peak MB = c + d N: b is the cost of one more merchant per round,
   d the memory of one more merchant kept in the process; R^2 says how straight the lines are.
Prints one table and writes `<out>/scale.json` with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedcvr.shared import flower_app
from fedcvr.simulations.benchmarks.common import command, machine, print_table, write_result


def base_merchant(out: Path, shoppers: int, items: int, events: int) -> Path:
    from fedcvr.simulations.synth import SynthConfig, generate_marketplace

    root = out / f"scale-base-{shoppers}-{items}-{events}"
    if not (root / "merchant-01" / "events.parquet").is_file():
        generate_marketplace(SynthConfig(merchants=1, items=items, shoppers=shoppers, events=events, seed=0), root)
    return root / "merchant-01"


def federation_of(base: Path, merchants: int, out: Path) -> Path:
    """A marketplace folder of `merchants` links to the same merchant folder."""
    root = out / f"scale-{merchants}"
    root.mkdir(parents=True, exist_ok=True)
    for k in range(merchants):
        link = root / f"merchant-{k + 1:03d}"
        if not link.exists():
            link.symlink_to(base.resolve(), target_is_directory=True)
    return root


def run_one(data: Path, rounds: int, dp: bool, encoder: str) -> dict[str, Any]:
    """In this process: `rounds` rounds over every merchant of `data`; seconds per round and peak memory."""
    from fedcvr.shared.data.loader import merchant_folders
    from fedcvr.simulations.inprocess import run_federation

    nodes = len(merchant_folders(data))
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as out:
        run_config = flower_app.defaults_with("", **{"data-root": str(data), "out-dir": out,
                                                     "num-server-rounds": rounds, "min-nodes": nodes,
                                                     "dp.enabled": dp, "model.encoder": encoder})
        started = time.perf_counter()
        run_federation(run_config, nodes)
        total = time.perf_counter() - started
        seconds = [json.loads(line)["seconds"] for line in (Path(out) / "rounds.jsonl").read_text().splitlines()]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    later = seconds[1:] or seconds
    return {"merchants": nodes, "rounds": rounds, "round_seconds": seconds,
            "seconds_per_round": statistics.median(later), "first_round_seconds": seconds[0], "run_seconds": total,
            "peak_mb": peak_kb / 1024}


def fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Least-squares y = intercept + slope x, with R^2."""
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    predicted = intercept + slope * np.asarray(x, float)
    residual = float(np.sum((np.asarray(y) - predicted) ** 2))
    total = float(np.sum((np.asarray(y) - np.mean(y)) ** 2))
    return {"intercept": float(intercept), "slope": float(slope), "r2": 1.0 - residual / total if total else 1.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--merchants", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shoppers", type=int, default=60)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--events", type=int, default=1500)
    parser.add_argument("--no-dp", action="store_true", help="rounds without DP-SGD")
    parser.add_argument("--encoder", default="", help="model.encoder (default: the packaged MiniLM)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one is not None:
        print("SCALE-RESULT " + json.dumps(run_one(args.one, args.rounds, not args.no_dp, args.encoder)))
        return {}
    if len(args.merchants) < 2 or min(args.merchants) < 2:
        raise SystemExit(f"--merchants {args.merchants}: give at least two sizes, each >= 2, e.g. 10 50 100")
    out = args.out.resolve()
    base = base_merchant(out, args.shoppers, args.items, args.events)
    runs = []
    for merchants in args.merchants:
        data = federation_of(base, merchants, out)
        child = [sys.executable, "-m", "fedcvr.simulations.benchmarks.scale", "--one", str(data), "--rounds",
                 str(args.rounds), "--encoder", args.encoder, *(["--no-dp"] if args.no_dp else [])]
        done = subprocess.run(child, capture_output=True, text=True, env={**os.environ})
        lines = [line for line in done.stdout.splitlines() if line.startswith("SCALE-RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"the run with {merchants} merchants failed (exit {done.returncode}):\n"
                             f"{done.stderr[-3000:]}")
        runs.append(json.loads(lines[-1].removeprefix("SCALE-RESULT ")))
        print(f"{merchants} merchants: {runs[-1]['seconds_per_round']:.1f} s/round, {runs[-1]['peak_mb']:.0f} MB")
    sizes = [r["merchants"] for r in runs]
    time_fit = fit(sizes, [r["seconds_per_round"] for r in runs])
    memory_fit = fit(sizes, [r["peak_mb"] for r in runs])
    result = {"command": command("fedcvr.simulations.benchmarks.scale", argv), "machine": machine(),
              "per_merchant": {"shoppers": args.shoppers, "items": args.items, "events": args.events},
              "dp": not args.no_dp, "runs": runs, "seconds_per_round_fit": time_fit, "peak_mb_fit": memory_fit}
    path = write_result(out / "scale.json", result)
    rows = [(f"{r['merchants']} merchants",
             f"{r['seconds_per_round']:.1f} s/round ({r['seconds_per_round'] / r['merchants']:.2f} s per merchant), "
             f"peak {r['peak_mb']:.0f} MB ({r['peak_mb'] / r['merchants']:.1f} MB per merchant)") for r in runs]
    rows += [("fit: s/round", f"{time_fit['intercept']:.2f} + {time_fit['slope']:.3f} x merchants "
                              f"(R^2 {time_fit['r2']:.3f})"),
             ("fit: peak MB", f"{memory_fit['intercept']:.0f} + {memory_fit['slope']:.1f} x merchants "
                              f"(R^2 {memory_fit['r2']:.3f})")]
    print_table(rows)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
