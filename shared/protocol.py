"""What the coordinator (`server/`) and a merchant's node (`client/`) say to each other: every message type, record
and key, and every reply status. Both sides import these names; neither imports the other. The values are the wire
format: changing one breaks nodes and coordinators of other versions.

Messages (Flower Message API):
  train           records ARRAYS (the global trainable weights) and CONFIG (SERVER_ROUND, PROXIMAL_MU,
                  FEDERATION_ID); reply: ARRAYS (the new weights) and METRICS (NUM_EXAMPLES, TRAIN_LOSS,
                  TRAIN_SECONDS, EPSILON with DELTA under DP), or a DECLINED error (below)
  evaluate        ARRAYS and CONFIG (SPLIT, RANK, PERSONALISED); reply: METRICS, the metric sums of
                  `metrics.py` (the server adds them up and finalises: `metrics.merge_evaluations`) and
                  EVALUATE_SECONDS, the node's own time for the evaluation (not a sum: left out of the merge)
  query.SAVE_MODEL  ARRAYS and CONFIG (MODEL_VERSION); reply: SAVED (MODEL_VERSION, MODEL_DIR)
  query.TRAIN_SIZE  no content; reply: SIZE (TRAIN_SIZE_KEY), the weight of the node's update under SecAgg+
Reply statuses:
  a reply with content              the node did what it was asked
  an error whose reason starts with DECLINED   the node chose not to train this round (privacy budget spent,
                                    no δ worth the name, nothing it can learn from) and spent no privacy: the
                                    round goes on with the others, and the node is not booked as failed
  any other error                   the node failed; the reason says why (data, settings, a crash)
A secure (SecAgg+) round answers the strategy with one aggregated reply whose METRICS carry SECURE_ROUND = 1 and the
round's measured traffic (BYTES_SENT, BYTES_RECEIVED).
"""

from __future__ import annotations

# message types of queries (sent as f"query.{action}")
SAVE_MODEL = "save_model"
TRAIN_SIZE = "train_size"

# records of a message's content
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SAVED = "saved"
SIZE = "size"

# keys of CONFIG
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
FEDERATION_ID = "federation-id"
SPLIT = "split"
RANK = "rank"
PERSONALISED = "personalised"
MODEL_VERSION = "model-version"
MODEL_DIR = "model-dir"

# keys of METRICS in replies
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
EVALUATE_SECONDS = "evaluate-seconds"
EPSILON = "epsilon"
DELTA = "delta"
TRAIN_SIZE_KEY = "train-size"
SECURE_ROUND = "secure-round"
BYTES_SENT = "bytes-sent"
BYTES_RECEIVED = "bytes-received"

# reply statuses
DECLINED = "declined to train"


def declined_reason(why: str) -> str:
    """The error reason of a node that declines a round: DECLINED, then why."""
    return f"{DECLINED}: {why}"


def is_declined(reason: str | None) -> bool:
    """Whether an error reason is a node's DECLINED status (not a failure). Under SecAgg+ the reason reaches the
    coordinator inside the text of the error the secure round reports, so it is looked for anywhere in it."""
    return bool(reason) and DECLINED in reason
