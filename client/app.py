"""The fedcvr ClientApp: what runs on each merchant's node. Thin handlers: translate messages, call `node.py`.

- train (`arrays` + `config`): load the global trainable weights, train one local round (DP-SGD by default) and
  reply with the new weights and metrics (num-examples, train-loss, epsilon spent so far with its delta). When
  the privacy budget would be exceeded the node declines: it replies with an error whose reason says so, and
  the server goes on with the others.
- evaluate: reply with the metric sums of the global weights on the local validation split (or the split named
  by config `split`); with config `personalised` (and run config `personalise`), of global + local: the node's
  local layers fine-tuned on its own data first (`personalise.py`); the server adds them up and finalises.
- query `save_model`: save the pushed-back final model into the node's model folder; reply with its version.
- query `train_size`: the size of the training split (the weight of the node's update under secure aggregation).
Under secure aggregation (`secagg = true`) training arrives as the four stages of a SecAgg+ round; `secagg.py`
runs them through Flower's `secaggplus_mod` around the same `train_once`.
Expected problems (data folder, data validation, settings) go back as error replies with the full explanation.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import ERROR
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from fedcvr.shared import protocol
from fedcvr.shared.data.contract import DataValidationError
from fedcvr.shared.privacy import PrivacyLedgerError
from fedcvr.shared.secagg import is_secure_instruction
from fedcvr.shared.settings import SettingsError

from .data_source import DataSourceError, resolve_data_dir
from .secagg import SecureTrainingError, secure_train

# Flower starts a fresh ClientApp process for each message of a deployed node, so this module imports only what
# every message needs (flwr and the protocol): torch, transformers, opacus and pandas come with `node.py`, which
# a handler imports when its message needs the model (3 of a SecAgg+ round's 4 stages never do).

_EXPECTED = (DataSourceError, DataValidationError, SettingsError, PrivacyLedgerError, ValueError)

app = ClientApp()


def _error(message: Message, context: Context, err: Exception | str) -> Message:
    reason = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    log(ERROR, "fedcvr node %s: %s", context.node_id, reason)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def _weights(content: RecordDict) -> dict:
    """A message content's weights as torch tensors. flwr converts only when torch is already imported (it looks in
    sys.modules), which this module leaves to the handlers that need it."""
    import torch  # noqa: F401

    return content[protocol.ARRAYS].to_torch_state_dict()


def train_once(arrays: dict, config: Mapping[str, Any], context: Context) -> tuple[dict | None, dict, str]:
    """One local round on this node's merchant: (new weights or None when declined, metrics, reason)."""
    from .node import ledger_path, node_for, resumed_ledger_path

    folder = resolve_data_dir(context.node_config, context.run_config)
    node = node_for(folder, context.run_config)
    return node.train(arrays, context.state, int(config.get(protocol.SERVER_ROUND, 1)),
                      float(config.get(protocol.PROXIMAL_MU, 0.0)),
                      ledger_file=ledger_path(context.node_config, context.run_config, folder),
                      federation=str(config.get(protocol.FEDERATION_ID, "")),
                      resumed_file=resumed_ledger_path(context.node_config, context.run_config, folder))


def _train_for_secure_round(context: Context):
    def train(arrays: dict, config: Mapping[str, Any]):
        try:
            new, report, reason = train_once(arrays, config, context)
        except _EXPECTED as err:
            log(ERROR, "fedcvr node %s: %s: %s", context.node_id, type(err).__name__, err)
            raise SecureTrainingError(f"{type(err).__name__}: {err}") from err
        if new is None:
            log(ERROR, "fedcvr node %s: %s", context.node_id, protocol.declined_reason(reason))
            raise SecureTrainingError(protocol.declined_reason(reason))
        return new, report
    return train


@app.train()
def train(message: Message, context: Context) -> Message:
    if is_secure_instruction(message):  # a stage of a SecAgg+ round: the same training, a masked update out
        return secure_train(message, context, _train_for_secure_round(context))
    try:
        arrays, report, reason = train_once(_weights(message.content),
                                            message.content[protocol.CONFIG], context)
    except _EXPECTED as err:
        return _error(message, context, err)
    if arrays is None:
        return _error(message, context, protocol.declined_reason(reason))
    return Message(RecordDict({protocol.ARRAYS: ArrayRecord(arrays), protocol.METRICS: MetricRecord(report)}),
                   reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    from .node import node_for

    try:
        node = node_for(resolve_data_dir(context.node_config, context.run_config), context.run_config)
        config = message.content[protocol.CONFIG]
        split = str(config.get(protocol.SPLIT, "validation"))
        rank = bool(config.get(protocol.RANK, True))
        personalised = bool(config.get(protocol.PERSONALISED, False))
        started = time.perf_counter()
        record = node.evaluate(_weights(message.content), split, rank=rank,
                               personalised=personalised and node.settings.personalise.enabled)
        record[protocol.EVALUATE_SECONDS] = time.perf_counter() - started
    except _EXPECTED as err:
        return _error(message, context, err)
    return Message(RecordDict({protocol.METRICS: MetricRecord(record)}), reply_to=message)


@app.query(protocol.SAVE_MODEL)
def save_model(message: Message, context: Context) -> Message:
    from .node import node_for, resolve_model_dir

    try:
        folder = resolve_data_dir(context.node_config, context.run_config)
        node = node_for(folder, context.run_config)
        version = str(message.content[protocol.CONFIG][protocol.MODEL_VERSION])
        target = resolve_model_dir(context.node_config, context.run_config, folder.name)
        saved = node.save_model(_weights(message.content), target, version)
    except _EXPECTED as err:
        return _error(message, context, err)
    return Message(RecordDict({protocol.SAVED: ConfigRecord({protocol.MODEL_VERSION: version,
                                                              protocol.MODEL_DIR: str(saved)})}), reply_to=message)


@app.query(protocol.TRAIN_SIZE)
def train_size(message: Message, context: Context) -> Message:
    """The size of this node's training split: the weight of its update under secure aggregation."""
    from .node import node_for

    try:
        node = node_for(resolve_data_dir(context.node_config, context.run_config), context.run_config)
    except _EXPECTED as err:
        return _error(message, context, err)
    return Message(RecordDict({protocol.SIZE: MetricRecord({protocol.TRAIN_SIZE_KEY: node.train_size()})}),
                   reply_to=message)
