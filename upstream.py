"""The sender's side towards vLLM: keep-alive connections, pooled per server, on h11's client side.

A connection is reused only after a complete exchange (`UpstreamPool.release`): a response whose
body did not end, or that asked to close, closes its connection; a stream whose client left after
`data: [DONE]` is read to its end first (vLLM often writes the terminator a moment later). While
the pool holds idle connections, a timer closes those vLLM has closed.

A chunked response body (every stream) is not cut into h11 events: `ChunkedBody` follows its
chunk sizes through the reads, so that the sender can relay each read as it came.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from typing import Any

import h11

UPSTREAM_CONNECT_TIMEOUT_S = 10.0
UPSTREAM_IDLE_MAX_S = 4.0           # vLLM (uvicorn) drops idle keep-alive connections after 5 s
UPSTREAM_POOL_SIZE = 64             # idle connections kept per vLLM server
UPSTREAM_SWEEP_S = 1.0              # idle pooled connections are checked this often for a close by vLLM
UPSTREAM_FINISH_TIMEOUT_S = 1.0     # for vLLM's chunked terminator after `data: [DONE]`, once the client left
READ_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_LINE_BYTES = 16 * 1024            # a chunk's size line (extensions included) or a trailer line
# A chunk's size line (RFC 9112 §7.1), its extensions bounded like any line
CHUNK_HEAD = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]{0,%d})?\r\n" % (MAX_CHUNK_LINE_BYTES - 32))



class UpstreamError(Exception):
    """vLLM could not be reached or failed; `before_response` says whether a byte had come back."""

    def __init__(self, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"bad vLLM address {url!r}", before_response=True)
        return cls(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))

    @property
    def host_header(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode()


class UpstreamConnection:
    __slots__ = ("origin", "reader", "writer", "h11", "idle_since", "relayed_done", "body", "keep_alive")

    def __init__(self, origin: Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.relayed_done = False   # the client has the stream's last event; only vLLM's terminator may be missing
        self.body: ChunkedBody | None = None    # a chunked body relayed as it came: h11 saw only the head
        self.keep_alive = False     # of that response

    async def send_request(self, request: h11.Request, body: bytes) -> None:
        # send_with_data_passthrough hands the body back as is: a large upload is not copied again.
        self.writer.writelines([*self.h11.send_with_data_passthrough(request),
                                *self.h11.send_with_data_passthrough(h11.Data(data=body)),
                                *self.h11.send_with_data_passthrough(h11.EndOfMessage())])
        await self.writer.drain()

    async def next_event(self, timeout_s: float) -> Any:
        """The next h11 event of the response; raises UpstreamError on EOF, reset or silence."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(timeout_s):
                data = await self.reader.read(READ_CHUNK_BYTES)
            self.h11.receive_data(data)

    def is_reusable(self) -> bool:
        if self.body is not None:
            return self.body.ended and not self.body.extra and self.keep_alive
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def is_in_body(self) -> bool:
        """The response's body has not all come (whatever the client has)."""
        return not self.body.ended if self.body is not None else self.h11.their_state is h11.SEND_BODY

    def start_next_cycle(self) -> None:
        if self.body is not None:  # h11 still thinks the body is coming: a new one for the next exchange
            self.h11, self.body = h11.Connection(h11.CLIENT), None
        else:
            self.h11.start_next_cycle()

    async def finish_body(self, timeout_s: float) -> bool:
        """Reads the rest of the response's body (not relayed); whether it ended in time."""
        async with asyncio.timeout(timeout_s):
            if self.body is None:
                return type(await self.next_event(timeout_s)) is h11.EndOfMessage
            while not self.body.ended:
                data = await self.reader.read(READ_CHUNK_BYTES)
                if not data:
                    return False
                self.body.feed(data)
            return True

    def is_fresh(self, now: float) -> bool:
        """An idle connection still worth sending on: not closed by vLLM, not about to be."""
        return now - self.idle_since < UPSTREAM_IDLE_MAX_S and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class UpstreamPool:
    """Idle keep-alive connections per vLLM server; no new TCP connection per request.

    While the pool holds idle connections, one timer sweeps it every UPSTREAM_SWEEP_S and closes
    those vLLM has closed (its keep-alive timer; our side would otherwise sit in CLOSE-WAIT until
    the next request) and those about to be: one timer for the pool, nothing per request.
    """

    def __init__(self) -> None:
        self._idle: dict[Origin, deque[UpstreamConnection]] = {}
        self._finishing: set[asyncio.Task[None]] = set()
        self._tls = ssl.create_default_context()
        self._sweeper: asyncio.TimerHandle | None = None

    async def acquire(self, origin: Origin) -> tuple[UpstreamConnection, bool]:
        """A connection to `origin`, and whether it was reused (may have been closed by vLLM)."""
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.is_fresh(now):
                return connection, True
            connection.close()
        try:
            async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(
                    origin.host, origin.port, ssl=self._tls if origin.scheme == "https" else None,
                    limit=READ_CHUNK_BYTES)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to vLLM: {type(exc).__name__}", before_response=True) from None
        return UpstreamConnection(origin, reader, writer), False

    def release(self, connection: UpstreamConnection) -> None:
        """Keeps the connection for the next request if the exchange completed, else closes it."""
        if not connection.is_reusable():
            if connection.relayed_done and connection.is_in_body():
                task = asyncio.create_task(self._finish(connection))
                self._finishing.add(task)
                task.add_done_callback(self._finishing.discard)
            else:
                connection.close()
            return
        connection.start_next_cycle()
        connection.idle_since = time.monotonic()
        idle = self._idle.setdefault(connection.origin, deque())
        if len(idle) >= UPSTREAM_POOL_SIZE:
            idle.popleft().close()
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(UPSTREAM_SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for origin, idle in list(self._idle.items()):
            fresh: deque[UpstreamConnection] = deque()
            for connection in idle:
                if connection.is_fresh(now):
                    fresh.append(connection)
                else:
                    connection.close()
            if fresh:
                self._idle[origin] = fresh
            else:
                del self._idle[origin]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(UPSTREAM_SWEEP_S, self._sweep)

    async def _finish(self, connection: UpstreamConnection) -> None:
        """Reads the end of a stream whose client left after its last event: vLLM often writes the
        chunked terminator a moment after `data: [DONE]`. Anything else, or nothing, closes it."""
        ended = False
        try:
            ended = await connection.finish_body(UPSTREAM_FINISH_TIMEOUT_S)
        except (OSError, TimeoutError, h11.ProtocolError, ValueError):
            pass
        finally:  # cancelled at shutdown too: the connection is closed then
            if ended:
                self.release(connection)
            else:
                connection.close()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in self._finishing:
            task.cancel()
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


# ---------------------------------------------------------------------------------------------
# A chunked body, relayed as it came

class ChunkedBody:
    """Follows a chunked body through vLLM's reads without cutting it into events.

    `feed` returns the part of each read to relay as it came, framing and all: every chunk before
    the last (zero-size) one. A size line cut by a read is held back until it is known not to be
    the last chunk's. The last chunk, its trailers and anything after them are not relayed (the
    client's side writes its own last chunk). Per whole chunk: a regex match, an `int` and a
    compare; the data is never copied. A malformed body is a ValueError.
    """

    __slots__ = ("state", "left", "line", "ended", "extra")

    SIZE, DATA, DATA_END, TRAILERS = range(4)

    def __init__(self) -> None:
        self.state = self.SIZE
        self.left = 0           # data bytes of the current chunk still to come
        self.line = b""         # a line cut by the end of the previous read
        self.ended = False      # the last chunk and its trailers have come
        self.extra = False      # bytes came after the end: the connection cannot be reused

    def feed(self, data: bytes) -> list[bytes]:
        parts: list[bytes] = []
        relay_from: int | None = None if self.state == self.TRAILERS else 0  # None: the last chunk has begun
        pos, size = 0, len(data)
        while pos < size:
            state = self.state
            if state == self.SIZE and not self.line:  # whole chunks, the usual case: a regex and a compare each
                head = CHUNK_HEAD.match(data, pos)
                while head is not None and (length := int(head[1], 16)):
                    end = head.end() + length
                    if data[end:end + 2] != b"\r\n":
                        break
                    pos = end + 2
                    head = CHUNK_HEAD.match(data, pos)
                if pos == size:
                    break
            if state == self.DATA:
                step = min(self.left, size - pos)
                pos += step
                self.left -= step
                if self.left == 0:
                    if data[pos:pos + 2] == b"\r\n":
                        pos += 2
                        self.state = self.SIZE
                    else:
                        self.state = self.DATA_END
                continue
            start = pos
            newline = data.find(b"\n", pos)
            if newline == -1:
                if len(self.line) + size - pos > MAX_CHUNK_LINE_BYTES:
                    raise ValueError("a chunk line too long")
                self.line += data[pos:]
                if state == self.SIZE and relay_from is not None:  # could be the last chunk's: held back
                    if start > relay_from:
                        parts.append(data[relay_from:start])
                    return parts
                break
            held, line = self.line, self.line + data[pos:newline]
            self.line = b""
            pos = newline + 1
            if line[-1:] != b"\r" or len(line) > MAX_CHUNK_LINE_BYTES:
                raise ValueError("a chunk line not ended by CRLF")
            if state == self.SIZE:
                head = CHUNK_HEAD.fullmatch(line + b"\n")
                if head is None:
                    raise ValueError("a bad chunk size")
                self.left = int(head[1], 16)
                if self.left:
                    if held:
                        parts.append(held)  # the start of this line, held back from the read before
                    self.state = self.DATA
                else:  # the last chunk: what came before this line is the body
                    if relay_from is not None and start > relay_from:
                        parts.append(data[relay_from:start])
                    relay_from = None
                    self.state = self.TRAILERS
            elif state == self.DATA_END:
                if line != b"\r":
                    raise ValueError("chunk data longer than its size")
                self.state = self.SIZE
            elif line == b"\r":  # the empty line after the trailers
                self.ended = True
                self.extra = pos < size
                break
        if relay_from is not None:
            parts.append(data if relay_from == 0 else data[relay_from:])
        return parts


def is_chunked(head: h11.Response) -> bool:
    return head.status_code not in (204, 304) and (b"transfer-encoding", b"chunked") in head.headers
