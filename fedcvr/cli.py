"""The `fedcvr` command: the front door for merchants, coordinators and researchers."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedcvr import __version__
from fedcvr.shared.evaluation import BASELINES

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


_REPORTED = ("click.auc", "click.gauc", "click.logloss", "ctcvr.auc", "ctcvr.gauc", "ctcvr.logloss",
             "ctcvr.calibration", "ctcvr.ece", "hr@10", "ndcg@10", "hr@50", "ndcg@50")


def _metrics_table(split: str, by_model: dict[str, dict[str, float | None]]) -> Table:
    table = Table(title=f"{split} split")
    table.add_column("metric")
    for name in by_model:
        table.add_column(name, justify="right")
    for metric in _REPORTED:
        values = [by_model[name].get(metric) for name in by_model]
        if all(v is None for v in values):
            continue  # e.g. per-purchase ranking, which purchase logs replace by the next-basket table
        table.add_row(metric, *("n/a" if v is None else f"{v:.4f}" for v in values))
    return table


def _baseline_label(result) -> str:
    from fedcvr.shared.evaluation.next_basket import params_text

    return f"{result.name} ({result.scope}; {params_text(result.params)})"


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
    test_from: str = typer.Option("", "--test-from", help="Date where the test split starts, e.g. 2011-11-01; "
                                                          "purchase logs rank each shopper's next basket from there. "
                                                          "[default: the last 10% of each merchant's examples]"),
    baselines: str = typer.Option(",".join(BASELINES), "--baselines",
                                  help="Comma-separated classic baselines ranked beside the model on purchase logs "
                                       "('' for none)."),
    popularity_days: float = typer.Option(None, "--popularity-days",
                                          help="Window W of the popularity baseline, in days (tuned on validation "
                                               "unless --no-tune). [default: 30]"),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Tune each baseline's setting on the validation split."),
    run_config: str = typer.Option("", "--run-config", help="Model, training and example settings as run config "
                                   "keys, \"key=value ...\" with TOML values, e.g. \"examples.negatives=8 "
                                   "model.dim=128\" (the options above win)."),
    personalise: PersonaliseOption = None,
) -> None:
    """Train the conversion model on the union of the merchants (no federation, no privacy): the upper bound
    that federated results are compared with. Then personalises as nodes do (a local item memory, kept where
    validation rates it higher). Prints the model, the model with its local layers ("model + local"), a popularity
    baseline and, on synthetic data, the ground-truth oracle side by side for each split; on purchase logs also the
    next-basket table (every item, and new items only) with the model and the classic baselines fitted on the
    pooled purchases."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from fedcvr.shared.data.contract import DataValidationError
    from fedcvr.shared.data.examples import ExampleConfig
    from fedcvr.shared.evaluation.baselines import BaselineConfig, BaselineError, check_names
    from fedcvr.shared.model.config import ModelConfig, TrainConfig
    from fedcvr.shared.model.errors import ModelConfigError
    from fedcvr.shared.training.personalise import PersonaliseConfig
    from fedcvr.simulations.central import train_central
    from fedcvr.simulations.launcher import LaunchError, parse_run_config

    try:
        extra = parse_run_config(run_config)
        model_config = ModelConfig.from_run_config(extra, encoder=encoder, adapter_layers=adapter_layers,
                                                   adapter_size=adapter_size)
        train_config = TrainConfig.from_run_config(extra, epochs=epochs, batch_size=batch_size, lr=lr, device=device,
                                                   seed=seed)
        example_config = ExampleConfig.from_run_config(extra, test_from=test_from or None)
        baseline_names = check_names([n.strip() for n in baselines.split(",") if n.strip()], "--baselines")
        baseline_config = BaselineConfig.from_run_config({}, popularity_days=popularity_days, tune=tune)
        personalise_config = PersonaliseConfig.from_run_config(extra, enabled=personalise)
    except (ModelConfigError, LaunchError) as err:
        _fail(str(err))
    except (BaselineError, ValueError) as err:
        _fail(str(err).replace("examples.test-from", "--test-from"))
    unknown = sorted(set(extra) - set(ModelConfig.KEYS) - set(TrainConfig.KEYS) - set(ExampleConfig.KEYS)
                     - set(PersonaliseConfig.KEYS))
    if unknown:
        _fail(f"--run-config: {', '.join(unknown)} not used by train-central; it reads the model.*, adapter.*, "
              "train.*, examples.* and personalise* keys")
    names = [n.strip() for n in merchants.split(",") if n.strip()] or None
    began = time.perf_counter()  # each stage line says when it began
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console) as bar:

        def on_epoch_start(epoch: int, examples: int):
            task = bar.add_task(f"epoch {epoch}", total=examples, loss="")
            return lambda done, loss: bar.update(task, advance=done, loss=f"loss {loss:.4f}")

        def on_epoch_end(record: dict) -> None:
            shown = [("CTCVR AUC", record["validation_ctcvr.auc"])]
            if record["early_stop_metric"] != "ctcvr.auc":
                shown.append(("next-basket NDCG@10", record[f"validation_{record['early_stop_metric']}"]))
            text = ", ".join(f"{name} {'n/a' if v is None else f'{v:.4f}'}" for name, v in shown)
            bar.console.print(f"{time.perf_counter() - began:6.0f} s  epoch {record['epoch']}: train loss "
                              f"{record['train_loss']:.4f}, validation {text}", highlight=False)

        try:
            result = train_central(data, out, model_config, train_config, example_config, names, cache_dir,
                                   baseline_names, baseline_config, personalise_config,
                                   on_stage=lambda text: bar.console.print(
                                       f"[dim]{time.perf_counter() - began:6.0f} s  {text}[/]", highlight=False),
                                   on_epoch_start=on_epoch_start, on_epoch_end=on_epoch_end)
        except (ModelConfigError, FileNotFoundError) as err:
            _fail(str(err))
        except DataValidationError as err:
            err_console.print(str(err), highlight=False, markup=False, soft_wrap=True)
            _fail("the data does not match the contract; fix the problems above (see `fedcvr data validate`)")
    for split, by_model in result.metrics.items():
        console.print(_metrics_table(split, by_model))
    if any(k.startswith("nb.") for k in result.metrics.get("test", {}).get("model", {})):
        rankers = [(name, result.metrics["test"][name]) for name in ("model", "model + local")
                   if name in result.metrics["test"]]
        rankers += [(_baseline_label(b), b.metrics) for b in result.baselines]
        _print_basket_tables("Test split, next basket", rankers)
    console.print(f"[green]saved[/] the model (best epoch {result.best_epoch}) to {out} in {result.seconds:.0f} s")


@app.command("local-only")
def local_only_command(
    run: Annotated[Path, typer.Option(
        "--run", help="A finished `fedcvr simulate` run folder: its settings are reused and its global model "
                      "(RUN/model) is the federated side of the comparison.")] = ...,
    merchants: Annotated[str, typer.Option(
        "--merchants", help="Comma-separated merchant folder names. (default: all of the run's)")] = "",
    baselines: Annotated[str, typer.Option(
        "--baselines", help="Comma-separated classic baselines each merchant fits alone, ranked beside the models on "
                            "purchase logs ('' for none).")] = ",".join(BASELINES),
) -> None:
    """Train each merchant alone with the run's exact settings (rounds, local epochs, DP budget, seeds) and
    compare its test metrics with the federated global model's on the same test split. Writes
    RUN/local-only.json and prints a table, smallest merchants last; on purchase logs also the next-basket tables
    over all merchants' shoppers: each merchant's lone model, the federated model and each merchant's own
    baselines."""
    import json
    import tomllib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedcvr.shared.evaluation.baselines import BaselineError, check_names
    from fedcvr.shared.model.errors import ModelConfigError
    from fedcvr.simulations import launcher as sim
    from fedcvr.simulations.local_only import COMPARED, compare, pooled_next_basket

    run_dir = run.expanduser().resolve()
    config_file = run_dir / sim.RUN_CONFIG_FILE
    if not config_file.is_file() or not (run_dir / "model" / "weights.safetensors").is_file():
        _fail(f"--run {run}: not a finished simulation run (need {config_file} and {run_dir / 'model'}); run "
              "`fedcvr simulate ... --out RUN` first")
    run_config = {**sim.app_run_config(sim.find_app_dir()), **sim.flatten(tomllib.loads(config_file.read_text()))}
    folders = _validate_for_run(Path(str(run_config["data-root"])))
    names = [n.strip() for n in merchants.split(",") if n.strip()]
    unknown = sorted(set(names) - {f.name for f in folders})
    if unknown:
        _fail(f"--merchants {', '.join(unknown)}: not in {run_config['data-root']} "
              f"(it has {', '.join(f.name for f in folders)})")
    folders = [f for f in folders if not names or f.name in names]
    try:
        baseline_names = check_names([n.strip() for n in baselines.split(",") if n.strip()], "--baselines")
    except BaselineError as err:
        _fail(str(err))
    rounds = int(run_config["num-server-rounds"])
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console) as bar:
        task = bar.add_task("", total=rounds)

        def on_merchant(name: str) -> None:
            bar.update(task, description=f"{name} alone, rounds", completed=0)

        try:
            results = compare(folders, run_config, run_dir / "model", on_merchant,
                              lambda r: bar.update(task, completed=r), baseline_names)
        except (ModelConfigError, ValueError) as err:
            _fail(str(err))
    results.sort(key=lambda r: -r.train_examples)
    (run_dir / "local-only.json").write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    table = Table(title=f"Test split: each merchant alone vs the federated model of {run_dir.name}")
    for column in ("merchant", "train examples", "test purchases"):
        table.add_column(column, justify="left" if column == "merchant" else "right")
    shown = [m for m in COMPARED if any(r.alone.get(m) is not None for r in results)]
    for metric in shown:
        table.add_column(f"{metric}\nalone → fed", justify="right")
    for r in results:
        cells = [f"{_score(r.alone.get(m))} → {_score(r.federated.get(m))}" for m in shown]
        table.add_row(r.merchant, f"{r.train_examples:,}", str(r.test_purchases), *cells)
    console.print(table)
    pooled = pooled_next_basket(results)
    if pooled:
        _print_basket_tables("Test split, next basket, all merchants' shoppers", pooled)
    console.print(f"written to {run_dir / 'local-only.json'}", highlight=False)


def _synthesise_for_run(folder: Path, merchants: int, seed: int) -> None:
    """Write the default marketplace of `merchants` merchants into `folder`, or reuse the one already there when
    it was made with the same number of merchants and seed."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedcvr.simulations.synth import SynthConfig, generate_marketplace

    try:
        config = SynthConfig(merchants=merchants, seed=seed)
    except ValueError as err:
        _fail(str(err))
    described = folder / "marketplace.json"
    if described.is_file():
        try:
            made = json.loads(described.read_text()).get("config", {})
        except (ValueError, AttributeError):
            made = {}
        if made.get("merchants") == merchants and made.get("seed") == seed:
            console.print(f"reusing the synthetic marketplace in {folder} ({merchants} merchants, seed {seed})",
                          highlight=False)
            return
        _fail(f"{folder} holds a synthetic marketplace of {made.get('merchants', '?')} merchant(s) with seed "
              f"{made.get('seed', '?')}, not {merchants} with seed {seed}: delete {folder} or choose another --out")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        _fail(f"{folder} already exists and is not a marketplace written by `fedcvr simulate --merchants`: "
              "delete it, choose another --out, or pass the marketplace with --data")
    with Progress(TextColumn("synthesising events"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("events", total=config.events)
        generate_marketplace(config, folder, lambda done, total: bar.update(task, completed=done))
    console.print(f"[green]wrote[/] a synthetic marketplace of {merchants} merchants (seed {seed}) to {folder}",
                  highlight=False)


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


@app.command("simulate")
def simulate_command(
    data: Annotated[Path | None, typer.Option(
        "--data", help="Marketplace folder (one sub-folder per merchant); each merchant is one simulated node.")
    ] = None,
    merchants: Annotated[int | None, typer.Option(
        "--merchants", help="Without --data: synthesise a default marketplace of this many merchants into OUT/data "
                            "(reused by later runs with the same --merchants and --seed).")] = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Number of federated rounds.")] = ...,
    out: Annotated[Path, typer.Option(
        "--out", help="Run folder: run-config.toml, flower.log, rounds.jsonl, history.json and history.csv.")] = ...,
    dp_epsilon: Annotated[float | None, typer.Option(
        "--dp-epsilon", help="ε budget of the whole run, all rounds together (dp.target-epsilon). "
                             "(default: the app's)")] = None,
    strategy: Annotated[str | None, typer.Option(
        "--strategy", help="Aggregation strategy: fedavg, fedprox or fedadam. (default: fedavg)")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Seed of the run (and of the synthetic marketplace with --merchants). (default: 0)")] = None,
    local_epochs: Annotated[int | None, typer.Option(
        "--local-epochs", help="Epochs each node trains per round. (default: the app's)")] = None,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Train without differential privacy (dp.enabled = false).")
                     ] = False,
    secagg: Annotated[bool, typer.Option(
        "--secagg", help="Secure aggregation (SecAgg+, secagg = true): the server sees only the sum of the updates; "
                         "needs at least 3 merchants.")] = False,
    personalise: PersonaliseOption = None,
    run_config: Annotated[str, typer.Option(
        "--run-config", help="More run config overrides, \"key=value ...\" with TOML values (numbers, true/false, "
                             "text in quotes), e.g. \"round-timeout=120 train.lr=0.003\".")] = "",
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="Stop the run after this many seconds (exit code 1). (default: no limit)")] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue a stopped run from its last checkpoint: the stopped run's --out folder (pass "
                         "the same settings; --out may be the same folder).")] = None,
) -> None:
    """Run a federated simulation on this machine: one Flower node per merchant folder, with `flwr run`.

    Shows the rounds as they finish, writes Flower's output to OUT/flower.log and the per-round metrics to
    OUT/history.csv, and prints them as a table. Exit code 0 when the run completed, 1 when it failed or timed
    out, 2 for bad options or data (found before anything starts)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedcvr.shared import deploy as shared_deploy
    from fedcvr.simulations import launcher as sim

    if data is not None and merchants is not None:
        _fail("pass either --data (a marketplace folder) or --merchants (synthesise one), not both")
    if data is None and merchants is None:
        _fail("say which merchants to simulate: --data DIR (a marketplace folder with one sub-folder per "
              "merchant) or --merchants M (synthesise a default marketplace of M merchants into OUT/data)")
    if merchants is not None and merchants < 1:
        _fail(f"--merchants must be at least 1, got {merchants}")
    if rounds < 1:
        _fail(f"--rounds must be at least 1, got {rounds}")
    if strategy is not None and strategy.lower() not in sim.STRATEGIES:
        _fail(f"--strategy {strategy!r} is not one of {', '.join(sim.STRATEGIES)}")
    if dp_epsilon is not None and no_dp:
        _fail("--dp-epsilon sets a privacy budget, --no-dp turns privacy off: pass one of them")
    if dp_epsilon is not None and not dp_epsilon > 0:
        _fail(f"--dp-epsilon must be a number > 0, e.g. 8, got {dp_epsilon}")
    if local_epochs is not None and local_epochs < 1:
        _fail(f"--local-epochs must be at least 1, got {local_epochs}")
    if timeout is not None and not timeout > 0:
        _fail(f"--timeout must be a number of seconds > 0, got {timeout}")
    try:
        extra = sim.parse_run_config(run_config)
        app_dir = sim.find_app_dir()
        declared = sim.app_run_config(app_dir)
    except sim.LaunchError as err:
        _fail(str(err))
    run_dir = out.expanduser().resolve()
    if run_dir.exists() and not run_dir.is_dir():
        _fail(f"--out {out} is a file, not a folder: pass a folder path")
    if sim.packed_into_app(app_dir, run_dir):
        _fail(f"--out {out} lies inside the Flower App folder {app_dir} and its .gitignore does not exclude it, so "
              "`flwr run` would pack the run's files into the app: choose a folder under runs/ or outside the app")
    bin_dir = shared_deploy.flwr_bin_dir()
    if not (bin_dir / "flwr").is_file():
        _fail(f"no `flwr` next to this Python in {bin_dir}: install fedcvr with its dependencies in that "
              "environment (`pip install -e .`)")

    if data is None:
        data_root = run_dir / "data"
        _synthesise_for_run(data_root, merchants, 0 if seed is None else seed)
    else:
        data_root = data.expanduser().resolve()
    folders = _validate_for_run(data_root)

    settings = [
        sim.Setting("data-root", str(data_root)), sim.Setting("out-dir", str(run_dir)),
        sim.Setting("num-server-rounds", rounds), sim.Setting("min-nodes", len(folders)),
        sim.Setting("strategy", (strategy or "fedavg").lower(), "--strategy" if strategy else None),
        sim.Setting("dp.enabled", not no_dp, "--no-dp" if no_dp else None),
        sim.Setting("seed", 0 if seed is None else seed, None if seed is None else "--seed"),
    ]
    if resume is not None:
        from fedcvr.server.checkpoint import CheckpointError, checkpoint_folder

        try:
            settings.append(sim.Setting("resume", str(checkpoint_folder(resume.expanduser().resolve())), "--resume"))
        except CheckpointError as err:
            _fail(str(err).replace("resume = ", "--resume "))
    if dp_epsilon is not None:
        settings.append(sim.Setting("dp.target-epsilon", float(dp_epsilon), "--dp-epsilon"))
    if local_epochs is not None:
        settings.append(sim.Setting("local-epochs", local_epochs, "--local-epochs"))
    if secagg:
        settings.append(sim.Setting("secagg", True, "--secagg"))
    if personalise is not None:
        settings.append(sim.Setting("personalise", personalise, "--personalise" if personalise else "--no-personalise"))
    try:
        overrides, notes = sim.build_run_config(declared, app_dir, settings, extra)
        _check_run_config({**declared, **overrides})
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file = sim.write_run_config(run_dir / sim.RUN_CONFIG_FILE, overrides)
    except ValueError as err:  # LaunchError, or a bad run config value (named by key)
        _fail(str(err))
    for note in notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    earlier = [name for name in (sim.ROUNDS_FILE, sim.HISTORY_FILE, sim.HISTORY_CSV)
               if (run_dir / name).exists() and resume is None]
    for name in earlier:
        (run_dir / name).unlink()
    if earlier:
        err_console.print(f"[yellow]note:[/] replaced the results of an earlier run in {run_dir} "
                          f"({', '.join(earlier)})", highlight=False)

    names = ", ".join(f.name for f in folders[:6]) + (", ..." if len(folders) > 6 else "")
    console.print(f"Simulating {len(folders)} merchant node(s) ({names}) for {rounds} round(s); Flower's output goes "
                  f"to {run_dir / sim.FLOWER_LOG}", highlight=False)
    seen: list[dict] = []
    try:
        with Progress(TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[last]}"), console=err_console) as bar:
            task = bar.add_task("rounds", total=rounds, last=sim.progress_text(None))

            def on_round(record: dict) -> None:
                seen.append(record)
                done = record.get("round")
                done = done if isinstance(done, int) and not isinstance(done, bool) else len(seen)
                bar.update(task, completed=min(done, rounds), last=sim.progress_text(record))

            outcome = sim.launch(run_dir, app_dir, len(folders), config_file, on_round=on_round, timeout=timeout,
                                 bin_dir=bin_dir)
    except sim.LaunchError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        err_console.print(f"[bold red]interrupted:[/] the run's Flower processes were stopped; its output is in "
                          f"{run_dir / sim.FLOWER_LOG}", highlight=False)
        raise typer.Exit(130) from None

    records, source = sim.load_history(run_dir)
    if records:
        csv_path = sim.write_history_csv(records, run_dir / sim.HISTORY_CSV)
        console.print(sim.rounds_table(records))
        console.print(sim.privacy_line(records), highlight=False)
        console.print(f"wrote {csv_path} ({len(records)} round(s), from {source})", highlight=False)
    else:
        console.print(f"[yellow]note:[/] the ServerApp wrote no round records ({sim.ROUNDS_FILE} or "
                      f"{sim.HISTORY_FILE}) into {run_dir}, so there is no history.csv", highlight=False)
    if not outcome.ok:
        log_tail = sim.tail(run_dir / sim.FLOWER_LOG, 40)
        if log_tail:
            err_console.print(f"--- last lines of {run_dir / sim.FLOWER_LOG}", highlight=False)
            err_console.print(log_tail, highlight=False, markup=False, soft_wrap=True)
            err_console.print("---")
        status = "timed out" if outcome.timed_out else (outcome.status or "not started")
        run = f"run {outcome.run_id}" if outcome.run_id else "the run"
        _fail(f"{run} did not complete ({status}): {outcome.details or 'no details'}", code=1)
    console.print(f"[green]completed[/] run {outcome.run_id} in {outcome.seconds:.0f} s; results in {run_dir}",
                  highlight=False)
    _show_recommendations(run_dir, folders)
    _show_served_vs_baselines(run_dir, folders)


def _show_recommendations(run_dir: Path, folders: list[Path], k: int = 5) -> None:
    """A few recommendations for the most active shopper of the first merchant, from its pushed-back model (the
    merchant's own `Recommender`, as `fedcvr recommend` serves them)."""
    from fedcvr.client.recommender import Recommender

    saved = [f for f in folders if (run_dir / "models" / f.name / "weights.safetensors").is_file()]
    if not saved:
        return
    recommender = Recommender(run_dir / "models" / saved[0].name, saved[0])
    shopper = str(recommender.data.events["user_id"].value_counts().index[0])
    answer = recommender.recommend(shopper, k=k)
    table = Table(title=f"Top {k} for shopper {shopper} of {saved[0].name} (pushed-back model "
                        f"{recommender.version})")
    _recommendation_table(table, answer, recommender.implicit)
    console.print(table)


def _show_served_vs_baselines(run_dir: Path, folders: list[Path]) -> None:
    """The last tables: each merchant's served model beside the baselines it fits alone, on its next baskets."""
    from fedcvr.simulations.served_baselines import served_vs_baselines

    began = time.perf_counter()
    rankers = served_vs_baselines(run_dir, folders, say=lambda text: err_console.print(f"[dim]{text}[/]",
                                                                                        highlight=False))
    if rankers:
        _print_basket_tables("Test split, next basket: each merchant's served model beside the baselines it fits "
                             "alone (simulations/served_baselines.py)", rankers)
        console.print(f"[dim]next-basket comparison in {time.perf_counter() - began:.0f} s[/]", highlight=False)


def _recommendation_table(table: Table, answer: dict, implicit: bool) -> None:
    """The model's ranked items with their scores (one, pPurchase, on a purchase-only shop) and why."""
    scores = ("p_purchase",) if implicit else ("p_ctcvr", "p_ctr", "p_cvr")
    label = {"p_purchase": "pPurchase", "p_ctcvr": "pCTCVR", "p_ctr": "pCTR", "p_cvr": "pCVR"}
    for column in ("item", "title", *scores, "because"):
        table.add_column(label.get(column, column), justify="right" if column in label else "left")
    for item in answer["items"]:
        table.add_row(item["item_id"], item["title"], *(f"{item[s]:.4f}" for s in scores), item["reason"])


@keys_app.command("init")
def keys_init_command(
    folder: Annotated[Path, typer.Argument(help="Where to write the keys (created; must not hold keys already).")],
    superlink_host: Annotated[list[str], typer.Option(
        "--superlink-host", help="A host name or IP address merchants use to reach the SuperLink; repeat for "
                                 "several. The SuperLink's TLS certificate is valid for exactly these.")] = ...,
    merchants: Annotated[int, typer.Option("--merchants", help="Merchant nodes to make key pairs for.")] = ...,
    days: Annotated[int, typer.Option("--days", help="Validity of the certificates in days.")] = 365,
) -> None:
    """Create a CA, the SuperLink's TLS certificate and one EC P-384 key pair per merchant node (for Flower's node
    authentication). Private keys are written with mode 0600; give each merchant ca.pem and its own key."""
    from fedcvr.server.keys import KeysError, init_keys

    try:
        keys = init_keys(folder.expanduser(), superlink_host, merchants, days)
    except KeysError as error:
        _fail(str(error))
    console.print(f"CA: {keys.ca_cert} (private key {keys.ca_key}, keep it offline)")
    console.print(f"SuperLink TLS: {keys.superlink_cert}, {keys.superlink_key} for {', '.join(superlink_host)}")
    console.print(f"{len(keys.merchant_keys)} merchant key pair(s) in {keys.folder / 'merchants'}: give merchant i "
                  "ca.pem and merchants/merchant-ii (private), register merchants/merchant-ii.pub at the SuperLink")


_STREAM_COPY = re.compile(r"^\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2}:[A-Z]+:")
HomeOption = Annotated[Path, typer.Option(
    "--home", help="The coordinator folder: the SuperLink's database (registered merchants, runs) and the connection "
                   "`register` and `run` use.")]


def _warn_insecure() -> None:
    from fedcvr.server.deploy import INSECURE_WARNING

    err_console.print(f"[bold yellow]WARNING:[/] {INSECURE_WARNING}", highlight=False)


def _exec(command: list[str], env: dict[str, str]) -> None:
    """Replace this process with `command` (its PID stays the same: stop it with `kill PID`)."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(command[0], command, env)
    except OSError as err:
        _fail(f"could not start {command[0]}: {err}. Install fedcvr with its dependencies in this environment "
              "(`pip install -e .`).")


@coordinator_app.command("start")
def coordinator_start_command(
    home: HomeOption = Path("coordinator"),
    keys: Annotated[Path | None, typer.Option(
        "--keys", help="The folder `fedcvr keys init` wrote (ca.pem, superlink.pem, superlink.key).")] = None,
    host: Annotated[str, typer.Option(
        "--host", help="Address the merchants' nodes reach the Fleet API on; 0.0.0.0 = every interface.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(
        "--port", help="The merchants' port: it serves the Fleet API alone (what `merchant start --superlink` "
                       "names).")] = 9092,
    control_address: Annotated[str, typer.Option(
        "--control-address", help="HOST:PORT of the Control API (register, run, ls, stop) and the ServerApp's "
                                  "runtime API: keep it on this machine.")] = "127.0.0.1:9093",
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Plaintext without node authentication: only for a test on one machine.")] = False,
) -> None:
    """Start the SuperLink with TLS and merchant node authentication (runtime dependency installation off).

    Merchants' nodes reach the Fleet API alone on HOST:PORT; the Control API, which registers and unregisters
    nodes, and the runtime API listen on --control-address (127.0.0.1 by default), which only this machine
    reaches. Runs in the foreground until stopped (Ctrl-C or `kill PID`); registered merchants and runs are kept
    in HOME/state.db, so a restarted SuperLink knows its merchants."""
    import sys

    from fedcvr.server import deploy
    from fedcvr.shared import deploy as shared_deploy

    if insecure and keys is not None:
        _fail("--insecure turns TLS and node authentication off, but --keys was given: pass one of them")
    if not insecure and keys is None:
        _fail("--keys DIR missing: the SuperLink needs its TLS certificate and the CA from `fedcvr keys init DIR "
              "--superlink-host HOST --merchants N`. For a plaintext test on one machine only, pass --insecure.")
    if not 0 < port < 65536:
        _fail(f"--port {port} is not a port number, e.g. 9092")
    home_dir = deploy.CoordinatorHome(home.expanduser().resolve())
    try:
        control_host, control_port = shared_deploy.parse_address(control_address, "--control-address")
        tls = None if insecure else deploy.TlsFiles.from_keys_dir(keys.expanduser())
        address = deploy.control_address(control_host, control_port, tls.names() if tls else None, port)
        home_dir.folder.mkdir(parents=True, exist_ok=True)
        deploy.write_connection(home_dir, address, tls.ca if tls else None)
    except shared_deploy.DeployError as err:
        _fail(str(err))
    if insecure:
        _warn_insecure()
    if control_host not in deploy.LOOPBACK:
        err_console.print(f"[bold yellow]WARNING:[/] the Control API listens on {address}: anyone who reaches it "
                          "with the CA certificate can register or unregister nodes and stop runs. Keep that "
                          "address behind a firewall that only the coordinator passes.", highlight=False)
    command = deploy.superlink_command(sys.executable, home_dir, tls, (host, port), (control_host, control_port))
    console.print(f"SuperLink ({'TLS + node authentication' if tls else 'PLAINTEXT'}); database "
                  f"{home_dir.database}.\n  merchants' port (Fleet API only, open it to the merchants): {host}:{port}"
                  f"\n  control address (Control + runtime API, this machine only): {address}", highlight=False)
    if tls:
        console.print(f"Merchants connect with --superlink {'|'.join(tls.names())}:{port} --ca {tls.ca}; register "
                      f"each merchant's key: fedcvr coordinator register merchant-NN.pub --home {home_dir.folder}",
                      highlight=False)
    _exec(command, shared_deploy.env_for(home_dir.flwr_home, shared_deploy.flwr_bin_dir()))


@coordinator_app.command("register")
def coordinator_register_command(
    public_key: Annotated[Path, typer.Argument(help="The merchant's public key (merchants/merchant-NN.pub).")],
    home: HomeOption = Path("coordinator"),
) -> None:
    """Register a merchant node's public key at the running SuperLink; only registered nodes may join."""
    import subprocess

    from fedcvr.server import deploy
    from fedcvr.shared import deploy as shared_deploy

    home_dir = deploy.CoordinatorHome(home.expanduser().resolve())
    try:
        key = deploy.check_public_key(public_key.expanduser())
        connection = home_dir.connection()
    except shared_deploy.DeployError as err:
        _fail(str(err))
    if connection.get("insecure"):
        _fail("this SuperLink runs with --insecure, without node authentication: there is nothing to register")
    bin_dir = shared_deploy.flwr_bin_dir()
    env = shared_deploy.env_for(home_dir.flwr_home, bin_dir)
    done = subprocess.run(deploy.register_command(bin_dir, key), env=env, capture_output=True, text=True,
                          check=False)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or "registered successfully" not in output:
        err_console.print(output, highlight=False, markup=False)
        _fail(f"could not register {key} at {connection.get('address')}: see flwr's message above (is the "
              f"SuperLink running? `fedcvr coordinator start --home {home_dir.folder}`)", code=1)
    console.print(output.splitlines()[-1], highlight=False, markup=False)


@coordinator_app.command("run")
def coordinator_run_command(
    out: Annotated[Path, typer.Option(
        "--out", help="Where the ServerApp writes rounds.jsonl, checkpoints, summary.json and the final model "
                      "(on this machine).")] = ...,
    home: HomeOption = Path("coordinator"),
    rounds: Annotated[int | None, typer.Option("--rounds", help="Rounds of training. (default: the app's)")] = None,
    min_nodes: Annotated[int, typer.Option(
        "--min-nodes", help="Merchant nodes to wait for before the first round.")] = 3,
    secagg: Annotated[bool, typer.Option(
        "--secagg", help="Secure aggregation (SecAgg+): the coordinator sees only the sum of the updates.")] = False,
    personalise: PersonaliseOption = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue a stopped run from its last checkpoint: the stopped run's --out folder.")] = None,
    run_config: Annotated[str, typer.Option(
        "--run-config", help="More run config overrides, \"key=value ...\" with TOML values.")] = "",
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="Give up after this many seconds and stop the run. (default: follow it to its end)")] = None,
) -> None:
    """Launch a training run on the deployment (the app's run config + these overrides) and follow it to the end.

    When flwr's log stream ends early the run is followed through its status and rounds; on Ctrl-C, SIGTERM or
    --timeout the run is stopped at the SuperLink (or the exact `flwr stop` command is printed). Exit code 0 when
    the run finished (OUT/summary.json written), 1 when it failed or was stopped, 2 for bad options."""
    import time

    from fedcvr.server import deploy, follow
    from fedcvr.shared import deploy as shared_deploy
    from fedcvr.simulations import launcher as sim

    if rounds is not None and rounds < 1:
        _fail(f"--rounds must be at least 1, got {rounds}")
    if timeout is not None and not timeout > 0:
        _fail(f"--timeout must be a number of seconds > 0, got {timeout}")
    if min_nodes < 1:
        _fail(f"--min-nodes must be at least 1, got {min_nodes}")
    home_dir = deploy.CoordinatorHome(home.expanduser().resolve())
    run_dir = out.expanduser().resolve()
    try:
        connection = home_dir.connection()
        extra = sim.parse_run_config(run_config)
        app_dir = sim.find_app_dir()
        declared = sim.app_run_config(app_dir)
        settings = [sim.Setting("out-dir", str(run_dir)), sim.Setting("min-nodes", min_nodes, "--min-nodes")]
        if rounds is not None:
            settings.append(sim.Setting("num-server-rounds", rounds, "--rounds"))
        if secagg:
            settings.append(sim.Setting("secagg", True, "--secagg"))
        if personalise is not None:
            settings.append(sim.Setting("personalise", personalise,
                                        "--personalise" if personalise else "--no-personalise"))
        if resume is not None:
            from fedcvr.server.checkpoint import CheckpointError, checkpoint_folder

            try:
                settings.append(sim.Setting("resume", str(checkpoint_folder(resume.expanduser().resolve())),
                                            "--resume"))
            except CheckpointError as err:
                raise sim.LaunchError(str(err).replace("resume = ", "--resume ")) from None
        overrides, _ = sim.build_run_config(declared, app_dir, settings, extra, fixed={"out-dir": "--out"},
                                            command="fedcvr coordinator run")
        _check_run_config({**declared, **overrides})
    except (shared_deploy.DeployError, sim.LaunchError, ValueError) as err:
        _fail(str(err))
    if sim.packed_into_app(app_dir, run_dir):
        _fail(f"--out {out} lies inside the Flower App folder {app_dir}: choose a folder outside it (or under runs/)")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = sim.write_run_config(run_dir / sim.RUN_CONFIG_FILE, overrides)
    summary = run_dir / "summary.json"
    started = time.time()
    log_path = run_dir / sim.FLOWER_LOG
    console.print(f"Run on the SuperLink at {connection.get('address')}; Flower's output goes to {log_path}",
                  highlight=False)
    bin_dir = shared_deploy.flwr_bin_dir()
    env = shared_deploy.env_for(home_dir.flwr_home, bin_dir)

    def on_line(text: str) -> None:
        if text and not _STREAM_COPY.match(text):  # flwr streams each log line twice; once is enough
            console.print(text, highlight=False, markup=False)

    ended = follow.run_to_end(deploy.run_command(bin_dir, app_dir, config_file), env, bin_dir, log_path,
                              run_dir / sim.ROUNDS_FILE, on_line=on_line, timeout=timeout,
                              on_note=lambda note: err_console.print(f"[yellow]note:[/] {note}", highlight=False))
    _check_run_ended(ended, deploy.stop_hint(home_dir, bin_dir, ended.run_id), log_path)
    if not summary.is_file() or summary.stat().st_mtime < started:
        _fail(f"the run did not finish (no new {summary}); the end of {log_path}:\n{sim.tail(log_path, 25)}", code=1)
    records, _ = sim.load_history(run_dir)
    if records:
        console.print(sim.rounds_table(records))
        console.print(sim.privacy_line(records), highlight=False)
    console.print(f"[green]done:[/] results in {run_dir}; the final model is in {run_dir / 'model'} and every node "
                  "saved it into its --model-dir", highlight=False)


def _check_run_ended(ended, stop_hint: str, log_path: Path) -> None:
    """Exit 1 with the reason unless the followed run finished: a run given up on says whether it was stopped at
    the SuperLink, or the exact command that stops it."""
    from fedcvr.simulations.launcher import tail

    run = f"run {ended.run_id}" if ended.run_id else "the run"
    if ended.gave_up is not None:
        if ended.stopped:
            _fail(f"{ended.gave_up}: stopped {run} at the SuperLink (status {ended.status or 'unknown'}); resume it "
                  "from its last checkpoint with --resume OUT", code=1)
        said = f" (flwr said: {ended.stop_output})" if ended.stop_output else ""
        err_console.print(f"[bold red]error:[/] {ended.gave_up}: could not stop {run} at the SuperLink{said}; it "
                          "may still be running. Stop it with:", highlight=False)
        err_console.print(f"  {stop_hint}", soft_wrap=True, markup=False, highlight=False)  # one line to copy
        raise typer.Exit(1)
    if ended.run_id is None:
        _fail(f"`flwr run` started no run; the end of {log_path}:\n{tail(log_path, 25)}", code=1)
    if ended.status != "finished:completed":
        details = f": {ended.details}" if ended.details else ""
        _fail(f"{run} ended as {ended.status or 'unknown'}{details}; the end of {log_path}:\n{tail(log_path, 25)}",
              code=1)


@merchant_app.command("start")
def merchant_start_command(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Your merchant data folder (items + events).")] = ...,
    model_dir: Annotated[Path, typer.Option(
        "--model-dir", help="Where the final global model is saved when a run ends (serve from it).")] = ...,
    superlink: Annotated[str, typer.Option("--superlink", help="The coordinator's SuperLink, HOST:PORT.")] = ...,
    ca: Annotated[Path | None, typer.Option("--ca", help="The coordinator's CA certificate (ca.pem).")] = None,
    key: Annotated[Path | None, typer.Option(
        "--key", help="This node's private key (merchants/merchant-NN), registered by the coordinator.")] = None,
    port: Annotated[int, typer.Option(
        "--port", help="Local port of the node's API for its training processes (one per node on a machine).")
    ] = 9094,
    state_dir: Annotated[Path | None, typer.Option(
        "--state-dir", help="Where the node keeps its privacy ledger. (default: MODEL_DIR-state next to "
                            "--model-dir)")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Plaintext without node authentication: only for a test on one machine.")] = False,
) -> None:
    """Validate your data, then start your node (a Flower SuperNode with TLS and node authentication).

    Runs in the foreground until stopped (Ctrl-C or `kill PID`); the node's processes end with it. Your data
    never leaves this machine: the node trains locally with DP-SGD and sends only (masked) weight updates and
    metric sums."""
    from fedcvr.client.deploy import merchant_plan
    from fedcvr.shared.data.contract import DataValidationError
    from fedcvr.shared.deploy import DeployError, env_for, flwr_bin_dir

    try:
        plan = merchant_plan(flwr_bin_dir(), data_dir=data_dir.expanduser(), model_dir=model_dir, superlink=superlink,
                             ca=ca.expanduser() if ca else None, key=key.expanduser() if key else None,
                             insecure=insecure, port=port, state_dir=state_dir)
    except DataValidationError as err:
        err_console.print(str(err), highlight=False, markup=False, soft_wrap=True)
        _fail(f"{data_dir} failed validation (problems above): fix the data, then start the node again. "
              "Nothing was started.")
    except DeployError as err:
        _fail(str(err))
    if insecure:
        _warn_insecure()
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"Merchant {plan.data.name}: {len(plan.data.items):,} items, {len(plan.data.events):,} events "
                  f"validated. Connecting to {superlink}; the final model will be saved to {plan.model_dir}.",
                  highlight=False)
    raise typer.Exit(_run_node(plan, env_for(plan.state_dir / "flwr", flwr_bin_dir())))


def _run_node(plan, env: dict[str, str]) -> int:
    """Run the merchant's SuperNode and its SuperExec until either ends or this process gets SIGTERM/SIGINT;
    both end with this process, also when it is killed. The SuperNode's exit code."""
    import sys

    from fedcvr.shared.processes import ChildGroup

    sys.stdout.flush()
    with ChildGroup() as group:
        node = group.start(plan.command, env=env)
        group.start(plan.superexec_command(sys.executable, node.pid), env=env)
        code = group.wait()
    return node.returncode if node.returncode is not None and node.returncode >= 0 else code


@app.command("experiment")
def experiment_command(
    config: Annotated[Path, typer.Argument(help="An experiment config (TOML), e.g. "
                                                "simulations/experiments/synthetic-default.toml.")],
    out: Annotated[Path, typer.Option("--out", help="Results folder: runs/<run-id>/, results.parquet, "
                                                    "results.csv.")] = ...,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Run only the runs of this setting (centralized, local-only, fedavg, fedprox, fedadam or "
                       "audit); repeat for several. The table still collects every finished run.")] = None,
    report: Annotated[bool, typer.Option(
        "--report/--no-report", help="Write OUT/report.md and its plots (`fedcvr report OUT`) when the runs are "
                                     "done.")] = True,
) -> None:
    """Run a grid of settings x privacy budgets x seeds into a tidy table, then write its report; finished runs
    are skipped, so an interrupted grid resumes where it stopped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedcvr.simulations.experiment import AUDIT, SETTINGS, Experiment, ExperimentError, run_grid

    try:
        experiment = Experiment.from_toml(config.expanduser())
    except ExperimentError as err:
        _fail(str(err))
    unknown = sorted(set(only or ()) - {*SETTINGS, AUDIT})
    if unknown:
        _fail(f"--only {unknown[0]}: not a setting; use one of {', '.join((*SETTINGS, AUDIT))}")
    runs = [run for run in experiment.runs() if not only or run.setting in only]
    console.print(f"Experiment {experiment.name}: {len(runs)} run(s) ({', '.join(experiment.settings)} x "
                  f"{len(experiment.epsilons)} ε x {len(experiment.seeds)} seed(s)), {experiment.rounds} round(s) each",
                  highlight=False)
    with Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[now]}"), console=err_console) as bar:
        task = bar.add_task("runs", total=len(runs), now="")

        def on_run(run, status: str) -> None:
            bar.update(task, now=f"{run.run_id}: {status}")
            if status != "running":
                bar.advance(task)
                err_console.print(f"{run.run_id}: {status}", highlight=False)

        def on_progress(run, text: str) -> None:
            bar.update(task, now=f"{run.run_id}: {text}")

        table = run_grid(experiment, out.expanduser().resolve(), on_run, only=set(only) if only else None,
                         on_progress=on_progress)
    console.print(f"[green]done:[/] {table['run_id'].nunique()} run(s), {len(table):,} rows in "
                  f"{out / 'results.parquet'} and results.csv", highlight=False)
    from fedcvr.simulations.basket_report import rankers

    if not table.empty and rankers(table):  # purchase logs: every setting's model beside the baselines
        _print_basket_tables("Test split, next basket", rankers(table))
    if report and not table.empty:
        _write_report(out)


def _write_report(results: Path) -> None:
    from fedcvr.simulations.report import ReportError, write_report

    try:
        path = write_report(results.expanduser().resolve())
    except ReportError as err:
        _fail(str(err))
    console.print(f"[green]wrote[/] {path} and its plots", highlight=False)


@app.command("report")
def report_command(
    results: Annotated[Path, typer.Argument(help="The --out folder of `fedcvr experiment`.")],
) -> None:
    """Write RESULTS/report.md with PNG plots: privacy-utility curves, convergence, per-merchant gain of
    federating over training alone, and bytes and time per round."""
    _write_report(results)


ModelDirOption = Annotated[Path, typer.Option(
    "--model-dir", help="The model folder: a node's --model-dir after a run, or a run's model/ folder.")]
DataDirOption = Annotated[Path, typer.Option("--data-dir", help="Your merchant data folder (items + events).")]


def _open_recommender(model_dir: Path, data_dir: Path):
    """The merchant's recommender, or exit 2 naming what is wrong (missing files, another encoder, bad data)."""
    from fedcvr.client.recommender import open_recommender
    from fedcvr.shared.data.contract import DataValidationError
    from fedcvr.shared.model.errors import ModelConfigError

    try:
        with err_console.status("loading the model and the item index"):
            return open_recommender(model_dir.expanduser(), data_dir.expanduser())
    except DataValidationError as err:
        err_console.print(str(err), highlight=False, markup=False, soft_wrap=True)
        _fail(f"{data_dir} failed validation (problems above).")
    except ModelConfigError as err:
        _fail(str(err))


@app.command("recommend")
def recommend_command(
    model_dir: ModelDirOption = ...,
    data_dir: DataDirOption = ...,
    user: Annotated[str, typer.Option(
        "--user", help="The shopper: the id in your events table, or, for imported data (the folder has its "
                       "pseudonym.key), the raw id before import.")] = ...,
    k: Annotated[int, typer.Option("-k", "--k", help="How many items.")] = 10,
) -> None:
    """Print the top K items for a shopper with pCTCVR, pCTR and pCVR, sorted by pCTCVR, and why (the history
    items that raise each item's pCTCVR most). A shopper found nowhere gets the cold-start ranking, sorted by the
    popularity it shows, and a note saying so."""
    from fedcvr.shared.data.pseudonym import PseudonymKeyError

    if k < 1:
        _fail(f"-k must be at least 1, got {k}")
    recommender = _open_recommender(model_dir, data_dir)
    try:
        match = recommender.match_shopper(user)
    except PseudonymKeyError as err:
        _fail(str(err))
    if match.user_id is not None:
        console.print(f"shopper {user} found {match.form}", highlight=False, soft_wrap=True)
    answer = recommender.recommend(match.user_id or user, k=k)
    table = Table(title=f"Top {k} for shopper {user} of {recommender.data.name} (model {recommender.version})")
    if answer["cold_start"]:
        for column in ("item", "title", "popularity"):
            table.add_column(column, justify="right" if column == "popularity" else "left")
        for item in answer["items"]:
            table.add_row(item["item_id"], item["title"], f"{item['popularity']:.4f}")
    else:
        _recommendation_table(table, answer, recommender.implicit)
    console.print(table)
    if match.user_id is None:
        console.print(f"[yellow]note:[/] no shopper {user} in the events of {recommender.data.folder} (looked "
                      f"{match.checked}): cold-start ranking, by popularity (purchases per impression, smoothed)",
                      highlight=False, soft_wrap=True)
    elif answer["cold_start"]:
        console.print(f"[yellow]note:[/] shopper {user} has no history here: cold-start ranking, by popularity",
                      highlight=False)


@app.command("serve")
def serve_command(
    model_dir: ModelDirOption = ...,
    data_dir: DataDirOption = ...,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. On any address but loopback, reads "
                                                      "need the API token too.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="The API token's file (made, mode 0600, when missing). Default: "
                             "MODEL_DIR/serve.token.")] = None,
    threads: Annotated[int, typer.Option(
        "--threads", help="CPU threads per request for the model. One keeps the latency tail short (measured: p99 "
                          "6.4 ms with 1 thread, 98 ms with 2 on 2 cores); requests run in parallel anyway.")] = 1,
) -> None:
    """Serve recommendations over HTTP (POST /recommend, POST /score, GET /similar/ID, POST /items, GET /health;
    OpenAPI docs at /docs). POST /items needs the API token as 'Authorization: Bearer <token>'. Runs in the
    foreground until stopped."""
    import ipaddress

    import uvicorn

    from fedcvr.client.api import create_app
    from fedcvr.client.api_guard import load_or_create_token

    if not 0 < port < 65536:
        _fail(f"--port {port} is not a port number, e.g. 8000")
    if threads < 1:
        _fail(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
    recommender = _open_recommender(model_dir, data_dir)
    token_path = (token_file or model_dir / "serve.token").expanduser()
    try:
        token = load_or_create_token(token_path)
    except (OSError, ValueError) as err:
        _fail(f"--token-file: {err}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    health = recommender.health()
    console.print(f"Serving {health['merchant']}: {health['catalog_size']:,} items, model {health['model_version']}"
                  f"{' (item index built)' if recommender.index_built else ''}; docs at http://{host}:{port}/docs",
                  highlight=False)
    console.print(f"API token in {token_path}: POST /items{'' if loopback else ' and every read'} needs the header "
                  "'Authorization: Bearer <token>'", highlight=False, soft_wrap=True)
    uvicorn.run(create_app(recommender, token=token, open_reads=loopback), host=host, port=port, log_level="info")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
