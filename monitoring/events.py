"""Federation events pushed to the operator console over websockets.

Services call `publish_on_commit` inside the transaction of a change, so a
rolled-back change publishes nothing. A failure of the channel layer is
logged and never raised into the write path, because a console that misses
an event catches up from the overview snapshot
(`GET /console/federations/<id>/snapshot`), which it reloads after events,
after a reconnect and every 30 seconds.
"""

import logging
import threading
import time
from typing import Any, TypedDict

from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from monitoring import metrics

logger = logging.getLogger(__name__)

# Every kind an event may have; the console's JavaScript switches on these.
EVENT_KINDS = frozenset(
    {
        "round.opened",
        "round.closed",
        "round.failed",
        "update.accepted",
        "update.rejected",
        "node.enrolled",
        "node.quarantined",
        "node.reinstated",
        "node.revoked",
        "budget.exhausted",
        "model_version.written",
        "federation.status",
    }
)


class FederationEvent(TypedDict):
    """The message sent to a federation's group; `type` routes it to FederationConsumer.federation_event."""

    type: str
    kind: str
    federation_id: int
    payload: dict[str, Any]
    at: str


_overflow_lock = threading.Lock()
# Group name -> (monotonic time of the next allowed warning, drops since the last warning).
_overflow_state: dict[str, tuple[float, int]] = {}


def federation_group_name(federation_id: int) -> str:
    """Return the channel-layer group of a federation's console sockets; the only place the name is built."""
    return f"federation.{int(federation_id)}"


def publish_federation_event(federation_id: int, kind: str, payload: dict[str, Any]) -> None:
    """Send an event to every console socket watching the federation; a failure of the channel layer is logged, not raised.

    Call it from synchronous code outside any transaction, or through
    `publish_on_commit`. The payload must be JSON-safe (strings, numbers,
    lists, dicts), because the Redis layer serialises it.
    """
    if kind not in EVENT_KINDS:
        raise ValueError(f"Unknown event kind {kind!r}; add it to monitoring.events.EVENT_KINDS.")
    layer = get_channel_layer()
    if layer is None:
        return
    group = federation_group_name(federation_id)
    event: FederationEvent = {"type": "federation.event", "kind": kind, "federation_id": int(federation_id), "payload": payload, "at": timezone.now().isoformat()}
    try:
        async_to_sync(layer.group_send)(group, event)
    except ChannelFull:
        report_overflow(group, dropped=1)
    except Exception:
        # Publishing is best effort: the change it reports is already committed.
        logger.error("publishing a federation event failed federation=%s kind=%s", federation_id, kind, exc_info=True)
    else:
        metrics.EVENTS_PUBLISHED.labels(kind=kind).inc()


def publish_on_commit(federation_id: int, kind: str, payload: dict[str, Any] | Any) -> None:
    """Publish the event once the current transaction commits; nothing if it rolls back.

    `payload` may be a callable returning the payload, so values that only
    exist after the commit (or cost queries) are built then.
    """
    transaction.on_commit(lambda: publish_federation_event(federation_id, kind, payload() if callable(payload) else payload))


def report_overflow(group: str, *, dropped: int) -> None:
    """Count events dropped because a socket's queue is full, warning at most once per group per FLO_EVENT_OVERFLOW_LOG_SECONDS.

    A full queue means a console reads slower than events arrive. It
    misses the dropped events and catches up from the snapshot, which it
    reloads at least every 30 seconds.
    """
    metrics.EVENTS_DROPPED.inc(dropped)
    now = time.monotonic()
    with _overflow_lock:
        next_warning_at, pending = _overflow_state.get(group, (0.0, 0))
        pending += dropped
        if now < next_warning_at:
            _overflow_state[group] = (next_warning_at, pending)
            return
        _overflow_state[group] = (now + settings.FLO_EVENT_OVERFLOW_LOG_SECONDS, 0)
    logger.warning(
        "console events dropped, a client queue is full group=%s dropped=%d interval_seconds=%d",
        group,
        pending,
        settings.FLO_EVENT_OVERFLOW_LOG_SECONDS,
    )
