"""What the coordinator and the nodes agree on for secure aggregation (SecAgg+)."""

from __future__ import annotations

from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

MIN_NODES = 3  # with 2 nodes each could recover the other's update from the sum and its own
# Legacy Parameters are an unnamed list: the training instruction's config names the weights in order, and says
# the largest number of examples one update may weigh.
WEIGHT_NAMES_KEY = "secagg-weight-names"
MAX_WEIGHT_KEY = "secagg-max-weight"
# The query a node answers with the size of its training split (the weight of its secure update) is
# `protocol.TRAIN_SIZE`.


def is_secure_instruction(message: Message) -> bool:
    """Whether a training message is a stage of the SecAgg+ protocol (nodes route it through `secaggplus_mod`)."""
    return message.has_content() and RECORD_KEY_CONFIGS in message.content.config_records
