"""DP overhead benchmark: seconds per training step with Opacus DP-SGD divided by seconds per step without DP,
same model, same batches, measured side by side in one run.

    python -m fedcvr.simulations.benchmarks.dp_overhead [--data DIR] [--merchant merchant-03] [--adapter-layers 1]
        [--batch-size 1024] [--steps 10] [--out runs/bench]

1. One merchant of a marketplace folder (default: the default synthetic marketplace, generated into `--out`), set
   up as a merchant node sets itself up (`MerchantNode`): the app's default model with `--adapter-layers` adapted
   BERT layers (1 = adapters in the top layer, the frozen layers below from the prefix cache) and its training split.
2. Copies of the same initial model: one trains as rounds without DP do (`shared.training.loop.train_step`:
   each distinct item of the batch encoded once), the others as DP rounds do (`shared.training.local.private_step`:
   Opacus, clipping each example's gradient to `dp.max-grad-norm`, Gaussian noise), one per
   `dp.grad-sample-mode`: "hooks" (per-sample gradients computed and stored) and "ghost" (ghost clipping: per-sample
   norms from activations and backprops, then a second, re-weighted backward pass), and one more that runs the DP
   path's model without DP ("per-example": each example encodes its own target and history items, as Opacus needs
   every input to start with the example, instead of each distinct item once): it splits the overhead into what
   encoding per example costs and what clipping and noise cost. All with SGD + momentum 0.9.
3. The same `--steps` batches of `--batch-size` random training examples go through each, alternating step by
   step (non-DP, per-example, hooks, ghost, non-DP, ...) after `--warmup` steps, so all see the same machine load.
Prints the median seconds per step of each and the ratios to the plain step (target: at most 2.0) and writes
`<out>/dp_overhead.json` with the machine's description.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedcvr.shared import flower_app
from fedcvr.simulations.benchmarks.common import command, machine, print_table, write_result

TARGET = 2.0
PER_EXAMPLE = "per-example"  # the step of the DP path's model (each example encodes its own items) without DP


def default_data(out: Path) -> Path:
    """The default synthetic marketplace (`fedcvr data synth --seed 0`), generated once into `out`."""
    from fedcvr.simulations.synth import SynthConfig, generate_marketplace

    root = out / "data-default"
    if not (root / "marketplace.json").is_file():
        generate_marketplace(SynthConfig(seed=0), root)
    return root


def node_for(folder: Path, adapter_layers: int, batch_size: int, encoder: str, threads: int, device: str = "cpu"):
    from fedcvr.client.node import MerchantNode, NodeSettings

    overrides: dict[str, Any] = {"adapter.layers": adapter_layers, "train.batch-size": batch_size,
                                 "model.encoder": encoder, "train.device": device}
    if threads:
        overrides["train.threads"] = threads
    return MerchantNode(folder, NodeSettings.from_run_config(flower_app.defaults_with("", **overrides)))


def measure(node, steps: int, warmup: int, batch_size: int, modes: tuple[str, ...] = ("hooks", "ghost"),
            seed: int = 0) -> dict[str, Any]:
    """Alternate a plain step and a DP step in each of `modes` (`dp.grad-sample-mode`) over the same batches;
    seconds of each step, medians and ratios to the plain step."""
    import dataclasses

    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fedcvr.shared.training.local import EsmmCriterion, PerSampleModel, make_private, private_step
    from fedcvr.shared.training.loop import train_step

    data, side, device = node.prepared.splits["train"], node.side, node.device
    if len(data) < batch_size:
        raise SystemExit(f"the merchant has {len(data)} training examples, fewer than --batch-size {batch_size}: "
                         "pick a larger merchant (--merchant) or a smaller batch")
    plain_model = node.model
    plain_model.train()
    plain_opt = torch.optim.SGD(plain_model.trainable_parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(TensorDataset(torch.arange(len(data))), batch_size=batch_size)
    # the DP step's own computation without DP: each example encodes its own items (as Opacus needs), no clipping
    per_example_model = copy.deepcopy(node.model)
    per_example_model.train()
    per_example = (PerSampleModel(per_example_model).to(device), per_example_model,
                   torch.optim.SGD(per_example_model.trainable_parameters(), lr=0.01, momentum=0.9), EsmmCriterion())
    private = {}
    for mode in modes:
        model = copy.deepcopy(node.model)  # each with its own Opacus hooks
        model.train()
        dp = dataclasses.replace(node.settings.dp, grad_sample_mode=mode)
        optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.01, momentum=0.9)
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        wrapped, optimizer, criterion, _ = make_private(engine, PerSampleModel(model).to(device), optimizer, loader,
                                                        noise=1.0, dp=dp)
        private[mode] = (wrapped, model, optimizer, criterion)
    rng = np.random.default_rng(seed)
    seconds: dict[str, list[float]] = {"plain": [], PER_EXAMPLE: [], **{mode: [] for mode in modes}}

    def done() -> float:  # a GPU runs asynchronously: a step has taken its time once its kernels have finished
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    for step in range(warmup + steps):
        rows = np.sort(rng.choice(len(data), size=batch_size, replace=False))
        start = done()
        train_step(plain_model, side, data, rows, plain_opt, device)
        taken = {"plain": done() - start}
        for mode, (wrapped, model, optimizer, criterion) in [(PER_EXAMPLE, per_example), *private.items()]:
            start = done()
            private_step(wrapped, model, side, data, rows, optimizer, criterion, device)
            taken[mode] = done() - start
        if step >= warmup:
            for name, value in taken.items():
                seconds[name].append(value)
    for wrapped, *_ in private.values():
        wrapped._close()
    plain = statistics.median(seconds["plain"])
    return {"seconds": seconds, "median_s": {name: statistics.median(v) for name, v in seconds.items()},
            "ratio_of_medians": {mode: statistics.median(seconds[mode]) / plain for mode in modes},
            "ratio_to_per_example": {mode: statistics.median(seconds[mode]) / statistics.median(seconds[PER_EXAMPLE])
                                     for mode in modes},
            "ratio_per_step_median": {mode: statistics.median(d / p for d, p in zip(seconds[mode], seconds["plain"],
                                                                                   strict=True)) for mode in modes},
            "trainable_parameters": int(sum(p.numel() for p in node.model.trainable_parameters()))}


def step_arguments(description: str) -> argparse.ArgumentParser:
    """The options of the benchmarks that time training steps on one merchant (this one and `gpu.py`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=None, help="marketplace folder (default: the synthetic one)")
    parser.add_argument("--merchant", default="merchant-03")
    parser.add_argument("--adapter-layers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--encoder", default="", help="model.encoder (default: the packaged MiniLM)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = step_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: the node's default)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out.resolve()
    root = args.data.resolve() if args.data else default_data(out)
    folder = root / args.merchant
    if not folder.is_dir():
        raise SystemExit(f"--merchant {args.merchant}: {folder} does not exist; the merchants of {root} are "
                         f"{', '.join(sorted(p.name for p in root.iterdir() if p.is_dir()))}")
    start = time.perf_counter()
    node = node_for(folder, args.adapter_layers, args.batch_size, args.encoder, args.threads)
    setup_s = time.perf_counter() - start
    figures = measure(node, args.steps, args.warmup, args.batch_size)
    result = {"command": command("fedcvr.simulations.benchmarks.dp_overhead", argv), "machine": machine(),
              "merchant": args.merchant, "training_examples": len(node.prepared.splits["train"]),
              "adapter_layers": args.adapter_layers, "batch_size": args.batch_size, "steps": args.steps,
              "setup_s": setup_s, "target": TARGET, **figures}
    path = write_result(out / "dp_overhead.json", result)
    default = node.settings.dp.grad_sample_mode
    rows = [("model", f"adapter.layers = {args.adapter_layers}, {figures['trainable_parameters']:,} trainable "
                      f"parameters, batch {args.batch_size}, {args.merchant} ({result['training_examples']:,} "
                      "training examples)"),
            ("step without DP (median)", f"{figures['median_s']['plain'] * 1000:.0f} ms"),
            ("same, each example encoding its own items as DP needs (median)",
             f"{figures['median_s'][PER_EXAMPLE] * 1000:.0f} ms")]
    for mode, ratio in figures["ratio_of_medians"].items():
        label = f"DP-SGD, dp.grad-sample-mode = {mode}{' (default)' if mode == default else ''}"
        rows.append((f"{label} (median)", f"{figures['median_s'][mode] * 1000:.0f} ms"))
        rows.append((f"  DP overhead (ratio of medians; target <= {TARGET})", f"{ratio:.2f}"))
        rows.append(("  of which clipping and noise (DP step / per-example step)",
                     f"{figures['ratio_to_per_example'][mode]:.2f}"))
    print_table(rows)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
