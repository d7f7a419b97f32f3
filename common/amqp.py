"""The broker connection both services open, and the two hot AMQP operations, done below aiormq.

aiormq is the AMQP client: connection, channels, declares, consumers, confirms, returns, closing.
Two things it does on every request cost more than the rest of the dispatcher's RPC (py-spy and
cProfile, bench/RESULTS.md), and are done here instead:

- Socket writes. aiormq's writer task hands every frame group to the socket at once, so a grant
  and its ack, or the grant requests of one event-loop turn, each cost a send() of their own.
  `connect()` gives aiormq (through its `transport_factory` hook) a `CoalescingWriter`, which
  gathers what is written during one turn and sends it in one call at the end of that turn.
- basic.publish and basic.ack. aiormq's `basic_publish` takes a lock, a timeout, two context
  managers, pamqp's generic encoder and a bounded write queue read by another task: ≈ 70 µs of CPU
  for a confirmed publish of a 20-byte body. `FastChannel` encodes the frames of our few message
  shapes itself (byte for byte what pamqp would send; unit-tested against it) and writes them to the
  `CoalescingWriter` at once. For a channel with publisher confirms it registers the delivery tag in
  the channel's own tables, exactly as `basic_publish` does, so aiormq still resolves the confirm,
  turns a basic.return into `PublishError`, and fails the confirm when the channel closes.

Order: frames written here and frames aiormq queues for the same channel can be reordered only
against aiormq's unawaited writes; the services await every other operation on these channels.
aiormq is pinned (requirements.txt); `tests/unit/test_amqp.py` compares the frames with pamqp's,
and `tests/integration/test_amqp_channel.py` checks confirms and returns through aiormq's tables
against RabbitMQ, so an upgrade that changes them fails there.
"""

from __future__ import annotations

import asyncio
import random
import struct
from typing import TYPE_CHECKING, Any

import aiormq
from aiormq.connection import TransportFactory
from aiormq.exceptions import AMQPConnectionError, ChannelInvalidStateError

if TYPE_CHECKING:
    from yarl import URL


class CoalescingWriter(asyncio.StreamWriter):
    """A StreamWriter whose writes of one event-loop turn leave in one transport write."""

    def __init__(self, transport: asyncio.WriteTransport, protocol: asyncio.StreamReaderProtocol,
                 reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._turn_loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._turn_loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        """Sends what this turn wrote; a no-op when it has gone already."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if not self.transport.is_closing():
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    async def drain(self) -> None:
        self.flush()
        await super().drain()

    def write_eof(self) -> None:
        self.flush()
        super().write_eof()

    def close(self) -> None:
        self.flush()
        super().close()


class CoalescingTransportFactory(TransportFactory):
    """aiormq's TCP and TLS transports, with a CoalescingWriter (what asyncio.open_connection does)."""

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ssl_context_provider = kwargs.pop("ssl_context_provider")
        ssl = await ssl_context_provider.get_context() if url.scheme == "amqps" else None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.create_connection(lambda: protocol, url.host, url.port, ssl=ssl, **kwargs)
        except OSError as exc:
            raise AMQPConnectionError(*exc.args) from exc
        self.writer = CoalescingWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
        return reader, self.writer


class Connection:
    """An open aiormq connection and the writer of its socket."""

    def __init__(self, connection: aiormq.abc.AbstractConnection, writer: CoalescingWriter) -> None:
        self.aiormq = connection
        self.writer = writer

    async def channel(self, *, publisher_confirms: bool = True) -> FastChannel:
        channel = await self.aiormq.channel(publisher_confirms=publisher_confirms)
        frame_max = self.aiormq.connection_tune.frame_max if self.aiormq.connection_tune else 0
        return FastChannel(channel, self.writer, frame_max or DEFAULT_FRAME_MAX)


async def connect(url: str) -> Connection:
    """An open aiormq connection whose frames of one event-loop turn share one socket write."""
    factory = CoalescingTransportFactory()
    async with asyncio.timeout(CONNECT_TIMEOUT_S):  # a broker still starting may accept and stay silent
        connection = await aiormq.connect(url, transport_factory=factory)
    return Connection(connection, factory.writer)


# ---------------------------------------------------------------------------------------------
# Reconnecting: both services keep one connection, and get it back quickly after a broker restart

CONNECT_TIMEOUT_S = 10.0
RECONNECT_DELAY_FIRST_S = 0.1
# The longest pause between two attempts: the service is back at most this long after the broker.
RECONNECT_DELAY_MAX_S = 1.5


def reconnect_delay(failures: int) -> float:
    """The pause before the next attempt after `failures` failed ones in a row (0: the connection was
    just lost). It doubles from 0.1 s up to 1.5 s, so that a service is back within 1.5 s of its broker
    (after a restart every service reconnects at once, and a refused TCP connect costs the broker
    nothing); jitter, a random half of each pause, spreads the senders and consumers of a cluster
    apart so that they do not knock on the broker in step."""
    ceiling = min(RECONNECT_DELAY_MAX_S, RECONNECT_DELAY_FIRST_S * 2 ** min(failures, 16))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


async def wait_closed(connection: aiormq.abc.AbstractConnection, *channels: aiormq.abc.AbstractChannel) -> None:
    """Returns when the connection or one of `channels` closes; raises the reason if there is one.

    A channel can be closed by the broker while its connection lives on: a service that watched
    only the connection would keep publishing on a dead channel."""
    watchers = [connection.closing, *(channel.closing for channel in channels)]
    try:
        done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for watcher in watchers:
            watcher.cancel()  # an observer only (aiormq `closing`); the resource is closed by its owner
    for watcher in done:
        if not watcher.cancelled() and watcher.exception() is not None:
            raise watcher.exception()  # type: ignore[misc]
    raise ChannelInvalidStateError("closed by the broker")


# ---------------------------------------------------------------------------------------------
# basic.publish and basic.ack, encoded here (AMQP 0-9-1 §4.2.3 frames, §4.2.6 content, class 60)

FRAME_METHOD, FRAME_HEADER, FRAME_BODY = 1, 2, 3
FRAME_END = b"\xce"
FRAME_OVERHEAD = 8  # type, channel, size, end
DEFAULT_FRAME_MAX = 131072
BASIC_PUBLISH = struct.pack(">HHH", 60, 40, 0)  # class basic, method publish, reserved ticket
BASIC_ACK = struct.pack(">HH", 60, 80)
# The basic properties the dispatcher sets, in wire order, with their flag bits (AMQP 0-9-1 §4.2.6.1)
PROPERTY_FLAGS = {"delivery_mode": 1 << 12, "priority": 1 << 11, "correlation_id": 1 << 10,
                  "reply_to": 1 << 9, "expiration": 1 << 8, "message_id": 1 << 7}
OCTET_PROPERTIES = frozenset({"delivery_mode", "priority"})


def shortstr(value: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(data),)) + data


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + FRAME_END


def encode_publish(channel: int, exchange: str, routing_key: str, body: bytes, properties: dict[str, Any], *,
                   mandatory: bool = False, frame_max: int = DEFAULT_FRAME_MAX) -> bytes:
    """The method, header and body frames of one basic.publish. `properties` may name only
    PROPERTY_FLAGS (None values are left out), so nothing we do not know how to encode is dropped."""
    unknown = properties.keys() - PROPERTY_FLAGS.keys()
    if unknown:
        raise ValueError(f"properties not encoded here: {sorted(unknown)}")
    flags = 0
    values = []
    for name, bit in PROPERTY_FLAGS.items():
        value = properties.get(name)
        if value is not None:
            flags |= bit
            values.append(bytes((value,)) if name in OCTET_PROPERTIES else shortstr(value))
    method = BASIC_PUBLISH + shortstr(exchange) + shortstr(routing_key) + (b"\x01" if mandatory else b"\x00")
    header = struct.pack(">HHQH", 60, 0, len(body), flags) + b"".join(values)
    parts = [frame(FRAME_METHOD, channel, method), frame(FRAME_HEADER, channel, header)]
    step = frame_max - FRAME_OVERHEAD
    parts += [frame(FRAME_BODY, channel, body[start:start + step]) for start in range(0, len(body), step)]
    return b"".join(parts)


def encode_ack(channel: int, delivery_tag: int) -> bytes:
    return frame(FRAME_METHOD, channel, BASIC_ACK + struct.pack(">QB", delivery_tag, 0))


class FastChannel:
    """An aiormq channel, with basic.publish and basic.ack written straight to the socket writer.

    Everything else is aiormq's: `.aiormq` is the channel itself.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel, writer: CoalescingWriter, frame_max: int) -> None:
        self.aiormq = channel
        self._writer = writer
        self._frame_max = frame_max

    def basic_publish(self, body: bytes, *, routing_key: str, exchange: str = "", mandatory: bool = False,
                      **properties: Any) -> asyncio.Future[Any] | None:
        """Writes the publish in this event-loop turn. On a channel with publisher confirms, returns
        the confirmation (aiormq's: it raises PublishError when a mandatory message came back)."""
        channel: Any = self.aiormq
        if channel.is_closed:
            raise ChannelInvalidStateError(f"channel {channel.number} is closed")
        data = encode_publish(channel.number, exchange, routing_key, body, properties,
                              mandatory=mandatory, frame_max=self._frame_max)
        confirmation = None
        if channel.publisher_confirms:
            message_id = properties.get("message_id")
            if not message_id:
                raise ValueError("a confirmed publish needs a message_id (aiormq matches returns by it)")
            # What aiormq's basic_publish does under its lock; here no await separates the steps.
            channel.delivery_tag += 1
            delivery_tag = channel.delivery_tag
            confirmation = channel.create_future()
            channel.confirmations[delivery_tag] = confirmation
            channel.message_id_delivery_tag[message_id] = delivery_tag
            confirmation.add_done_callback(lambda _: forget_message_id(channel, message_id, delivery_tag))
        self._writer.write(data)
        return confirmation

    def basic_ack(self, delivery_tag: int) -> None:
        if self.aiormq.is_closed:
            raise ChannelInvalidStateError(f"channel {self.aiormq.number} is closed")
        self._writer.write(encode_ack(self.aiormq.number, delivery_tag))


def forget_message_id(channel: Any, message_id: str, delivery_tag: int) -> None:
    if channel.message_id_delivery_tag.get(message_id) == delivery_tag:
        del channel.message_id_delivery_tag[message_id]
