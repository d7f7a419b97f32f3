"""The broker connection both services open: aiormq, with the frames of one event-loop turn sent together.

aiormq's writer task hands every frame it dequeues to the socket at once, so a grant request, a
grant and its ack, or the releases of one turn each cost a send() of their own. On a busy
dispatcher that was half of the consumer's CPU (py-spy, bench/RESULTS.md): every send on a TCP
socket runs the kernel's whole transmit path and wakes RabbitMQ once more. `connect()` gives aiormq
(through its `transport_factory` hook) a stream writer that gathers what is written during one
turn and sends it in one call at the end of that turn, before the loop waits for I/O again.
Order is kept, nothing waits longer than the current turn, and `drain()` flushes first, so
aiormq's own back-pressure and close handshake see every byte.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiormq
from aiormq.connection import TransportFactory
from aiormq.exceptions import AMQPConnectionError

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
        return reader, CoalescingWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]


async def connect(url: str) -> aiormq.abc.AbstractConnection:
    """An open aiormq connection whose frames of one event-loop turn share one socket write."""
    return await aiormq.connect(url, transport_factory=CoalescingTransportFactory())
