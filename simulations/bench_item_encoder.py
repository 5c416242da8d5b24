"""Benchmark: training step time of the conversion model with three ways of encoding items.

  cached-prefix   adapters in the top `adapter.layers` layers; the frozen layers below come from the prefix cache
  no-cache        the same model, but every step runs the frozen layers too (tokenise + embeddings + frozen layers)
  frozen          adapter.layers = 0: cached mean-pooled embeddings, nothing inside BERT trains

Each step = forward + ESMM loss + backward + Adam step on one batch of real examples of the default synthetic
marketplace (batches hold one merchant's examples, as in training). Prints seconds per step (median of the
measured steps) and the ratios to the cached-prefix path.

    python -m fedcvr.simulations.bench_item_encoder --data data/demo [--steps 10] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedcvr.shared.data.examples import ExampleConfig
from fedcvr.shared.data.loader import load_merchant, merchant_folders
from fedcvr.shared.model.config import ModelConfig
from fedcvr.shared.model.encoder import load_backbone
from fedcvr.shared.model.esmm import ConversionModel, esmm_loss
from fedcvr.shared.model.prefix_cache import PrefixCache, PrefixStates
from fedcvr.shared.training.data import batch_rows, make_batch
from fedcvr.shared.training.loop import ItemSide
from fedcvr.simulations.central import prepare


def time_steps(model: ConversionModel, encode, data, batch_size: int, steps: int,
               warmup: int = 2) -> tuple[float, float]:
    """Median seconds per training step and mean distinct items per batch."""
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    times, unique = [], []
    for k, rows in enumerate(batch_rows(data, batch_size, rng)):
        if k >= warmup + steps:
            break
        start = time.perf_counter()
        batch = make_batch(data, rows)
        items = encode(batch.items)
        ctr, cvr, _ = model.score(items, batch.inputs)
        loss = esmm_loss(ctr, cvr, batch.clicked, batch.purchased)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if k >= warmup:
            times.append(time.perf_counter() - start)
            unique.append(len(batch.items))
    return statistics.median(times), float(np.mean(unique))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--adapter-layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = load_backbone("")
    merchants = [load_merchant(f) for f in merchant_folders(args.data)]
    prepared = prepare(merchants, ExampleConfig())
    train = prepared.splits["train"]
    numeric = torch.from_numpy(prepared.catalog.numeric)
    texts = prepared.catalog.texts
    config = ModelConfig(adapter_layers=args.adapter_layers)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        cache = PrefixCache(backbone, args.adapter_layers, config.max_text_tokens, Path(root))
        started = time.perf_counter()
        side = ItemSide(cache.states(texts), numeric)
        fill = time.perf_counter() - started
        model = ConversionModel(backbone, config)
        results["cached-prefix"] = time_steps(model, lambda items: side.encode(model, items, "cpu"), train,
                                              args.batch_size, args.steps)

        def encode_without_cache(items: torch.Tensor) -> torch.Tensor:
            states, lengths = cache.compute([texts[i] for i in items.tolist()])
            fresh = PrefixStates(torch.from_numpy(states), torch.from_numpy(lengths.astype(np.int64)))
            s, m = fresh.gather(torch.arange(len(items)))
            return model.encode_items(s, m, numeric[items])

        model = ConversionModel(backbone, config)
        results["no-cache"] = time_steps(model, encode_without_cache, train, args.batch_size, args.steps)
        frozen_cache = PrefixCache(backbone, 0, config.max_text_tokens, Path(root))
        frozen_side = ItemSide(frozen_cache.states(texts), numeric)
        frozen = ConversionModel(backbone, ModelConfig(adapter_layers=0))
        results["frozen"] = time_steps(frozen, lambda items: frozen_side.encode(frozen, items, "cpu"), train,
                                       args.batch_size, args.steps)
    base = results["cached-prefix"][0]
    print(f"items {len(texts):,}; batch {args.batch_size}; adapter.layers {args.adapter_layers}; "
          f"threads {args.threads}; filling the prefix cache took {fill:.1f} s")
    print(f"{'path':<15}{'s/step':>10}{'items/batch':>13}{'vs cached-prefix':>19}")
    for name, (seconds, unique) in results.items():
        print(f"{name:<15}{seconds:>10.3f}{unique:>13.0f}{seconds / base:>18.2f}x")


if __name__ == "__main__":
    main()
