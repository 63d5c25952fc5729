"""Console websockets and federation events: authentication, payloads, cleanup and queue overflow.

Sockets are opened through flo_site.asgi.application with Channels'
WebsocketCommunicator, so the origin check, the session authentication
and the routing are the ones uvicorn serves.
"""

import asyncio
import logging

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.db import database_sync_to_async
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.test import Client

from federation.services.federations import start_federation
from federation.services.nodes import quarantine_node
from flo_site.asgi import application
from flo_site.roles import COMPLIANCE_OFFICER, OPERATOR
from monitoring import events, metrics
from monitoring.channel_layer import ReportingInMemoryChannelLayer
from monitoring.consumers import CLOSE_FORBIDDEN, FederationConsumer
from monitoring.events import federation_group_name, publish_federation_event
from tests.conftest import enrol, make_federation
from tests.console_personas import make_user

ORIGIN = (b"origin", b"http://127.0.0.1")
RECEIVE_TIMEOUT_SECONDS = 5


def session_cookie(user) -> tuple[bytes, bytes]:
    """Log the user in through Django's test client and return the session cookie header; call it outside the event loop."""
    client = Client()
    client.force_login(user)
    cookie = client.cookies[django_settings.SESSION_COOKIE_NAME].value
    return b"cookie", f"{django_settings.SESSION_COOKIE_NAME}={cookie}".encode()


def socket_for(federation_id: int, cookie=None, *, origin=ORIGIN) -> WebsocketCommunicator:
    headers = [(b"host", b"127.0.0.1"), origin, *([cookie] if cookie else [])]
    return WebsocketCommunicator(application, f"/ws/federations/{federation_id}/", headers=headers)


def group_members(federation_id: int) -> set:
    return set(get_channel_layer().groups.get(federation_group_name(federation_id), {}))


@pytest.fixture
def fleet(transactional_db):
    federation = make_federation(min_updates=2)
    return federation, enrol(federation, 3)


def test_anonymous_socket_is_rejected(fleet):
    federation, _ = fleet

    async def scenario():
        communicator = socket_for(federation.id)
        connected, code = await communicator.connect()
        return connected, code

    connected, code = async_to_sync(scenario)()

    assert not connected
    assert code == CLOSE_FORBIDDEN
    assert group_members(federation.id) == set()


def test_socket_without_role_or_federation_is_rejected(fleet):
    federation, _ = fleet
    nobody = session_cookie(make_user("nobody", None))
    officer = session_cookie(make_user("carl", COMPLIANCE_OFFICER))

    async def scenario():
        results = []
        for federation_id, user in [(federation.id, nobody), (federation.id + 1000, officer)]:
            connected, _ = await socket_for(federation_id, user).connect()
            results.append(connected)
        return results

    assert async_to_sync(scenario)() == [False, False]


def test_socket_from_foreign_origin_is_rejected(fleet):
    federation, _ = fleet
    operator = session_cookie(make_user("olivia", OPERATOR))

    async def scenario():
        connected, _ = await socket_for(federation.id, operator, origin=(b"origin", b"https://evil.example")).connect()
        return connected

    assert async_to_sync(scenario)() is False


def test_operator_socket_receives_event_payloads(fleet):
    federation, nodes = fleet
    operator = session_cookie(make_user("olivia", OPERATOR))

    async def scenario():
        communicator = socket_for(federation.id, operator)
        connected, _ = await communicator.connect()
        assert connected
        await database_sync_to_async(start_federation)(federation)
        received = [await communicator.receive_json_from(RECEIVE_TIMEOUT_SECONDS) for _ in range(2)]
        await database_sync_to_async(quarantine_node)(nodes[0].node, reason="odd updates")
        received.append(await communicator.receive_json_from(RECEIVE_TIMEOUT_SECONDS))
        await communicator.send_json_to({"type": "ping"})
        received.append(await communicator.receive_json_from(RECEIVE_TIMEOUT_SECONDS))
        await communicator.disconnect()
        return received

    status, opened, quarantined, pong = async_to_sync(scenario)()

    assert status["kind"] == "federation.status"
    assert status["payload"] == {"status": "running", "reason": ""}
    assert status["federation_id"] == federation.id
    assert opened["kind"] == "round.opened"
    assert opened["payload"]["round"] == 1
    assert opened["payload"]["selected"] == 3
    assert sorted(opened["payload"]["selected_node_ids"]) == sorted(str(signed.node.id) for signed in nodes)
    assert quarantined["kind"] == "node.quarantined"
    assert quarantined["payload"] == {"node_id": str(nodes[0].node.id), "display_name": "device-0", "reason": "odd updates"}
    assert pong == {"kind": "pong"}


def test_socket_closes_on_invalid_message(fleet):
    federation, _ = fleet
    officer = session_cookie(make_user("carl", COMPLIANCE_OFFICER))

    async def scenario():
        communicator = socket_for(federation.id, officer)
        await communicator.connect()
        await communicator.send_json_to({"type": "quarantine", "node": "x"})
        return await communicator.receive_output(RECEIVE_TIMEOUT_SECONDS)

    closed = async_to_sync(scenario)()

    assert closed == {"type": "websocket.close", "code": 4400}


def test_abrupt_disconnect_leaves_group(fleet):
    federation, _ = fleet
    officer = session_cookie(make_user("carl", COMPLIANCE_OFFICER))
    clients_before = metrics.WEBSOCKET_CLIENTS._value.get()

    async def scenario():
        communicator = socket_for(federation.id, officer)
        await communicator.connect()
        members_while_connected = group_members(federation.id)
        # 1006: the connection dropped without a close frame.
        await communicator.disconnect(code=1006)
        return members_while_connected

    members_while_connected = async_to_sync(scenario)()

    assert len(members_while_connected) == 1
    assert group_members(federation.id) == set()
    assert metrics.WEBSOCKET_CLIENTS._value.get() == clients_before


def test_failing_send_leaves_group(fleet, monkeypatch):
    federation, _ = fleet
    officer = session_cookie(make_user("carl", COMPLIANCE_OFFICER))
    clients_before = metrics.WEBSOCKET_CLIENTS._value.get()

    async def send_to_departed_client(self, content, close=False):
        raise OSError("client disconnected")

    async def scenario():
        communicator = socket_for(federation.id, officer)
        await communicator.connect()
        monkeypatch.setattr(FederationConsumer, "send_json", send_to_departed_client)
        await database_sync_to_async(publish_federation_event)(federation.id, "round.failed", {"round": 1, "reason": "test"})
        # The consumer stops after the failed send; waiting for it lets its cleanup finish.
        await communicator.wait(RECEIVE_TIMEOUT_SECONDS)

    async_to_sync(scenario)()

    assert group_members(federation.id) == set()
    assert metrics.WEBSOCKET_CLIENTS._value.get() == clients_before


def test_full_queue_is_bounded_and_warned_once(monkeypatch, caplog, settings):
    settings.FLO_EVENT_OVERFLOW_LOG_SECONDS = 60
    layer = ReportingInMemoryChannelLayer(capacity=2)
    monkeypatch.setattr(events, "get_channel_layer", lambda: layer)
    monkeypatch.setattr(events, "_overflow_state", {})
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(federation_group_name(7), channel)
    dropped_before = metrics.EVENTS_DROPPED._value.get()

    with caplog.at_level(logging.WARNING, logger="monitoring.events"):
        for number in range(10):
            publish_federation_event(7, "round.opened", {"round": number})

    warnings = [record for record in caplog.records if "console events dropped" in record.getMessage()]
    assert layer.channels[channel].qsize() == 2
    assert metrics.EVENTS_DROPPED._value.get() - dropped_before == 8
    assert len(warnings) == 1
    assert "group=federation.7 dropped=1" in warnings[0].getMessage()


def test_overflow_warning_sums_drops_of_interval(monkeypatch, caplog, settings):
    settings.FLO_EVENT_OVERFLOW_LOG_SECONDS = 60
    clock = {"now": 1000.0}
    monkeypatch.setattr(events.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(events, "_overflow_state", {})

    with caplog.at_level(logging.WARNING, logger="monitoring.events"):
        for _ in range(5):
            events.report_overflow("federation.3", dropped=2)
        clock["now"] += 61
        events.report_overflow("federation.3", dropped=1)
        events.report_overflow("federation.4", dropped=1)

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert "group=federation.3 dropped=2" in messages[0]
    assert "group=federation.3 dropped=9" in messages[1]
    assert "group=federation.4 dropped=1" in messages[2]


def test_channel_full_from_layer_is_reported(monkeypatch, caplog):
    class FullLayer:
        async def group_send(self, group, message):
            raise ChannelFull(group)

    monkeypatch.setattr(events, "get_channel_layer", lambda: FullLayer())
    monkeypatch.setattr(events, "_overflow_state", {})

    with caplog.at_level(logging.WARNING, logger="monitoring.events"):
        publish_federation_event(5, "round.opened", {"round": 1})

    assert "group=federation.5 dropped=1" in caplog.records[0].getMessage()


def test_publish_failure_does_not_break_write(fleet, monkeypatch, caplog):
    federation, nodes = fleet

    class BrokenLayer:
        async def group_send(self, group, message):
            raise ConnectionError("redis is down")

    monkeypatch.setattr(events, "get_channel_layer", lambda: BrokenLayer())

    with caplog.at_level(logging.ERROR, logger="monitoring.events"):
        quarantine_node(nodes[0].node)

    nodes[0].node.refresh_from_db()
    assert nodes[0].node.status == "quarantined"
    assert "publishing a federation event failed" in caplog.records[0].getMessage()


def test_rolled_back_change_publishes_nothing(fleet, monkeypatch):
    federation, nodes = fleet
    sent = []
    monkeypatch.setattr(events, "publish_federation_event", lambda *args: sent.append(args))

    with pytest.raises(Exception, match="only an active node can be quarantined"):
        quarantine_node(nodes[0].node)
        quarantine_node(nodes[0].node)

    assert len(sent) == 1


def test_unknown_event_kind_is_rejected():
    with pytest.raises(ValueError, match="Unknown event kind"):
        publish_federation_event(1, "round.exploded", {})


def test_round_close_publishes_evaluation_and_epsilon(fleet, monkeypatch):
    federation, nodes = fleet
    sent = []
    monkeypatch.setattr(events, "publish_federation_event", lambda federation_id, kind, payload: sent.append((kind, payload)))
    start_federation(federation)

    first = nodes[0].submit(round_number=1, num_examples=10, meta_extra={"metrics": {"accuracy": 0.5}})
    second = nodes[1].submit(round_number=1, num_examples=30, meta_extra={"metrics": {"accuracy": 0.9, "loss": 0.2}})

    assert first.status_code == 202
    assert second.status_code == 202
    base_version = federation.model_versions.get(version=0)
    assert base_version.metrics == pytest.approx({"accuracy": 0.8, "loss": 0.2})
    kinds = [kind for kind, _ in sent]
    assert kinds.count("update.accepted") == 2
    assert kinds.index("round.closed") < kinds.index("model_version.written")
    closed = dict(sent)["round.closed"]
    assert closed["round"] == 1
    assert closed["version"] == 1
    assert closed["updates"] == 2
    assert closed["evaluated_version"] == 0
    assert closed["metrics"] == pytest.approx({"accuracy": 0.8, "loss": 0.2})
    assert closed["epsilon"] is None
    assert dict(sent)["round.opened"]["round"] == 2


def test_rejected_update_is_published(fleet, monkeypatch):
    federation, nodes = fleet
    sent = []
    monkeypatch.setattr("federation.api.errors.publish_federation_event", lambda federation_id, kind, payload: sent.append((kind, payload)))
    start_federation(federation)

    response = nodes[0].submit(round_number=7)

    assert response.status_code == 409
    assert sent == [
        ("update.rejected", {"node_id": str(nodes[0].node.id), "display_name": "device-0", "code": "round_not_open", "detail": response.json()["detail"]})
    ]


def test_default_layer_honours_capacity(settings):
    layer = get_channel_layer()

    assert isinstance(layer, ReportingInMemoryChannelLayer)
    assert layer.capacity == settings.CHANNEL_LAYERS["default"]["CONFIG"]["capacity"] == 100


@pytest.mark.integration
def test_redis_layer_honours_capacity_quietly(tmp_path, monkeypatch, caplog):
    from channels_redis.core import RedisChannelLayer

    from tests.live import private_redis

    with private_redis(tmp_path) as (redis_url, _):
        layer = RedisChannelLayer(hosts=[redis_url], capacity=2)
        monkeypatch.setattr(events, "get_channel_layer", lambda: layer)

        async def scenario():
            channel = await layer.new_channel()
            await layer.group_add(federation_group_name(9), channel)
            for number in range(10):
                # Plain sync_to_async: this test has no database, and database_sync_to_async would touch it.
                await sync_to_async(publish_federation_event)(9, "round.opened", {"round": number})
            received = []
            while True:
                try:
                    received.append(await asyncio.wait_for(layer.receive(channel), timeout=0.5))
                except TimeoutError:
                    break
            await layer.flush()
            return received

        with caplog.at_level(logging.INFO):
            received = async_to_sync(scenario)()

    assert [message["payload"]["round"] for message in received] == [0, 1]
    assert [record for record in caplog.records if record.name.startswith("channels_redis")] == []


def test_round_opened_omits_ids_of_large_cohort(fleet, monkeypatch):
    federation, _ = fleet
    sent = []
    monkeypatch.setattr(events, "publish_federation_event", lambda federation_id, kind, payload: sent.append((kind, payload)))
    monkeypatch.setattr("federation.services.rounds.MAX_EVENT_NODE_IDS", 2)

    start_federation(federation)

    opened = dict(sent)["round.opened"]
    assert opened["selected"] == 3
    assert opened["selected_node_ids"] is None
