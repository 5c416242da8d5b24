"""A node's side of secure aggregation: a SecAgg+ training stage in, the same local training, a masked update out.

The coordinator's SecAgg+ rounds (server/secagg.py) reach the node as four `train` messages. Flower's
`secaggplus_mod` runs the key exchange and masking; in the stage that needs the update it calls `legacy_fit`,
which turns the legacy instruction (unnamed weights + config) into the same call the plain train handler makes,
and the new weights into the legacy reply the mod masks. Only the masked, quantised vector leaves the node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat

from fedcvr.shared import protocol
from fedcvr.shared.secagg import MAX_WEIGHT_KEY, WEIGHT_NAMES_KEY

if TYPE_CHECKING:  # torch is imported by the one stage that trains: the others answer without it
    import torch

# (weights, instruction config) -> (new weights, metrics); raises with the reason when the node cannot train
TrainFn = Callable[[dict[str, "torch.Tensor"], Mapping[str, Any]],
                   tuple[Mapping[str, "torch.Tensor"], dict[str, Any]]]


class SecureTrainingError(RuntimeError):
    """The node cannot take part in this secure round; the message says why (the round goes on without it)."""


def legacy_fit(message: Message, train: TrainFn) -> Message:
    """The SecAgg+ stage's inner call: legacy fit instruction -> `train` -> legacy fit reply (weights in order)."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    names = str(fitins.config.get(WEIGHT_NAMES_KEY, "")).split("\n")
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(arrays):
        raise SecureTrainingError(f"the instruction names {len(names)} weights but carries {len(arrays)}: the "
                                  "coordinator and this node run different fedcvr versions.")
    import torch

    new, report = train({name: torch.from_numpy(np.array(a)) for name, a in zip(names, arrays, strict=True)},
                        fitins.config)
    missing = [name for name in names if name not in new]
    if missing:
        raise SecureTrainingError(f"the local model has no weights {missing[:3]}: the coordinator and this node "
                                  "use different model settings.")
    weight = int(report.get(protocol.TRAIN_SIZE_KEY, report[protocol.NUM_EXAMPLES]))
    cap = float(fitins.config.get(MAX_WEIGHT_KEY, weight))
    if weight > cap:
        log(WARNING, "This node has %d training examples; its update weighs secagg-max-weight = %g", weight, cap)
        weight = int(cap)
    out = [new[name].detach().cpu().numpy() for name in names]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(out), weight,
                    {k: v for k, v in report.items() if isinstance(v, int | float | str | bool)})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


def secure_train(message: Message, context: Context, train: TrainFn) -> Message:
    """Run one SecAgg+ stage of a training message through Flower's `secaggplus_mod`."""
    return secaggplus_mod(message, context, lambda msg, _ctx: legacy_fit(msg, train))
