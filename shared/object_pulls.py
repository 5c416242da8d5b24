"""How soon a Flower process retries a message's contents that have not arrived yet.

In Flower 1.42 a message travels as a small header and its contents (records, weights) as separate objects. A
receiver often sees the header before the sender has pushed the contents: the coordinator pushes a message and
then its objects, a SuperNode stores the header and then pulls the objects from the SuperLink, a ClientApp process
is started on the header and then pulls the objects from its SuperNode. Each pull of an object not there yet is
retried after 1 s, 2 s, 4 s ... (`flwr.supercore.constant.PULL_INITIAL_BACKOFF`, doubling to 10 s), and each hop
adds its own wait: in the loopback deployment a message took about 7 s from the ClientApp's start to its first line
of work, almost all of it spent waiting.

`faster_object_pulls(first, cap)` makes this process retry after `first` seconds, doubling to at most `cap`
(Flower's limits on tries and total time unchanged). fedcvr calls it in the processes it starts itself: a
merchant's SuperNode and its ClientApp processes (`client/supernode.py`, `client/superexec.py`) and the
coordinator's ServerApp (`server/app.py`). A retry is one small request to a process on the same machine (ClientApp
to SuperNode) or to the SuperLink; the caps bound how often.
"""

from __future__ import annotations

LOCAL = (0.02, 0.1)  # a ClientApp asking its own SuperNode: first retry, longest wait (seconds)
REMOTE = (0.05, 0.5)  # a SuperNode or the ServerApp asking the SuperLink


def faster_object_pulls(first: float, cap: float) -> bool:
    """Retry missing message contents after `first` s, doubling to `cap` s, in this process. False where this
    Flower has no such retry (nothing changed)."""
    try:
        from flwr.supercore.inflatable import inflatable_utils
    except ImportError:
        return False
    changed = False
    for function in (getattr(inflatable_utils, "pull_objects", None),
                     getattr(inflatable_utils, "pull_and_inflate_object_from_tree", None)):
        defaults = getattr(function, "__kwdefaults__", None)
        if defaults and "initial_backoff" in defaults and "backoff_cap" in defaults:
            defaults["initial_backoff"], defaults["backoff_cap"] = first, cap
            changed = True
    return changed
