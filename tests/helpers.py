"""Small helpers shared by the test suites: free ports, polling with a deadline, raw HTTP."""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import openai


class TcpRelay:
    """A TCP relay on a local port to a server, that a test opens, cuts and opens again: a link to a
    database or broker that is not there yet, fails, or comes back. It runs on an event loop of its
    own thread, so that the test's blocking calls do not stall it."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def open(self) -> None:
        """Starts listening on `port`: from now on, connections reach the server."""
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(5)

    def cut(self) -> None:
        """Stops listening and resets every relayed connection, like a network failure."""
        asyncio.run_coroutine_threadsafe(self._cut(), self.loop).result(5)

    def close(self) -> None:
        """Cuts, ends every relay task (a task left pending on a stopped loop is destroyed later, in
        whichever test is running then, with an error logged), and closes the loop."""
        self.cut()
        asyncio.run_coroutine_threadsafe(self._end_tasks(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _end_tasks(self) -> None:
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(client_reader, client_writer)
        except asyncio.CancelledError:  # by close(): asyncio's server would log a cancelled callback as an error
            client_writer.transport.abort()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        """One relayed connection, both ways."""
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self.writers |= {client_writer, server_writer}
        link: dict[str, Any] = {}  # this connection's state, for the filters of a subclass
        await asyncio.gather(self._pump(client_reader, server_writer, lambda data: self.to_server(link, data)),
                             self._pump(server_reader, client_writer, lambda data: self.to_client(link, data)))

    def to_server(self, link: dict[str, Any], data: bytes) -> bool:
        """Whether `data` goes on to the server; False cuts the connection instead."""
        return True

    def to_client(self, link: dict[str, Any], data: bytes) -> bool:
        """Whether `data` goes on to the client; False cuts the connection instead."""
        return True

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    passes: Callable[[bytes], bool]) -> None:
        try:
            while (data := await reader.read(65536)) and passes(data):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.writers.discard(writer)
            writer.transport.abort()


class ClosedLoop:
    """`count` threads that each keep one request outstanding (the openai SDK, no retries) until
    stopped: what each request ended with ("200", another status, "timeout", "connection error"),
    how long the answered ones took, and when the last was answered. A client backs off 50 ms
    after an error, as SDKs do."""

    def __init__(self, base_url: str, token: str, model: str, count: int, *, max_tokens: int,
                 headers: dict[str, str] | None = None, timeout_s: float = 30) -> None:
        self.statuses: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []
        self.last_ok = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=timeout_s,
                                     default_headers=headers)
        self._model = model
        self._max_tokens = max_tokens
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]

    def start(self) -> ClosedLoop:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self._threads), "a client hung"

    def __enter__(self) -> ClosedLoop:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def answered_since(self, moment: float) -> bool:
        return self.last_ok > moment

    def _run(self) -> None:
        prompt = [{"role": "user", "content": "hello"}]
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._client.chat.completions.create(model=self._model, messages=prompt, max_tokens=self._max_tokens)
                outcome = "200"
            except openai.APIStatusError as error:
                outcome = str(error.status_code)
            except openai.APITimeoutError:
                outcome = "timeout"
            except openai.APIConnectionError:
                outcome = "connection error"
            finished = time.monotonic()
            with self._lock:
                self.statuses[outcome] += 1
                if outcome == "200":
                    self.latencies.append(finished - started)
                    self.last_ok = finished
            if outcome != "200":
                self._stop.wait(0.05)


class FakeClock:
    """A monotonic clock that a test moves by hand (`clock.now += 5`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 10) -> None:
    """SIGTERM, `timeout_s` to exit, then SIGKILL; always reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, body: dict[str, Any] | None = None, token: str | None = None,
         timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET `url`, or POST `body` as JSON; with `token`, as a bearer. Returns status and body, errors included."""
    headers = {"content-type": "application/json"} if body is not None else {}
    if token:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05,
               what: str = "condition") -> Any:
    """Polls `predicate` until it returns a truthy value; fails the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # a service still starting refuses connections
            last_error = exc
            value = None
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last error: {last_error!r})")


async def async_wait_until(predicate: Callable[[], Awaitable[Any] | Any], timeout_s: float = 10.0,
                           interval_s: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class RawClient:
    """An HTTP/1.1 client on one TCP connection, built on h11, for tests of connection behaviour."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"",
                      timeout_s: float = 10.0) -> tuple[h11.Response, bytes]:
        headers = [("host", "test"), *headers]
        if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
            headers.append(("content-length", str(len(body))))
        data = self.h11.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        self.writer.write(data)
        await self.writer.drain()
        return await self.read_response(timeout_s)

    async def read_response(self, timeout_s: float = 10.0) -> tuple[h11.Response, bytes]:
        response = None
        body = bytearray()
        async with asyncio.timeout(timeout_s):
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    self.h11.receive_data(await self.reader.read(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert response is not None
                    if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                        self.h11.start_next_cycle()
                    return response, bytes(body)
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("server closed the connection")

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def header(response: h11.Response, name: str) -> str | None:
    for key, value in response.headers:
        if key == name.lower().encode():
            return value.decode()
    return None
