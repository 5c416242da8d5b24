"""`fedcvr simulate`: the whole federation on this machine (Flower's Simulation Engine)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fedcvr.shared import flower_app, run_records

from .common import (
    PersonaliseOption,
    _check_run_config,
    _fail,
    _print_basket_tables,
    _validate_for_run,
    app,
    console,
    err_console,
)


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
        "--strategy", help="Aggregation strategy: fedavg, fedprox or fedadam. (default: the app's strategy)")] = None,
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
    if strategy is not None and strategy.lower() not in flower_app.STRATEGIES:
        _fail(f"--strategy {strategy!r} is not one of {', '.join(flower_app.STRATEGIES)}")
    if dp_epsilon is not None and no_dp:
        _fail("--dp-epsilon sets a privacy budget, --no-dp turns privacy off: pass one of them")
    if dp_epsilon is not None and not dp_epsilon > 0:
        _fail(f"--dp-epsilon must be a number > 0, e.g. 8, got {dp_epsilon}")
    if local_epochs is not None and local_epochs < 1:
        _fail(f"--local-epochs must be at least 1, got {local_epochs}")
    if timeout is not None and not timeout > 0:
        _fail(f"--timeout must be a number of seconds > 0, got {timeout}")
    try:
        extra = flower_app.parse_run_config(run_config)
        app_dir = flower_app.find_app_dir()
        declared = flower_app.app_run_config(app_dir)
    except flower_app.LaunchError as err:
        _fail(str(err))
    run_dir = out.expanduser().resolve()
    if run_dir.exists() and not run_dir.is_dir():
        _fail(f"--out {out} is a file, not a folder: pass a folder path")
    if flower_app.packed_into_app(app_dir, run_dir):
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
        flower_app.Setting("data-root", str(data_root)), flower_app.Setting("out-dir", str(run_dir)),
        flower_app.Setting("num-server-rounds", rounds), flower_app.Setting("min-nodes", len(folders)),
        flower_app.Setting("strategy", (strategy or "fedavg").lower(), "--strategy" if strategy else None),
        flower_app.Setting("dp.enabled", not no_dp, "--no-dp" if no_dp else None),
        flower_app.Setting("seed", 0 if seed is None else seed, None if seed is None else "--seed"),
    ]
    if resume is not None:
        from fedcvr.server.checkpoint import CheckpointError, checkpoint_folder

        try:
            folder = str(checkpoint_folder(resume.expanduser().resolve()))
            settings.append(flower_app.Setting("resume", folder, "--resume"))
        except CheckpointError as err:
            _fail(str(err).replace("resume = ", "--resume "))
    if dp_epsilon is not None:
        settings.append(flower_app.Setting("dp.target-epsilon", float(dp_epsilon), "--dp-epsilon"))
    if local_epochs is not None:
        settings.append(flower_app.Setting("local-epochs", local_epochs, "--local-epochs"))
    if secagg:
        settings.append(flower_app.Setting("secagg", True, "--secagg"))
    if personalise is not None:
        flag = "--personalise" if personalise else "--no-personalise"
        settings.append(flower_app.Setting("personalise", personalise, flag))
    try:
        overrides, notes = flower_app.build_run_config(declared, app_dir, settings, extra)
        _check_run_config({**declared, **overrides})
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file = flower_app.write_run_config(run_dir / flower_app.RUN_CONFIG_FILE, overrides)
    except ValueError as err:  # LaunchError, or a bad run config value (named by key)
        _fail(str(err))
    for note in notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    earlier = [name for name in (flower_app.ROUNDS_FILE, flower_app.HISTORY_FILE, flower_app.HISTORY_CSV)
               if (run_dir / name).exists() and resume is None]
    for name in earlier:
        (run_dir / name).unlink()
    if earlier:
        err_console.print(f"[yellow]note:[/] replaced the results of an earlier run in {run_dir} "
                          f"({', '.join(earlier)})", highlight=False)

    names = ", ".join(f.name for f in folders[:6]) + (", ..." if len(folders) > 6 else "")
    console.print(f"Simulating {len(folders)} merchant node(s) ({names}) for {rounds} round(s); Flower's output goes "
                  f"to {run_dir / flower_app.FLOWER_LOG}", highlight=False)
    seen: list[dict] = []
    try:
        with Progress(TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[last]}"), console=err_console) as bar:
            task = bar.add_task("rounds", total=rounds, last=run_records.progress_text(None))

            def on_round(record: dict) -> None:
                seen.append(record)
                done = record.get("round")
                done = done if isinstance(done, int) and not isinstance(done, bool) else len(seen)
                bar.update(task, completed=min(done, rounds), last=run_records.progress_text(record))

            outcome = sim.launch(run_dir, app_dir, len(folders), config_file, on_round=on_round, timeout=timeout,
                                 bin_dir=bin_dir)
    except flower_app.LaunchError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        err_console.print(f"[bold red]interrupted:[/] the run's Flower processes were stopped; its output is in "
                          f"{run_dir / flower_app.FLOWER_LOG}", highlight=False)
        raise typer.Exit(130) from None

    records, source = run_records.load_history(run_dir)
    if records:
        csv_path = run_records.write_history_csv(records, run_dir / flower_app.HISTORY_CSV)
        console.print(run_records.rounds_table(records))
        console.print(run_records.privacy_line(records), highlight=False)
        console.print(f"wrote {csv_path} ({len(records)} round(s), from {source})", highlight=False)
    else:
        console.print(f"[yellow]note:[/] the ServerApp wrote no round records ({flower_app.ROUNDS_FILE} or "
                      f"{flower_app.HISTORY_FILE}) into {run_dir}, so there is no history.csv", highlight=False)
    if not outcome.ok:
        log_tail = run_records.tail(run_dir / flower_app.FLOWER_LOG, 40)
        if log_tail:
            err_console.print(f"--- last lines of {run_dir / flower_app.FLOWER_LOG}", highlight=False)
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
    merchant's own `Recommender`, printed by the code of `fedcvr recommend`)."""
    from fedcvr.client.recommender import open_recommender

    from .serving import print_recommendations

    saved = [f for f in folders if (run_dir / "models" / f.name / "weights.safetensors").is_file()]
    if not saved:
        return
    recommender = open_recommender(run_dir / "models" / saved[0].name, saved[0])
    shopper = str(recommender.data.events["user_id"].value_counts().index[0])
    print_recommendations(recommender, shopper, k, model="pushed-back model")


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


