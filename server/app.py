"""The fedcvr ServerApp: what runs at the coordinator.

`main` runs federated training (`run_training`): wait for `min-nodes` nodes, run the configured strategy
(`strategy.py`) for `num-server-rounds`, evaluate the final model on the nodes' test splits, push it back to every
node (`query.save_model`) and, with a non-empty `out-dir`, write rounds.jsonl, history.json, summary.json (with
`privacy`: the worst (ε, δ) pair of any node over the run, which every node's guarantee meets) and the model folder
`model/`.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedcvr.shared import protocol
from fedcvr.shared.metrics import merge_evaluations
from fedcvr.shared.model.config import ModelConfig
from fedcvr.shared.model.esmm import initial_model
from fedcvr.shared.model.folder import save_model_folder
from fedcvr.shared.model.weights import load_trainable_state, trainable_state
from fedcvr.shared.object_pulls import REMOTE, faster_object_pulls
from fedcvr.shared.training.personalise import PersonaliseConfig

from .checkpoint import Checkpoint, check_fits, load_checkpoint, save_checkpoint
from .config import ServerConfig
from .pacing import PacedGrid, check_progress
from .secagg import SecAggGrid
from .strategy import RoundBook, make_strategy, run_privacy

POLL_SECONDS = 1.0

app = ServerApp()


class NodesError(RuntimeError):
    """Too few nodes connected to start."""


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float, *, sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> list[int]:
    """The connected node ids once at least `min_nodes` are connected; NodesError after `timeout` seconds."""
    deadline = clock() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes:
            return nodes
        if clock() >= deadline:
            raise NodesError(
                f"only {len(nodes)} node(s) connected within round-timeout = {timeout:g} s, but min-nodes "
                f"= {min_nodes}: start more SuperNodes (in simulation raise num-supernodes), lower "
                "min-nodes, or raise round-timeout.")
        log(INFO, "Waiting for nodes: %d connected, min-nodes = %d", len(nodes), min_nodes)
        sleep(POLL_SECONDS)


def push_back(grid: Grid, arrays: ArrayRecord, version: str, timeout: float) -> dict[int, str]:
    """Send the final global model to every node; each saves it into its model folder. node -> saved version
    (or the error)."""
    nodes = sorted(grid.get_node_ids())
    content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: ConfigRecord({protocol.MODEL_VERSION: version})})
    messages = [Message(content, dst_node_id=node, message_type=f"query.{protocol.SAVE_MODEL}") for node in nodes]
    saved: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            saved[node] = f"error: {reply.error.reason}"
            log(ERROR, "Node %s did not save the model: %s", node, reply.error.reason)
        else:
            record = reply.content.config_records[protocol.SAVED]
            saved[node] = str(record[protocol.MODEL_VERSION])
            log(INFO, "Node %s saved model %s to %s", node, record["model-version"], record["model-dir"])
    return saved


def model_version(arrays: ArrayRecord) -> str:
    """A content hash of the global weights: the same weights always get the same version."""
    digest = hashlib.sha256()
    for name, array in sorted(arrays.to_torch_state_dict().items()):
        digest.update(name.encode())
        digest.update(array.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def final_arrays(result_arrays: ArrayRecord, initial: ArrayRecord, rounds: int) -> ArrayRecord:
    """The global model after `strategy.start`: its result's arrays, or `initial` (what this start began from, the
    checkpoint's weights on a resume) when no round aggregated an update. Flower's Result then holds an EMPTY
    ArrayRecord, not None: taking it for the model sent empty weights to the nodes' test evaluation and failed
    the run at the end ("the weights do not fit this model (missing: head.ctr.0.bias, ...)")."""
    if len(result_arrays) > 0:
        return result_arrays
    if rounds > 0:
        log(WARNING, "No round of %d produced an update (every node failed, declined or did not answer within "
            "round-timeout; see the rounds above): the global model stays as it was", rounds)
    return initial


def _resume_from(config: ServerConfig, initial: ArrayRecord) -> Checkpoint | None:
    if config.resume is None:
        return None
    checkpoint = load_checkpoint(config.resume)
    check_fits(checkpoint, strategy=config.strategy, num_server_rounds=config.num_server_rounds,
               initial=initial.to_torch_state_dict(), source=config.resume)
    log(INFO, "Resuming from %s: round %d of %d done", config.resume, checkpoint.round, config.num_server_rounds)
    return checkpoint


def run_training(grid: Grid, run_config: dict, config: ServerConfig, context: Context | None = None,
                 on_round: Callable[[dict], None] | None = None) -> dict:
    """Federated training: rounds of the chosen strategy (a checkpoint after each), a final test evaluation,
    push-back of the model. With `resume`, continue from the stopped run's last checkpoint. With `secagg`, each
    round's training runs under SecAgg+ (`secagg.py`); everything else is the same. `on_round` gets each round's
    row (as written to rounds.jsonl) once the round is done."""
    context = context or Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    grid = PacedGrid(grid, config.round_timeout)  # waits follow the time the nodes take (`pacing.py`)
    model, backbone = initial_model(ModelConfig.from_run_config(run_config), config.seed)
    initial = ArrayRecord(trainable_state(model))
    resumed = _resume_from(config, initial)  # before waiting for nodes: a bad checkpoint fails at once
    nodes = wait_for_nodes(grid, config.min_nodes, config.round_timeout)
    log(INFO, "Training with %d node(s), strategy %s, %d round(s), aggregation %s%s", len(nodes), config.strategy,
        config.num_server_rounds, config.aggregation,
        ", secure aggregation (SecAgg+)" if config.secagg.enabled else "")
    log(INFO, "One update carries %d trainable weights (%.2f MB); the frozen encoder never travels",
        sum(p.numel() for p in model.trainable_parameters()), initial.count_bytes() / 1e6)
    done = resumed.round if resumed else 0
    federation = resumed.federation if resumed else uuid.uuid4().hex[:16]
    book = RoundBook(config.out_dir, offset=done)
    strategy = make_strategy(config.strategy, book, fraction_train=config.fraction_train,
                             fraction_evaluate=config.fraction_evaluate, min_nodes=config.min_nodes,
                             proximal_mu=config.proximal_mu, server_lr=config.server_lr, seed=config.seed,
                             aggregation=config.aggregation, aggregation_trim=config.aggregation_trim,
                             reject_norm_factor=config.reject_norm_factor, round_timeout=config.round_timeout,
                             secure=config.secagg.enabled)
    if resumed:
        initial = ArrayRecord(resumed.arrays)
        book.rows = list(resumed.history)
        strategy.load_optimizer_state(resumed.optimizer)
    if config.out_dir is not None:
        config.out_dir.mkdir(parents=True, exist_ok=True)
        (config.out_dir / "rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in book.rows))

        def write_checkpoint(row: dict) -> None:
            arrays = book.arrays if book.arrays is not None else initial
            save_checkpoint(config.out_dir, Checkpoint(
                round=int(row["round"]), strategy=config.strategy, federation=federation,
                planned_rounds=config.num_server_rounds, arrays=arrays.to_torch_state_dict(),
                optimizer=strategy.optimizer_state(), history=book.rows))

        book.on_round = write_checkpoint
    if on_round is not None:
        then = book.on_round

        def after_round(row: dict) -> None:
            if then is not None:
                then(row)
            on_round(row)

        book.on_round = after_round
    recorded = book.on_round

    def stop_when_stalled(row: dict) -> None:  # after the checkpoint: a stopped run resumes from it
        if recorded is not None:
            recorded(row)
        check_progress(book.rows, config.round_timeout)

    book.on_round = stop_when_stalled
    train_grid = SecAggGrid(grid, config.secagg, context) if config.secagg.enabled else grid
    result = strategy.start(grid=train_grid, initial_arrays=initial, num_rounds=config.num_server_rounds - done,
                            timeout=config.round_timeout,
                            train_config=ConfigRecord({protocol.FEDERATION_ID: federation}),
                            evaluate_config=ConfigRecord({protocol.SPLIT: "validation",
                                                          protocol.RANK: config.rank_validation}))
    final = final_arrays(result.arrays, initial, config.num_server_rounds - done)
    shown = ("ctcvr.auc", "click.auc", "ndcg@10", "nb.all.ndcg@10")

    def test_on_nodes(personalised: bool) -> dict:
        """The final model's merged test metrics on the nodes (with `personalised`: global + local)."""
        messages = strategy.configure_evaluate(config.num_server_rounds - done, final, ConfigRecord(
            {protocol.SPLIT: "test", **({protocol.PERSONALISED: True} if personalised else {})}), grid)
        replies = [r for r in grid.send_and_receive(messages, timeout=config.round_timeout) if not r.has_error()]
        merged = merge_evaluations([dict(r.content[protocol.METRICS]) for r in replies]) if replies else {}
        log(INFO, "%s on the nodes' test splits: %s",
            "Global + local (personalised on each node)" if personalised else "Final global model",
            ", ".join(f"{k} {v:.4f}" for k, v in merged.items() if k in shown))
        return merged

    test = test_on_nodes(False)
    # global + local: each node's local layers tuned first
    test_personalised = test_on_nodes(True) if PersonaliseConfig.from_run_config(run_config).enabled else {}
    version = model_version(final)
    saved = push_back(grid, final, version, config.round_timeout)
    summary = {"strategy": config.strategy, "rounds": book.rows, "test": test,
               "test_personalised": test_personalised, "model_version": version,
               "privacy": run_privacy(book.rows), "federation": federation, "resumed_from_round": done,
               "saved_by_nodes": {str(k): v for k, v in saved.items()}}
    if config.out_dir is not None:
        load_trainable_state(model, final.to_torch_state_dict())
        save_model_folder(config.out_dir / "model", model, backbone, {"version": version, "strategy": config.strategy},
                          {"test": test, "history": book.rows})
        (config.out_dir / "history.json").write_text(json.dumps(book.rows, indent=2) + "\n")
        (config.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    faster_object_pulls(*REMOTE)  # replies' contents not yet at the SuperLink: asked again within 0.05-0.5 s
    run_training(grid, dict(context.run_config), ServerConfig.from_run_config(context.run_config), context)
