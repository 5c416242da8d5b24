"""Researchers' commands: `fedcvr train-central`, `local-only`, `experiment`, `report`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedcvr.shared import flower_app
from fedcvr.shared.evaluation import BASELINES

from .common import (
    PersonaliseOption,
    _fail,
    _print_basket_tables,
    _score,
    _validate_for_run,
    app,
    console,
    err_console,
)

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


@app.command("train-central")
def train_central_command(
    data: Path = typer.Option(..., "--data", help="Marketplace folder (one sub-folder per merchant)."),
    out: Path = typer.Option(..., "--out", help="Model folder to write (weights, config, encoder, metrics)."),
    merchants: str = typer.Option("", "--merchants", help="Comma-separated merchant folder names (default: all)."),
    epochs: int = typer.Option(None, "--epochs", help="Most epochs (early stopping may end sooner). "
                               "[default: the app's train.epochs]"),
    encoder: str = typer.Option(None, "--encoder", help="Local BERT folder. [default: the app's model.encoder; "
                                "\"\" is the packaged all-MiniLM-L6-v2]"),
    adapter_layers: int = typer.Option(None, "--adapter-layers", help="Top layers with adapters (0 = frozen "
                                       "embeddings). [default: the app's adapter.layers]"),
    adapter_size: int = typer.Option(None, "--adapter-size", help="Adapter bottleneck size. "
                                     "[default: the app's adapter.size]"),
    batch_size: int = typer.Option(None, "--batch-size", help="Examples per step. "
                                   "[default: the app's train.batch-size]"),
    lr: float = typer.Option(None, "--lr", help="Adam learning rate, decayed along a cosine. "
                             "[default: the app's train.lr]"),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda. [default: the app's train.device]"),
    seed: int = typer.Option(None, "--seed", help="Seed for initialisation and shuffling. "
                             "[default: the app's train.seed]"),
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
                                               "unless --no-tune). [default: the app's "
                                               "baselines.popularity-days]"),
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
    from fedcvr.shared.flower_app import LaunchError, parse_run_config
    from fedcvr.shared.model.config import ModelConfig, TrainConfig
    from fedcvr.shared.model.errors import ModelConfigError
    from fedcvr.shared.training.personalise import PersonaliseConfig
    from fedcvr.simulations.central import train_central

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
    from fedcvr.simulations.local_only import COMPARED, compare, pooled_next_basket

    run_dir = run.expanduser().resolve()
    config_file = run_dir / flower_app.RUN_CONFIG_FILE
    if not config_file.is_file() or not (run_dir / "model" / "weights.safetensors").is_file():
        _fail(f"--run {run}: not a finished simulation run (need {config_file} and {run_dir / 'model'}); run "
              "`fedcvr simulate ... --out RUN` first")
    run_config = {**flower_app.app_run_config(flower_app.find_app_dir()),
                  **flower_app.flatten(tomllib.loads(config_file.read_text()))}
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

    from fedcvr.simulations.experiment import run_grid
    from fedcvr.simulations.experiment_config import AUDIT, SETTINGS, Experiment, ExperimentError

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


