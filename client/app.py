"""The fedcvr ClientApp: what runs on each merchant's node.

For now it answers the data census (`query.census` messages): it finds the merchant's data folder
(`client/data_source.py`), validates and counts it (`shared/census.py`) and replies with a MetricRecord of
sums under the key "census". Problems with the data or its location are expected: they go back to the
server as an error reply whose reason is the full explanation (e.g. every DataValidationError problem), and
are logged on the node as well; anything else raises, and flwr reports it to the server with its type.
"""

from __future__ import annotations

from logging import ERROR

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from fedcvr.shared.census import CENSUS_ACTION, CENSUS_RECORD, local_census
from fedcvr.shared.data.contract import DataValidationError

from .data_source import DataSourceError, resolve_data_dir

app = ClientApp()


@app.query(CENSUS_ACTION)
def census(message: Message, context: Context) -> Message:
    """Reply to a census message: the counts of this node's merchant data, or an error with the reason."""
    try:
        folder = resolve_data_dir(context.node_config, context.run_config)
        counts = local_census(folder)
    except (DataSourceError, DataValidationError) as err:
        reason = f"{type(err).__name__}: {err}"
        log(ERROR, "fedcvr census failed on node %s: %s", context.node_id, reason)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
    return Message(RecordDict({CENSUS_RECORD: MetricRecord(counts)}), reply_to=message)
