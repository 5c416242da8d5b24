"""The `fedcvr` command: the front door for merchants, coordinators and researchers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedcvr import __version__

app = typer.Typer(
    name="fedcvr",
    help="Federated, privacy-preserving conversion-rate optimisation for e-commerce.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Create, import, validate and summarise merchant data.", no_args_is_help=True)
import_app = typer.Typer(help="Import public data sets into the fedcvr data contract.", no_args_is_help=True)
app.add_typer(data_app, name="data")
data_app.add_typer(import_app, name="import")

console = Console() if Console().is_terminal else Console(width=160)
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2


def _version(value: bool) -> None:
    if value:
        console.print(f"fedcvr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Federated, privacy-preserving conversion-rate optimisation for e-commerce."""


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _summary_table(summaries, total=None) -> Table:
    from fedcvr.shared.data.contract import EVENT_TYPES

    table = Table(title="Data summary", show_lines=False)
    for column in ("merchant", "users", "items", *EVENT_TYPES, "from", "to", "click rate", "purchase rate",
                   "conversion rate"):
        table.add_column(column, justify="left" if column in ("merchant", "from", "to") else "right")
    rows = list(summaries) + ([total] if total is not None else [])
    for s in rows:
        table.add_row(
            s.name, f"{s.users:,}", f"{s.items:,}", *(f"{s.events[e]:,}" for e in EVENT_TYPES),
            f"{s.first:%Y-%m-%d}" if s.first is not None else "", f"{s.last:%Y-%m-%d}" if s.last is not None else "",
            _rate(s.click_rate), _rate(s.purchase_rate), _rate(s.conversion_rate),
            end_section=s is summaries[-1] and total is not None,
        )
    table.caption = ("click rate = clicks / impressions; purchase rate = purchases / clicks; "
                     "conversion rate = purchases / impressions")
    return table


@data_app.command("validate")
def data_validate(
    folder: Path = typer.Argument(..., help="A merchant folder (items + events tables) or a marketplace folder "
                                            "with one sub-folder per merchant."),
) -> None:
    """Check data against the contract and print a summary, or every problem found (exit code 2)."""
    from fedcvr.shared.data.contract import DataValidationError
    from fedcvr.shared.data.loader import load_merchant, merchant_folders
    from fedcvr.shared.data.summary import combine, summarise

    try:
        folders = merchant_folders(folder)
    except FileNotFoundError as err:
        _fail(str(err))
    from rich.progress import track

    summaries, failures = [], []
    all_users: set[str] = set()
    all_items: set[str] = set()
    for merchant in track(folders, description="validating", console=err_console, transient=True,
                          disable=len(folders) < 2):
        try:
            data = load_merchant(merchant)
            summaries.append(summarise(data))
            all_users.update(data.events["user_id"].unique())
            all_items.update(data.items["item_id"])
        except DataValidationError as err:
            failures.append(err)
    for err in failures:
        err_console.print(str(err), highlight=False, markup=False, soft_wrap=True)
    if summaries:
        total = combine(summaries, len(all_users), len(all_items)) if len(summaries) > 1 else None
        console.print(_summary_table(summaries, total))
    if failures:
        _fail(f"{len(failures)} of {len(folders)} merchant folder(s) failed validation; see the problems above.")
    console.print(f"[green]ok:[/] {len(folders)} merchant folder(s) match the data contract.")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder to write the marketplace into (one sub-folder per merchant)."),
    merchants: int = typer.Option(5, "--merchants", help="Number of merchants."),
    items: int = typer.Option(2000, "--items", help="Number of distinct items over all merchants."),
    shoppers: int = typer.Option(5000, "--shoppers", help="Number of shoppers over all merchants."),
    events: int = typer.Option(200_000, "--events", help="Approximate number of events over all merchants."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed and sizes give the same data."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace merchant folders already in OUT."),
) -> None:
    """Generate the synthetic marketplace: merchants with catalogs, shoppers and sessions from a hidden
    ground-truth model (stored next to each impression as true_p_click and true_p_purchase)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedcvr.shared.data.loader import is_merchant_folder
    from fedcvr.simulations.synth import SynthConfig, generate_marketplace

    try:
        config = SynthConfig(merchants=merchants, items=items, shoppers=shoppers, events=events, seed=seed)
    except ValueError as err:
        _fail(str(err))
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file, not a folder: pass a folder path")
    existing = [p for p in out.iterdir() if p.is_dir() and is_merchant_folder(p)] if out.is_dir() else []
    if existing and not overwrite:
        _fail(f"--out {out} already holds {len(existing)} merchant folder(s); pass --overwrite to replace them "
              "or choose an empty folder")
    for old in existing if overwrite else []:
        for name in ("items.parquet", "events.parquet"):
            (old / name).unlink(missing_ok=True)
    with Progress(TextColumn("synthesising events"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("events", total=events)
        description = generate_marketplace(config, out, lambda done, total: bar.update(task, completed=done))
    total = sum(sum(m["events"].values()) for m in description["merchants"])
    console.print(f"[green]wrote[/] {len(description['merchants'])} merchant folders with {total:,} events to {out} "
                  f"(seed {seed}); check them with `fedcvr data validate {out}`")


def _print_import(report, user_word: str, partition_word: str) -> None:
    from fedcvr.shared.data.importers.report import report_table

    console.print(report_table(report, user_word, partition_word))
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"[green]wrote[/] {len(report.partitions)} merchant folder(s) to {report.out}. "
                  f"Next: run `fedcvr data validate {report.out}`", highlight=False)


@import_app.command("online-retail")
def import_online_retail_command(
    file: Annotated[Path, typer.Argument(help="Online Retail or Online Retail II file as published (.xlsx with "
                                              "all sheets, .csv or .parquet).")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write: one merchant sub-folder per country.")],
) -> None:
    """Import UCI Online Retail (I or II): clean it and write one merchant folder per country."""
    from fedcvr.shared.data.importers.online_retail import import_online_retail
    from fedcvr.shared.data.importers.report import ImportInputError

    try:
        report = import_online_retail(file, out, show_progress=True)
    except ImportInputError as err:
        _fail(str(err))
    _print_import(report, "customers", "countries")


@import_app.command("amazon")
def import_amazon_command(
    reviews: Annotated[Path, typer.Option("--reviews", help="Reviews file, JSON lines (2018 or 2023), .gz or plain.")],
    meta: Annotated[Path, typer.Option("--meta", help="Meta file of the same release, JSON lines, .gz or plain.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write: one merchant sub-folder per partition.")],
    partition_by: Annotated[str | None, typer.Option(
        "--partition-by", help="Meta field that splits items into merchants (default: main category; "
                               "e.g. brand, store).")] = None,
) -> None:
    """Import Amazon Reviews 2018/2023: each review is a purchase; one merchant folder per main category."""
    from fedcvr.shared.data.importers.amazon import import_amazon
    from fedcvr.shared.data.importers.report import ImportInputError

    try:
        report = import_amazon(reviews, meta, out, partition_by=partition_by, show_progress=True)
    except ImportInputError as err:
        _fail(str(err))
    _print_import(report, "users", "partitions")


_REPORTED = ("click.auc", "click.gauc", "click.logloss", "ctcvr.auc", "ctcvr.gauc", "ctcvr.logloss",
             "ctcvr.calibration", "ctcvr.ece", "hr@10", "ndcg@10", "hr@50", "ndcg@50")


def _metrics_table(split: str, by_model: dict[str, dict[str, float | None]]) -> Table:
    table = Table(title=f"{split} split")
    table.add_column("metric")
    for name in by_model:
        table.add_column(name, justify="right")
    for metric in _REPORTED:
        values = [by_model[name].get(metric) for name in by_model]
        table.add_row(metric, *("n/a" if v is None else f"{v:.4f}" for v in values))
    return table


@app.command("train-central")
def train_central_command(
    data: Path = typer.Option(..., "--data", help="Marketplace folder (one sub-folder per merchant)."),
    out: Path = typer.Option(..., "--out", help="Model folder to write (weights, config, encoder, metrics)."),
    merchants: str = typer.Option("", "--merchants", help="Comma-separated merchant folder names (default: all)."),
    epochs: int = typer.Option(None, "--epochs", help="Most epochs (early stopping may end sooner). [default: 8]"),
    encoder: str = typer.Option(None, "--encoder", help="Local BERT folder. [default: the packaged all-MiniLM-L6-v2]"),
    adapter_layers: int = typer.Option(None, "--adapter-layers", help="Top layers with adapters (0 = frozen "
                                                                      "embeddings). [default: 0]"),
    adapter_size: int = typer.Option(None, "--adapter-size", help="Adapter bottleneck size. [default: 32]"),
    batch_size: int = typer.Option(None, "--batch-size", help="Examples per step. [default: 1024]"),
    lr: float = typer.Option(None, "--lr", help="Adam learning rate, decayed along a cosine. [default: 0.006]"),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda. [default: auto]"),
    seed: int = typer.Option(None, "--seed", help="Seed for initialisation and shuffling. [default: 0]"),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Folder of the frozen-prefix cache. "
                                                             "[default: ~/.cache/fedcvr/prefix or $FEDCVR_CACHE]"),
) -> None:
    """Train the conversion model on the union of the merchants (no federation, no privacy): the upper bound
    that federated results are compared with. Prints the model, a popularity baseline and, on synthetic data,
    the ground-truth oracle side by side for each split."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from fedcvr.shared.data.contract import DataValidationError
    from fedcvr.shared.data.examples import ExampleConfig
    from fedcvr.shared.model.config import ModelConfig, TrainConfig
    from fedcvr.shared.model.errors import ModelConfigError
    from fedcvr.simulations.central import train_central

    try:
        model_config = ModelConfig.from_run_config({}, encoder=encoder, adapter_layers=adapter_layers,
                                                   adapter_size=adapter_size)
        train_config = TrainConfig.from_run_config({}, epochs=epochs, batch_size=batch_size, lr=lr, device=device,
                                                   seed=seed)
    except ModelConfigError as err:
        _fail(str(err))
    names = [n.strip() for n in merchants.split(",") if n.strip()] or None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console) as bar:

        def on_epoch_start(epoch: int, examples: int):
            task = bar.add_task(f"epoch {epoch}", total=examples, loss="")
            return lambda done, loss: bar.update(task, advance=done, loss=f"loss {loss:.4f}")

        def on_epoch_end(record: dict) -> None:
            score = record["validation_ctcvr.auc"]
            bar.console.print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, validation CTCVR AUC "
                              f"{'n/a' if score is None else f'{score:.4f}'}")

        try:
            result = train_central(data, out, model_config, train_config, ExampleConfig(), names, cache_dir,
                                   on_stage=lambda text: bar.console.print(f"[dim]{text}[/]"),
                                   on_epoch_start=on_epoch_start, on_epoch_end=on_epoch_end)
        except (ModelConfigError, FileNotFoundError) as err:
            _fail(str(err))
        except DataValidationError as err:
            err_console.print(str(err), highlight=False, markup=False, soft_wrap=True)
            _fail("the data does not match the contract; fix the problems above (see `fedcvr data validate`)")
    for split, by_model in result.metrics.items():
        console.print(_metrics_table(split, by_model))
    console.print(f"[green]saved[/] the model (best epoch {result.best_epoch}) to {out} in {result.seconds:.0f} s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
