"""Where a fresh ClientApp process spends its time before it can train: what each message of a deployed node pays
(Flower starts one process per message). Run it in a fresh process, as a node does:

    python -m fedcvr.simulations.benchmarks.cold_start --merchant data/demo/merchant-01 [--out runs/bench]

Each step in the order a training message takes them: importing the ClientApp, the rest of the node's code (torch,
pandas, the model), the backbone, the merchant's folder, its examples, the catalog's prefix states (from the cache
when it is warm). With frozen embeddings and a warm cache the backbone's weights are never read.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = last = time.perf_counter()
    heavy_before = [m for m in ("torch", "transformers", "opacus", "pandas") if m in sys.modules]
    steps: list[tuple[str, float]] = []

    def step(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        steps.append((name, now - last))
        last = now

    import fedcvr.client.app  # noqa: F401

    step("import the ClientApp")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--merchant", type=Path, required=True, help="One merchant folder")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    from fedcvr.client.node import NodeSettings
    from fedcvr.shared import flower_app
    from fedcvr.shared.data.loader import load_merchant
    from fedcvr.shared.model.encoder import load_backbone
    from fedcvr.shared.model.prefix_cache import PrefixCache
    from fedcvr.shared.training.prepare import prepare

    step("import the node's code")
    settings = NodeSettings.from_run_config(flower_app.declared_defaults())
    backbone = load_backbone(settings.model.encoder)
    step("the backbone")
    data = load_merchant(args.merchant)
    step("load the merchant's folder")
    prepared = prepare([data], settings.examples)
    step("prepare its examples")
    PrefixCache(backbone, settings.model.adapter_layers, settings.model.max_text_tokens).states(
        prepared.catalog.texts)
    step("the catalog's prefix states")
    total = time.perf_counter() - started
    from fedcvr.simulations.benchmarks.common import command, machine, print_table, write_result

    print_table([(name, f"{seconds:6.2f} s") for name, seconds in steps] + [("total", f"{total:6.2f} s")])
    result = {"benchmark": "cold_start", "command": command("fedcvr.simulations.benchmarks.cold_start", argv),
              "machine": machine(), "merchant": str(args.merchant), "steps": dict(steps), "total_s": total,
              "backbone_weights_loaded": backbone.loaded, "already_imported": heavy_before}
    write_result(args.out / "cold_start.json", result)
    return result


if __name__ == "__main__":
    main()
