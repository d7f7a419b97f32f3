"""common/amqp.py: one socket write per event-loop turn, and publish/ack frames byte for byte as pamqp's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from common import amqp
from common.amqp import CoalescingWriter


class Peer:
    """A real TCP server that keeps everything it receives."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = asyncio.Event()

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.received += data
        self.closed.set()
        writer.close()


@pytest.fixture
async def connected() -> AsyncIterator[tuple[Peer, CoalescingWriter, list[bytes]]]:
    """A CoalescingWriter on a real socket, and the list of what reached its transport, call by call."""
    peer = Peer()
    server = await asyncio.start_server(peer.on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, "127.0.0.1", port)
    calls: list[bytes] = []
    send = transport.write

    def record(data: bytes) -> None:
        calls.append(bytes(data))
        send(data)

    transport.write = record  # type: ignore[method-assign]
    writer = CoalescingWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
    yield peer, writer, calls
    writer.close()
    server.close()
    await server.wait_closed()


async def test_writes_of_one_turn_leave_in_one_transport_write_in_order(connected) -> None:
    peer, writer, calls = connected
    writer.write(b"publish;")
    writer.writelines([b"header;", b"body;"])
    writer.write(b"ack;")
    assert calls == []  # nothing has left during this turn
    await asyncio.sleep(0)
    assert calls == [b"publish;header;body;ack;"]
    writer.close()
    await asyncio.wait_for(peer.closed.wait(), 5)
    assert bytes(peer.received) == b"publish;header;body;ack;"


async def test_writes_of_later_turns_leave_separately(connected) -> None:
    _, writer, calls = connected
    writer.write(b"first")
    await asyncio.sleep(0)
    writer.write(b"second")
    await asyncio.sleep(0)
    assert calls == [b"first", b"second"]


async def test_drain_sends_pending_writes_at_once(connected) -> None:
    _, writer, calls = connected
    writer.write(b"close-ok")
    await writer.drain()
    assert calls == [b"close-ok"]
    await asyncio.sleep(0)
    assert calls == [b"close-ok"]  # the turn's flush finds nothing left


async def test_close_sends_pending_writes_before_eof(connected) -> None:
    peer, writer, _ = connected
    writer.write(b"connection.close")
    writer.close()
    await asyncio.wait_for(peer.closed.wait(), 5)
    assert bytes(peer.received) == b"connection.close"


# -- frames encoded below aiormq ----------------------------------------------------------------

def pamqp_publish(channel: int, exchange: str, routing_key: str, body: bytes, properties: dict, mandatory: bool,
                  frame_max: int = amqp.DEFAULT_FRAME_MAX) -> bytes:
    """What aiormq's basic_publish sends for the same message."""
    step = frame_max - amqp.FRAME_OVERHEAD
    frames = [spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
              ContentHeader(properties=spec.Basic.Properties(**properties), body_size=len(body)),
              *(ContentBody(body[start:start + step]) for start in range(0, len(body), step))]
    return ChannelFrame.marshall(channel, frames).payload


@pytest.mark.parametrize(("channel", "exchange", "routing_key", "body", "properties", "mandatory"), [
    pytest.param(1, "", "dispatcher.model.llama", b'{"priority":7}',
                 {"priority": 7, "correlation_id": "9f2c-17", "reply_to": "amq.rabbitmq.reply-to",
                  "expiration": "569998", "message_id": "9f2c-17", "delivery_mode": 1}, True, id="grant-request"),
    pytest.param(2, "", "amq.rabbitmq.reply-to.g1h2AA==.abc", b'{"lease":"c-1","url":"http://10.0.0.7:8000"}',
                 {"correlation_id": "9f2c-17", "delivery_mode": 1, "message_id": "c-1"}, False, id="grant"),
    pytest.param(3, "", "dispatcher.release.c", b'{"leases":["c-1","c-2"]}', {"delivery_mode": 1}, False,
                 id="release"),
    pytest.param(65535, "dispatcher.models", "", b"", {}, False, id="empty-body-no-properties"),
    pytest.param(1, "", "q", "é".encode() * 40, {"priority": 0, "expiration": "0"}, True, id="zero-values-utf8"),
])
def test_publish_frames_are_pamqps_byte_for_byte(channel, exchange, routing_key, body, properties, mandatory) -> None:
    assert amqp.encode_publish(channel, exchange, routing_key, body, properties, mandatory=mandatory) == \
        pamqp_publish(channel, exchange, routing_key, body, properties, mandatory)


def test_publish_body_is_split_at_the_frame_size() -> None:
    body = bytes(range(256)) * 10
    encoded = amqp.encode_publish(1, "", "q", body, {}, frame_max=1000)
    assert encoded == pamqp_publish(1, "", "q", body, {}, False, frame_max=1000)
    assert encoded.count(b"\x03\x00\x01\x00\x00\x03\xe0") == 2  # two full body frames of 992 bytes, then the rest


def test_ack_frame_is_pamqps_byte_for_byte() -> None:
    assert amqp.encode_ack(7, 2**40 + 3) == ChannelFrame.marshall(7, [spec.Basic.Ack(delivery_tag=2**40 + 3)]).payload


@pytest.mark.parametrize(("routing_key", "properties", "message"), [
    pytest.param("q" * 256, {}, "255 bytes", id="routing-key-too-long"),
    pytest.param("q", {"headers": {"x": 1}}, "not encoded here", id="unknown-property"),
])
def test_publish_refuses_what_it_cannot_encode(routing_key, properties, message) -> None:
    with pytest.raises(ValueError, match=message):
        amqp.encode_publish(1, "", routing_key, b"", properties)


@pytest.mark.parametrize(("failures", "low", "high"), [
    pytest.param(0, 0.05, 0.1, id="just-lost"),
    pytest.param(1, 0.1, 0.2, id="first-failure"),
    pytest.param(3, 0.4, 0.8, id="doubling"),
    pytest.param(4, 0.75, 1.5, id="capped"),
    pytest.param(10_000, 0.75, 1.5, id="long-outage"),
])
def test_reconnect_delay_doubles_up_to_its_cap_with_jitter(failures: int, low: float, high: float) -> None:
    """A service is back within 1.5 s of its broker, and the services of a cluster do not retry in step."""
    delays = [amqp.reconnect_delay(failures) for _ in range(200)]
    assert all(low <= delay <= high for delay in delays), (min(delays), max(delays))
    assert len(set(delays)) > 100  # jittered, not one fixed pause
