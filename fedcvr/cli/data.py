"""`fedcvr data ...`: validate, pseudonymise, synthesise and import merchant data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    _fail,
    _print_warnings,
    _summary_table,
    console,
    data_app,
    err_console,
    import_app,
)


@data_app.command("validate")
def data_validate(
    folder: Path = typer.Argument(..., help="A merchant folder (items + events tables) or a marketplace folder "
                                            "with one sub-folder per merchant."),
) -> None:
    """Check data against the contract and print a summary, or every problem found (exit code 2). Folders that
    pass but may not be learned from (one item, no clicks or no purchases) are listed as warnings (exit code 0)."""
    from fedcvr.shared.data.contract import DataValidationError
    from fedcvr.shared.data.loader import load_merchant, merchant_folders
    from fedcvr.shared.data.summary import combine, summarise

    try:
        folders = merchant_folders(folder)
    except FileNotFoundError as err:
        _fail(str(err))
    from rich.progress import track

    summaries, failures, warnings = [], [], []
    all_users: set[str] = set()
    all_items: set[str] = set()
    for merchant in track(folders, description="validating", console=err_console, transient=True,
                          disable=len(folders) < 2):
        try:
            data = load_merchant(merchant)
            summaries.append(summarise(data))
            warnings.extend((data.name, problem) for problem in data.warnings)
            all_users.update(data.events["user_id"].unique())
            all_items.update(data.items["item_id"])
        except DataValidationError as err:
            failures.append(err)
    for err in failures:
        err_console.print(str(err), highlight=False, markup=False, soft_wrap=True)
    if summaries:
        total = combine(summaries, len(all_users), len(all_items)) if len(summaries) > 1 else None
        console.print(_summary_table(summaries, total))
    _print_warnings(warnings)
    if failures:
        _fail(f"{len(failures)} of {len(folders)} merchant folder(s) failed validation; see the problems above.")
    note = (f"; {len(warnings)} warning(s) above: training refuses a merchant whose examples hold a single class "
            "of labels" if warnings else ".")
    console.print(f"[green]ok:[/] {len(folders)} merchant folder(s) match the data contract{note}", highlight=False)


@data_app.command("pseudonymise")
def data_pseudonymise(
    folder: Path = typer.Argument(..., help="A merchant folder (items + events tables) or a marketplace folder "
                                            "with one sub-folder per merchant."),
    force: bool = typer.Option(False, "--force", help="Hash the ids even when they all look like pseudonyms "
                                                      "already (32 hex digits)."),
) -> None:
    """Replace the shopper ids (events' user_id) of data you wrote yourself by keyed pseudonyms, in place: each
    merchant folder's own key (pseudonym.key, made when missing) and HMAC-SHA256, as the importers do. Every other
    column is kept."""
    from fedcvr.shared.data.loader import merchant_folders
    from fedcvr.shared.data.pseudonym import PseudonymiseError, pseudonymise_folder

    try:
        folders = merchant_folders(folder)
    except FileNotFoundError as err:
        _fail(str(err))
    table = Table(title="Shopper ids pseudonymised")
    for column in ("merchant", "table", "rows", "shoppers", "key"):
        table.add_column(column, justify="right" if column in ("rows", "shoppers") else "left")
    failures = []
    for merchant in folders:
        try:
            done = pseudonymise_folder(merchant, force=force)
        except PseudonymiseError as err:
            failures.append(str(err))
            continue
        table.add_row(merchant.name, done.table.name, f"{done.rows:,}", f"{done.shoppers:,}",
                      "created (keep it private; back it up)" if done.key_created else "reused")
    if table.row_count:
        console.print(table)
    for failure in failures:
        err_console.print(failure, highlight=False, markup=False, soft_wrap=True)
    if failures:
        _fail(f"{len(failures)} of {len(folders)} merchant folder(s) not pseudonymised; see above. The others are "
              "done.")


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
