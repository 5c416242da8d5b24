"""Full-catalog ranking benchmark: shopper x candidate pairs scored per second by `ConversionModel.score_candidates`
(each shopper's history encoded once, the candidates scored together) against scoring every pair as its own example
with `ConversionModel.score` (the history repeated once per candidate), measured side by side in one run.

    python -m fedcvr.simulations.benchmarks.ranking [--catalog 2048] [--shoppers 8] [--repeats 5] [--out runs/bench]

The model has the app's default sizes (`ModelConfig.defaults()`: dim 64, attention and head hidden 64, history 30); item
embeddings are random (ranking cost does not depend on the encoder, whose embeddings are computed once per
catalog). Both paths must give the same scores (checked). Prints one table and writes `<out>/ranking.json` with the
machine's description.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fedcvr.simulations.benchmarks.common import command, machine, print_table, write_result


def measure(catalog: int, shoppers: int, repeats: int, history: int = 30, encoder: str | None = None,
            **model_overrides: Any) -> dict[str, Any]:
    """Seconds per batch of `shoppers` x `catalog` pairs for both paths (median of `repeats`), pairs per second and
    their ratio, and the largest score difference."""
    import statistics

    import torch

    from fedcvr.shared.data.signals import N_SIGNALS
    from fedcvr.shared.model.config import ModelConfig
    from fedcvr.shared.model.encoder import load_backbone
    from fedcvr.shared.model.esmm import ConversionModel, ScoreInputs

    config = ModelConfig.defaults(**({"encoder": encoder} if encoder else {}), **model_overrides)
    torch.manual_seed(0)
    model = ConversionModel(load_backbone(config.encoder), config).eval()
    generator = torch.Generator().manual_seed(0)
    items = torch.randn(catalog, config.dim, generator=generator)
    mask = torch.rand(shoppers, history, generator=generator) > 0.3
    batch = ScoreInputs(target=torch.zeros(shoppers, dtype=torch.long),
                        history=torch.randint(0, catalog, (shoppers, history), generator=generator),
                        history_mask=mask, events=torch.randint(0, 4, (shoppers, history), generator=generator),
                        age_hours=torch.rand(shoppers, history, generator=generator) * 500,
                        position=torch.zeros(shoppers, dtype=torch.long),
                        signals=torch.zeros(shoppers, N_SIGNALS))
    candidates = torch.arange(catalog)
    signals = torch.rand(shoppers, catalog, N_SIGNALS, generator=generator)
    pairs = batch.paired_with(candidates, signals)

    def per_pair() -> torch.Tensor:
        ctr, cvr, _ = model.score(items, pairs)
        return (torch.sigmoid(ctr) * torch.sigmoid(cvr)).view(shoppers, catalog)

    def together() -> torch.Tensor:
        return model.score_candidates(items, batch, candidates, signals)

    times: dict[str, list[float]] = {"per_pair": [], "together": []}
    with torch.no_grad():
        difference = float((per_pair() - together()).abs().max())  # also the warm-up
        for _ in range(repeats):  # interleaved, so that a busy moment hits both
            for name, run in (("per_pair", per_pair), ("together", together)):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    pairs_per_second = {name: shoppers * catalog / s for name, s in seconds.items()}
    return {"catalog": catalog, "shoppers": shoppers, "history": history, "repeats": repeats,
            "dim": config.dim, "attention_hidden": config.attention_hidden, "head_hidden": config.head_hidden,
            "seconds_per_batch": seconds, "pairs_per_second": pairs_per_second,
            "speedup": pairs_per_second["together"] / pairs_per_second["per_pair"],
            "max_score_difference": difference}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m fedcvr.simulations.benchmarks.ranking",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", type=int, default=2048, help="candidates per shopper (a merchant's catalog)")
    parser.add_argument("--shoppers", type=int, default=8, help="shoppers ranked at once")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per path")
    parser.add_argument("--encoder", default=None, help="local BERT folder (default: the packaged encoder)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    result = measure(args.catalog, args.shoppers, args.repeats, encoder=args.encoder)
    result["machine"] = machine()
    result["command"] = command("fedcvr.simulations.benchmarks.ranking", argv)
    per_second = result["pairs_per_second"]
    print_table([
        ("pairs per batch", f"{args.shoppers} shoppers x {args.catalog} candidates"),
        ("each pair alone (score)", f"{per_second['per_pair']:,.0f} pairs/s"),
        ("together (score_candidates)", f"{per_second['together']:,.0f} pairs/s"),
        ("speed-up", f"{result['speedup']:.1f}x"),
        ("largest score difference", f"{result['max_score_difference']:.1e}"),
    ])
    print(f"written: {write_result(args.out / 'ranking.json', result)}")
    return result


if __name__ == "__main__":
    main()
