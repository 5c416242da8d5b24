"""FedAvg in one process, without Flower: for sweeping training and DP settings quickly.

Each merchant is a `MerchantNode` (the same local training, DP-SGD and privacy ledger as a real node); a round
trains every merchant from the global weights and averages the results weighted by examples, as Flower's FedAvg
does. Prints the test CTCVR AUC of the global model (every round with --every-round, else after the last).

    python -m fedcvr.simulations.fedavg_inprocess --data data/demo --rounds 5 \\
        --run-config "dp.max-grad-norm=0.3 model.ctr-prior=0.0474 model.cvr-prior=0.2689"
"""

from __future__ import annotations

import argparse
import json
import time

from flwr.app import RecordDict

from fedcvr.client.node import MerchantNode, NodeSettings
from fedcvr.shared.data.loader import merchant_folders
from fedcvr.shared.metrics import merge_evaluations
from fedcvr.simulations import launcher
from fedcvr.simulations.local_only import initial_weights


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo", help="marketplace folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run-config", default="", help='overrides, "key=value ..." with TOML values')
    parser.add_argument("--every-round", action="store_true", help="evaluate on the test splits after every round")
    args = parser.parse_args(argv)
    run_config = launcher.defaults_with(args.run_config, **{"num-server-rounds": args.rounds})
    settings = NodeSettings.from_run_config(run_config)
    nodes = [MerchantNode(folder, settings) for folder in merchant_folders(args.data)]
    states = [RecordDict() for _ in nodes]
    weights = initial_weights(run_config)
    started = time.perf_counter()
    result: dict = {}
    for server_round in range(1, args.rounds + 1):
        trained = []
        epsilon = 0.0
        for node, state in zip(nodes, states):
            new, report, _ = node.train(weights, state, server_round)
            if new is not None:
                trained.append((new, int(report["num-examples"])))
            epsilon = max(epsilon, float(report.get("epsilon", 0.0)))
        total = sum(n for _, n in trained)
        weights = {k: sum(w[k] * n for w, n in trained) / total for k in weights}
        if args.every_round or server_round == args.rounds:
            test = merge_evaluations([node.evaluate(weights, "test") for node in nodes])
            result = {"round": server_round, "ctcvr.auc": test["ctcvr.auc"], "click.auc": test["click.auc"],
                      "max-epsilon": epsilon if run_config.get("dp.enabled") else None,
                      "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
