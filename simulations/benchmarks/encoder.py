"""Item encoder benchmark: catalog encoding throughput against sentence-transformers on the same MiniLM, and
re-encoding the catalog after an adapter update with the frozen-prefix cache against a full forward pass.

    python -m fedcvr.simulations.benchmarks.encoder [--data DIR] [--items 4000] [--repeats 2] [--out runs/bench]

Texts: the item texts (title. description. brand. category) of the marketplace's catalogs (default: the
synthetic one), the first `--items`. Same model, same token limit (`model.max-text-tokens`), same batch size
(the cache's 64), on the same threads; each measurement is repeated `--repeats` times, alternating, and the best
of each kept (so a busy moment hurts neither side more).
1. Throughput, items per second from text to embedding: fedcvr's catalog encoder from cold (`PrefixCache.states`
   into an empty cache folder, i.e. tokenise, run the backbone, store the float16 states, then `embed_catalog`
   with `adapter.layers = 0`) against sentence-transformers' `SentenceTransformer.encode` of the same folder.
   Target: ratio at least 1.0.
2. Re-encoding after an adapter update (`adapter.layers = 1`, adapter weights changed): `embed_catalog` over the
   cached states against the full forward pass (`PrefixCache.compute` = tokenise + the backbone's layers, then
   the adapter, pooling and projection). Target: at least 3x faster.
Prints one table and writes `<out>/encoder.json` with the machine's description.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcvr.simulations.benchmarks.common import command, machine, print_table, write_result
from fedcvr.simulations.benchmarks.dp_overhead import default_data

THROUGHPUT_TARGET = 1.0
REENCODE_TARGET = 3.0


def catalog_texts(root: Path, items: int) -> list[str]:
    """The first `items` distinct item texts of the marketplace's catalogs, as the encoder sees them."""
    import pandas as pd

    from fedcvr.shared.data.loader import merchant_folders
    from fedcvr.shared.training.data import Catalog

    frames = [pd.read_parquet(folder / "items.parquet") for folder in merchant_folders(root)]
    return list(dict.fromkeys(Catalog.from_items(frames).texts))[:items]


def best_of(repeats: int, *runs: Callable[[], Any]) -> list[float]:
    """Seconds of each of `runs`, the best of `repeats` alternating passes."""
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for k, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="marketplace folder (default: the synthetic one)")
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--encoder", default="", help="model.encoder (default: the packaged MiniLM)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise SystemExit("the encoder benchmark compares with sentence-transformers: pip install "
                         "sentence-transformers (or pip install -e '.[bench]')") from None
    from fedcvr.shared.model.config import ModelConfig
    from fedcvr.shared.model.encoder import load_backbone, resolve_encoder_path
    from fedcvr.shared.model.esmm import ConversionModel
    from fedcvr.shared.model.prefix_cache import ENCODE_BATCH, PrefixCache
    from fedcvr.shared.training.loop import ItemSide, embed_catalog

    out = args.out.resolve()
    root = args.data.resolve() if args.data else default_data(out)
    texts = catalog_texts(root, args.items)
    numeric = torch.zeros(len(texts), 2)
    backbone = load_backbone(args.encoder)
    tokens = ModelConfig.defaults().max_text_tokens
    reference = SentenceTransformer(str(resolve_encoder_path(args.encoder)), device="cpu")
    reference.max_seq_length = tokens

    frozen = ConversionModel(backbone, ModelConfig.defaults(encoder=args.encoder, adapter_layers=0)).eval()

    def ours_cold() -> None:
        with tempfile.TemporaryDirectory() as folder:
            side = ItemSide(PrefixCache(backbone, 0, tokens, Path(folder)).states(texts), numeric)
            embed_catalog(frozen, side, torch.device("cpu"))

    def theirs() -> None:
        reference.encode(texts, batch_size=ENCODE_BATCH, convert_to_numpy=True)

    ours_s, theirs_s = best_of(args.repeats, ours_cold, theirs)

    adapted = ConversionModel(backbone, ModelConfig.defaults(encoder=args.encoder, adapter_layers=1)).eval()
    with torch.no_grad():  # an adapter update: the adapter is no longer the identity
        for layer in adapted.item_encoder.layers:
            layer.adapter.up.weight.normal_(std=0.02)
    with tempfile.TemporaryDirectory() as folder:
        cache = PrefixCache(backbone, 1, tokens, Path(folder))
        side = ItemSide(cache.states(texts), numeric)

        def cached() -> torch.Tensor:
            return embed_catalog(adapted, side, torch.device("cpu"))

        def full() -> torch.Tensor:
            states, lengths = cache.compute(texts)
            fresh = ItemSide(type(side.prefix)(torch.from_numpy(states), torch.from_numpy(lengths.astype(np.int64))),
                             numeric)
            return embed_catalog(adapted, fresh, torch.device("cpu"))

        cached_s, full_s = best_of(args.repeats, cached, full)
        # the speed-up counts only if the cached path gives the same embeddings as running every layer
        difference = float((cached() - full()).abs().max())
    result = {"command": command("fedcvr.simulations.benchmarks.encoder", argv), "machine": machine(),
              "items": len(texts), "max_text_tokens": tokens, "batch_size": ENCODE_BATCH,
              "throughput": {"fedcvr_items_per_s": len(texts) / ours_s,
                             "sentence_transformers_items_per_s": len(texts) / theirs_s,
                             "ratio": theirs_s / ours_s, "target": THROUGHPUT_TARGET},
              "reencode": {"cached_s": cached_s, "full_forward_s": full_s, "speedup": full_s / cached_s,
                           "max_embedding_difference": difference, "target": REENCODE_TARGET}}
    path = write_result(out / "encoder.json", result)
    t, r = result["throughput"], result["reencode"]
    print_table([
        ("texts", f"{len(texts):,} item texts, {tokens} tokens at most, batch {ENCODE_BATCH}"),
        ("fedcvr catalog encoder, from text", f"{t['fedcvr_items_per_s']:.0f} items/s"),
        ("sentence-transformers encode", f"{t['sentence_transformers_items_per_s']:.0f} items/s"),
        (f"  ratio (target >= {THROUGHPUT_TARGET})", f"{t['ratio']:.2f}"),
        ("re-encode after an adapter update, cached prefix", f"{cached_s:.2f} s"),
        ("re-encode with a full forward pass", f"{full_s:.2f} s"),
        (f"  speedup (target >= {REENCODE_TARGET:g}x)", f"{r['speedup']:.1f}x"),
    ])
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
