"""Training throughput: examples per second of a centralised epoch and of a DP-SGD epoch on one data set (the
Online Retail import by default), with and without negative sub-sampling (`train.negative-rate`).

    python -m fedcvr.simulations.benchmarks.training_throughput \\
        --data online-retail:../shared/data/online-retail/online_retail.parquet [--rates 1 0.25] \\
        [--dp-rate 0.25] [--dp-steps 40] [--out runs/bench-training]

1. The data: `online-retail:FILE` is imported once into `<out>/online-retail` (`fedcvr data import
   online-retail`), a folder is read as it is; every merchant's examples pooled, as `fedcvr train-central`
   prepares them (`examples.test-from` 2011-11-01 for Online Retail, as its reference experiment); the time to
   prepare them is reported.
2. The app's default model (frozen MiniLM embeddings from the prefix cache, kept in `<out>`), `train.threads`
   CPU threads (all this process may use), Adam at `train.lr`, batches of `train.batch-size`.
3. For each `--rates` r: one whole epoch over the training split with each negative kept with probability r (1 =
   every example), exactly the epoch `fedcvr train-central` runs (`shared.training.loop.train_epoch`): seconds,
   examples trained, examples per second.
4. DP-SGD: `--dp-steps` steps of a node's DP round (`shared.training.local.train_round`'s step: Opacus, the
   app's `dp.*`, Poisson batches over the examples kept at `--dp-rate`) timed after 2 warm-up steps; examples per
   second, and the epoch's time projected from them (an epoch is len / batch-size steps; with `--dp-steps 0` a
   whole DP epoch is run and timed instead).
Prints one table and writes `<out>/training_throughput.json` with the machine's description.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedcvr.simulations.benchmarks.common import command, machine, print_table, write_result

OR_TEST_FROM = "2011-11-01"


def data_folder(spec: str, out: Path) -> tuple[Path, str | None]:
    """(marketplace folder, examples.test-from) of `--data`."""
    if spec.startswith("online-retail:"):
        folder = out / "online-retail"
        if not (folder / "marketplace.json").is_file() and not any(folder.glob("*/items.parquet")):
            from fedcvr.shared.data.importers.online_retail import import_online_retail

            import_online_retail(spec.split(":", 1)[1], folder, show_progress=True)
        return folder, OR_TEST_FROM
    return Path(spec), None


def setup(folder: Path, test_from: str | None, out: Path, encoder: str = "") -> dict[str, Any]:
    import torch

    from fedcvr.shared import flower_app
    from fedcvr.shared.data.examples import ExampleConfig
    from fedcvr.shared.data.loader import load_merchant
    from fedcvr.shared.model.config import ModelConfig, TrainConfig
    from fedcvr.shared.model.encoder import load_backbone
    from fedcvr.shared.model.prefix_cache import PrefixCache
    from fedcvr.shared.training.loop import ItemSide, resolve_device
    from fedcvr.shared.training.prepare import prepare, select_merchants

    run_config = dict(flower_app.declared_defaults())  # a copy: the declared defaults are cached
    if encoder:
        run_config["model.encoder"] = encoder
    if test_from:
        run_config["examples.test-from"] = test_from
    model_config, train_config = ModelConfig.from_run_config(run_config), TrainConfig.from_run_config(run_config)
    device = resolve_device(train_config.device, train_config.threads)
    started = time.perf_counter()
    merchants = [load_merchant(f) for f in select_merchants(folder, None)]
    prepared = prepare(merchants, ExampleConfig.from_run_config(run_config))
    prepare_s = time.perf_counter() - started
    backbone = load_backbone(model_config.encoder)
    cache = PrefixCache(backbone, model_config.adapter_layers, model_config.max_text_tokens, out / "prefix-cache")
    side = ItemSide(cache.states(prepared.catalog.texts), torch.from_numpy(prepared.catalog.numeric),
                    prepared.catalog.item_ids)
    return {"run_config": run_config, "model_config": model_config, "train_config": train_config,
            "backbone": backbone, "side": side, "train": prepared.splits["train"], "device": device,
            "prepare_s": prepare_s, "merchants": len(merchants), "catalog": len(prepared.catalog),
            "threads": torch.get_num_threads()}


def epoch(s: dict[str, Any], rate: float, seed: int = 0) -> dict[str, Any]:
    import torch

    from fedcvr.shared.model.esmm import ConversionModel
    from fedcvr.shared.training.data import subsample_negatives
    from fedcvr.shared.training.loop import train_epoch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ConversionModel(s["backbone"], s["model_config"]).to(s["device"])
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=s["train_config"].lr)
    started = time.perf_counter()
    data = subsample_negatives(s["train"], rate, rng)
    loss = train_epoch(model, s["side"], data, optimizer, s["train_config"].batch_size, rng, s["device"])
    seconds = time.perf_counter() - started
    return {"rate": rate, "examples": len(data), "seconds": seconds, "examples_per_s": len(data) / seconds,
            "loss": loss}


def dp_epoch(s: dict[str, Any], rate: float, steps: int, seed: int = 0) -> dict[str, Any]:
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fedcvr.shared.dp_config import DPConfig
    from fedcvr.shared.model.esmm import ConversionModel
    from fedcvr.shared.training.data import subsample_negatives
    from fedcvr.shared.training.local import PerSampleModel, make_private, private_step

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dp = DPConfig.from_run_config(s["run_config"])
    data = subsample_negatives(s["train"], rate, rng)
    batch = s["train_config"].batch_size
    model = ConversionModel(s["backbone"], s["model_config"]).to(s["device"])
    private = PerSampleModel(model).to(s["device"])
    lr = dp.lr or s["train_config"].lr  # as a node picks it (`NodeSettings.lr`); the noise's size costs no time
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=lr, momentum=0.9) if dp.optimizer == "sgd" else \
        torch.optim.Adam(model.trainable_parameters(), lr=lr)
    loader = DataLoader(TensorDataset(torch.arange(len(data))), batch_size=batch,
                        generator=torch.Generator().manual_seed(seed))
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    private, optimizer, criterion, loader = make_private(engine, private, optimizer, loader, noise=1.0, dp=dp)
    epoch_steps = math.ceil(len(data) / batch)
    limit = epoch_steps if steps <= 0 else min(steps + 2, epoch_steps)
    seen, timed_s, timed_examples = 0, 0.0, 0
    started = time.perf_counter()
    for taken, (rows,) in enumerate(loader):
        if taken >= limit:
            break
        step_started = time.perf_counter()
        if len(rows):
            private_step(private, model, s["side"], data, rows.numpy(), optimizer, criterion, s["device"])
        if taken >= 2 or steps <= 0:
            timed_s += time.perf_counter() - step_started
            timed_examples += len(rows)
        seen += len(rows)
    whole = steps <= 0
    per_s = timed_examples / timed_s
    return {"rate": rate, "examples": len(data), "steps_timed": limit - (0 if whole else 2),
            "examples_per_s": per_s, "epoch_s": time.perf_counter() - started if whole else len(data) / per_s,
            "epoch_measured": whole, "grad_sample_mode": dp.grad_sample_mode}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="online-retail:../shared/data/online-retail/online_retail.parquet",
                        help="online-retail:FILE (imported into --out) or a marketplace folder")
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.25],
                        help="negative sub-sampling rates of the centralised epochs (1 = every example)")
    parser.add_argument("--dp-rate", type=float, default=0.25, help="negative sub-sampling rate of the DP epoch")
    parser.add_argument("--dp-steps", type=int, default=40, help="DP steps timed (0 = a whole DP epoch)")
    parser.add_argument("--encoder", default="", help="model.encoder (default: the packaged MiniLM)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-training"))
    args = parser.parse_args(argv)
    if any(not 0 < r <= 1 for r in [*args.rates, args.dp_rate]):
        parser.error("sub-sampling rates must be in (0, 1]")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.data.split(":", 1)[1] if args.data.startswith("online-retail:") else args.data)
    if not source.exists():
        reason = f"{source} not found (the Online Retail file is not part of fedcvr: pass --data)"
        print(f"training throughput not measured: {reason}")
        result = {"benchmark": "training_throughput", "measured": False, "reason": reason}
        write_result(out / "training_throughput.json", result)
        return result
    folder, test_from = data_folder(args.data, out)
    s = setup(folder, test_from, out, args.encoder)
    epochs = [epoch(s, rate) for rate in args.rates]
    dp = dp_epoch(s, args.dp_rate, args.dp_steps)
    result = {"benchmark": "training_throughput", "command": command(
        "fedcvr.simulations.benchmarks.training_throughput", argv), "machine": machine(), "data": args.data,
        "merchants": s["merchants"], "catalog_items": s["catalog"], "train_examples": len(s["train"]),
        "measured": True, "threads": s["threads"], "batch_size": s["train_config"].batch_size,
        "prepare_s": s["prepare_s"],
        "epochs": epochs, "dp": dp}
    rows = [("data", f"{s['merchants']} merchants pooled, {len(s['train']):,} training examples, "
                     f"{s['catalog']:,} items; prepared in {s['prepare_s']:.1f} s; {s['threads']} threads")]
    for e in epochs:
        rows.append((f"epoch, negatives kept {e['rate']:g}", f"{e['seconds']:.1f} s for {e['examples']:,} examples: "
                                                               f"{e['examples_per_s']:,.0f} examples/s"))
    rows.append((f"DP epoch, negatives kept {dp['rate']:g} ({dp['grad_sample_mode']})",
                 f"{dp['epoch_s']:.1f} s {'measured' if dp['epoch_measured'] else 'projected'} for "
                 f"{dp['examples']:,} examples: {dp['examples_per_s']:,.0f} examples/s "
                 f"({dp['steps_timed']} steps timed)"))
    print_table(rows)
    write_result(out / "training_throughput.json", result)
    print(f"wrote {out / 'training_throughput.json'}")
    return result


if __name__ == "__main__":
    main()
