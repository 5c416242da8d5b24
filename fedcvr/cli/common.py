"""What every part of the `fedcvr` command shares: the Typer apps, the consoles, failing with a message, tables."""

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
keys_app = typer.Typer(help="Keys and certificates for a deployment over the network.", no_args_is_help=True)
app.add_typer(data_app, name="data")
data_app.add_typer(import_app, name="import")
app.add_typer(keys_app, name="keys")
coordinator_app = typer.Typer(help="Run the coordinator of a deployment: the SuperLink, merchant registration and "
                                   "training runs.", no_args_is_help=True)
merchant_app = typer.Typer(help="Run a merchant's node of a deployment.", no_args_is_help=True)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(merchant_app, name="merchant")

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


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


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


def _print_warnings(warnings) -> None:
    """(merchant, problem) pairs of data that passes the contract but may not be learned from."""
    for name, problem in warnings:
        err_console.print(f"[yellow]warning:[/] {name}: ", end="", highlight=False)
        err_console.print(str(problem), highlight=False, markup=False, soft_wrap=True)


def _validate_for_run(root: Path) -> list[Path]:
    """The merchant folders under `root`, each checked against the data contract; exit code 2 with every
    problem when any fails."""
    from rich.progress import track

    from fedcvr.shared.data.contract import DataValidationError
    from fedcvr.shared.data.loader import load_merchant, merchant_folders

    try:
        folders = merchant_folders(root)
    except FileNotFoundError as err:
        _fail(str(err))
    failures, warnings = [], []
    for folder in track(folders, description="validating the merchant data", console=err_console, transient=True,
                        disable=len(folders) < 2):
        try:
            data = load_merchant(folder)
            warnings.extend((data.name, problem) for problem in data.warnings)
        except DataValidationError as err:
            failures.append(err)
    for err in failures:
        err_console.print(str(err), highlight=False, markup=False, soft_wrap=True)
    _print_warnings(warnings)  # the run goes on: a node whose examples cannot be learned from declines, saying why
    if failures:
        _fail(f"{len(failures)} of {len(folders)} merchant folder(s) failed validation; see the problems above "
              "(`fedcvr data validate` checks data on its own). Nothing was started.")
    return folders


def _check_run_config(values: dict) -> None:
    """Read the full run config as the ServerApp and the nodes will: every bad value is refused now (ValueError
    naming the key), before any process starts."""
    from fedcvr.client.node import NodeSettings
    from fedcvr.server.config import ServerConfig

    ServerConfig.from_run_config(values)
    NodeSettings.from_run_config(values)


PersonaliseOption = Annotated[bool | None, typer.Option(
    "--personalise/--no-personalise", help="After the last round each node fine-tunes its local layers (never sent) "
    "and serves global + local (personalise). (default: the app's, true)")]


def _recommendation_table(table: Table, answer: dict, implicit: bool) -> None:
    """The model's ranked items with their scores (one, pPurchase, on a purchase-only shop) and why."""
    scores = ("p_purchase",) if implicit else ("p_ctcvr", "p_ctr", "p_cvr")
    label = {"p_purchase": "pPurchase", "p_ctcvr": "pCTCVR", "p_ctr": "pCTR", "p_cvr": "pCVR"}
    for column in ("item", "title", *scores, "because"):
        table.add_column(label.get(column, column), justify="right" if column in label else "left")
    for item in answer["items"]:
        table.add_row(item["item_id"], item["title"], *(f"{item[s]:.4f}" for s in scores), item["reason"])


def _print_basket_tables(title: str, rankers: list[tuple[str, dict]]) -> None:
    """The next-basket tables (every item; new items only) of `rankers` = [(label, finalised metrics)]."""
    from fedcvr.shared.evaluation import tables

    for variant, words in tables.VARIANT_TITLES.items():
        table = Table(title=f"{title}: {words}; mean [95% bootstrap interval]")
        for index, column in enumerate(tables.HEADER):
            table.add_column(column, justify="left" if index == 0 else "right")
        for row in tables.rows(rankers, variant):
            table.add_row(*row)
        console.print(table)


ModelDirOption = Annotated[Path, typer.Option(
    "--model-dir", help="The model folder: a node's --model-dir after a run, or a run's model/ folder.")]


DataDirOption = Annotated[Path, typer.Option("--data-dir", help="Your merchant data folder (items + events).")]
