"""Websocket consumer that streams a federation's events to the operator console."""

import logging

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from federation.models import Federation
from flo_site.roles import ALL_ROLES, has_role
from monitoring import metrics
from monitoring.events import FederationEvent, federation_group_name

logger = logging.getLogger(__name__)

# Close codes in the private range 4000-4999 (RFC 6455, section 7.4.2).
CLOSE_FORBIDDEN = 4403
CLOSE_INVALID_MESSAGE = 4400


class FederationConsumer(AsyncJsonWebsocketConsumer):
    """One console socket on /ws/federations/<id>/: events out, only pings in.

    Any console role may watch; anonymous users and users without a role are
    rejected during the handshake. The socket joins the federation's group
    and leaves it on every way out: a close from the client, an abrupt
    disconnect, or a send that fails because the client is gone.
    """

    group_name: str | None = None

    async def connect(self):
        federation_id = self.scope["url_route"]["kwargs"]["federation_id"]
        if not await database_sync_to_async(_can_watch)(self.scope.get("user"), federation_id):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.group_name = federation_group_name(federation_id)
        await self.channel_layer.group_add(self.group_name, self.channel_name)
        metrics.WEBSOCKET_CLIENTS.inc()
        await self.accept()

    async def disconnect(self, code):
        await self._leave_group()

    async def receive_json(self, content, **kwargs):
        if content != {"type": "ping"}:
            logger.warning("invalid console message, closing socket group=%s", self.group_name)
            await self.close(code=CLOSE_INVALID_MESSAGE)
            return
        await self.send_json({"kind": "pong"})

    async def federation_event(self, event: FederationEvent):
        message = {"kind": event["kind"], "federation_id": event["federation_id"], "payload": event["payload"], "at": event["at"]}
        try:
            await self.send_json(message)
        except (OSError, RuntimeError) as error:
            # uvicorn raises ClientDisconnected (an OSError) once the client
            # left, and ASGI servers raise RuntimeError for a send after close.
            # websocket.disconnect may never arrive, so leave the group here.
            logger.warning("console socket send failed, leaving group group=%s error=%s", self.group_name, error)
            await self._leave_group()
            raise StopConsumer() from error

    async def _leave_group(self):
        # Idempotent: a failed send and the disconnect that follows both call it.
        if self.group_name is None:
            return
        group_name, self.group_name = self.group_name, None
        metrics.WEBSOCKET_CLIENTS.dec()
        await self.channel_layer.group_discard(group_name, self.channel_name)


def _can_watch(user, federation_id: int) -> bool:
    return has_role(user, *ALL_ROLES) and Federation.objects.filter(id=federation_id).exists()
