"""`fedcvr recommend` and `fedcvr serve`: a merchant's recommendations from its model folder."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    DataDirOption,
    ModelDirOption,
    _fail,
    _recommendation_table,
    app,
    console,
    err_console,
)


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
    if k < 1:
        _fail(f"-k must be at least 1, got {k}")
    print_recommendations(_open_recommender(model_dir, data_dir), user, k)


def print_recommendations(recommender, user: str, k: int, model: str = "model") -> None:
    """The top `k` items for shopper `user` as `fedcvr recommend` prints them (matched to the events as given or
    by pseudonym; the cold-start ranking, with a note, for a shopper without history)."""
    from fedcvr.shared.data.pseudonym import PseudonymKeyError

    try:
        match = recommender.match_shopper(user)
    except PseudonymKeyError as err:
        _fail(str(err))
    if match.user_id is not None:
        console.print(f"shopper {user} found {match.form}", highlight=False, soft_wrap=True)
    answer = recommender.recommend(match.user_id or user, k=k)
    table = Table(title=f"Top {k} for shopper {user} of {recommender.data.name} ({model} {recommender.version})")
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
        "--threads", help="CPU threads (torch and BLAS) each worker scores a request with. One keeps the latency "
                          "tail short (measured: p99 6.4 ms with 1 thread, 98 ms with 2 on 2 cores); for parallel "
                          "clients add workers instead.")] = 1,
    workers: Annotated[int, typer.Option(
        "--workers", help="Worker processes answering requests, forked after the recommender is loaded once (shared "
                          "memory): parallel clients are answered on as many cores. One per core is a good start; "
                          "see docs/serving.md.")] = 1,
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
    if not 1 <= workers <= 64:
        _fail(f"--workers must be between 1 and 64, got {workers}")
    from fedcvr.client.workers import bind, limit_threads, serve_forked

    limit_threads(threads if workers == 1 else 1)  # forked workers set theirs after the fork
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
    app = create_app(recommender, token=token, open_reads=loopback)
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level="info")
        return

    try:
        sockets = bind(host, port, workers)
    except OSError as err:
        _fail(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port or --host")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer's threads do not survive a fork

    def run(listening: socket.socket) -> None:
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[listening])

    serve_forked(run, sockets, workers, threads, log=lambda text: console.print(text, highlight=False))
