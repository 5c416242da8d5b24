"""Communication benchmark: the bytes of one merchant's update against the full encoder's, and where a simulated
round's wall time goes (the nodes' training, the aggregation, the rest), measured in one run.

    python -m fedcvr.simulations.benchmarks.communication [--data DIR] [--rounds 2] [--adapter-layers 0 1]
        [--no-dp] [--out runs/bench]

1. Update size: for each `--adapter-layers`, the trainable weights (adapters, projections, user tower, head) as
   the Flower ArrayRecord a node sends (`ArrayRecord.count_bytes`), against the whole encoder (all the backbone's
   weights as an ArrayRecord too, i.e. what sending the fine-tuned BERT would cost). Target: at most 2 %.
2. Round time: `--rounds` rounds of the app's ServerApp and ClientApp logic in one process
   (`simulations/inprocess.py`, every merchant of the data in turn, DP-SGD unless `--no-dp`) with the first of
   `--adapter-layers`; per round, from the coordinator's record: wall time, the nodes' training time (summed: one
   machine trains them one after the other), the aggregation, and the rest (evaluation on every node, messages,
   serialisation, bookkeeping).
Prints one table and writes `<out>/communication.json` with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fedcvr.shared import flower_app
from fedcvr.simulations.benchmarks.common import command, machine, print_table, write_result
from fedcvr.simulations.benchmarks.dp_overhead import default_data

TARGET = 0.02


def update_sizes(adapter_layers: int, encoder: str) -> dict[str, Any]:
    """Bytes of one update (trainable weights) and of the whole encoder, both as Flower ArrayRecords."""
    from flwr.app import ArrayRecord

    from fedcvr.shared.model.config import ModelConfig
    from fedcvr.shared.model.esmm import initial_model
    from fedcvr.shared.model.weights import trainable_state

    model, backbone = initial_model(ModelConfig.defaults(encoder=encoder, adapter_layers=adapter_layers), 0)
    update = ArrayRecord(trainable_state(model))  # exactly what a node's reply carries
    encoder_record = ArrayRecord(backbone.model.state_dict())
    return {"adapter_layers": adapter_layers, "update_bytes": update.count_bytes(),
            "update_parameters": int(sum(v.numel() for v in trainable_state(model).values())),
            "encoder_bytes": encoder_record.count_bytes(),
            "encoder_parameters": int(sum(p.numel() for p in backbone.model.parameters())),
            "ratio": update.count_bytes() / encoder_record.count_bytes()}


def round_times(data: Path, rounds: int, adapter_layers: int, dp: bool, encoder: str) -> dict[str, Any]:
    """Run `rounds` rounds in process; per round: seconds, client training, aggregation, the rest."""
    import logging

    from fedcvr.shared.data.loader import merchant_folders
    from fedcvr.simulations.inprocess import run_federation

    folders = merchant_folders(data)
    with tempfile.TemporaryDirectory() as out:
        run_config = flower_app.defaults_with("", **{
            "data-root": str(data), "out-dir": out, "num-server-rounds": rounds, "min-nodes": len(folders),
            "adapter.layers": adapter_layers, "dp.enabled": dp, "model.encoder": encoder})
        logging.getLogger("flwr").setLevel(logging.WARNING)
        started = time.perf_counter()
        run_federation(run_config, len(folders))
        total = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(out) / "rounds.jsonl").read_text().splitlines()]
    per_round = []
    for r in records:
        train, aggregate = float(r.get("client-train-seconds", 0.0)), float(r.get("aggregate-seconds", 0.0))
        per_round.append({"round": r["round"], "seconds": r["seconds"], "client_train_s": train,
                          "client_train_max_s": float(r.get("client-train-seconds-max", 0.0)),
                          "aggregate_s": aggregate, "rest_s": r["seconds"] - train - aggregate,
                          "bytes_sent": r["bytes-sent"], "bytes_received": r["bytes-received"]})
    return {"merchants": len(folders), "rounds": rounds, "adapter_layers": adapter_layers, "dp": dp,
            "run_seconds": total, "per_round": per_round,
            "median": {key: statistics.median(p[key] for p in per_round)
                       for key in ("seconds", "client_train_s", "aggregate_s", "rest_s")}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="marketplace folder (default: the synthetic one)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--adapter-layers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--no-dp", action="store_true", help="rounds without DP-SGD")
    parser.add_argument("--encoder", default="", help="model.encoder (default: the packaged MiniLM)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out.resolve()
    data = args.data.resolve() if args.data else default_data(out)
    sizes = [update_sizes(layers, args.encoder) for layers in args.adapter_layers]
    rounds = round_times(data, args.rounds, args.adapter_layers[0], not args.no_dp, args.encoder)
    result = {"command": command("fedcvr.simulations.benchmarks.communication", argv), "machine": machine(),
              "target_ratio": TARGET, "update_sizes": sizes, "round_times": rounds}
    path = write_result(out / "communication.json", result)
    rows = []
    for size in sizes:
        rows.append((f"update, adapter.layers = {size['adapter_layers']}",
                     f"{size['update_bytes']:,} bytes ({size['update_parameters']:,} weights) = "
                     f"{size['ratio'] * 100:.2f} % of the encoder's {size['encoder_bytes']:,} bytes "
                     f"(target <= {TARGET * 100:.0f} %)"))
    median = rounds["median"]
    rows += [
        (f"round, {rounds['merchants']} merchants, {'DP' if rounds['dp'] else 'no DP'}, adapter.layers = "
         f"{rounds['adapter_layers']} (median of {rounds['rounds']})", f"{median['seconds']:.1f} s"),
        ("  nodes' training (summed)", f"{median['client_train_s']:.1f} s "
                                      f"({median['client_train_s'] / median['seconds'] * 100:.0f} %)"),
        ("  aggregation", f"{median['aggregate_s'] * 1000:.1f} ms"),
        ("  the rest (evaluation, messages, bookkeeping)", f"{median['rest_s']:.1f} s "
                                                           f"({median['rest_s'] / median['seconds'] * 100:.0f} %)"),
    ]
    print_table(rows)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
