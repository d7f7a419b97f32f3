"""The broker connection's writer: the frames of one event-loop turn leave in one socket write."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

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
