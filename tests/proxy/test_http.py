"""The sender's HTTP behaviour against an upstream scripted byte by byte."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import h11
import pytest

import sender
from tests.helpers import RawClient, async_wait_until, header
from tests.proxy.conftest import MODEL

AUTH = ("authorization", "Bearer sk-high")
JSON = ("content-type", "application/json")
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedUpstream:
    """A TCP server that runs `handler` for each connection and records what it received."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body

    async def each_request(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        """The requests of one connection, until the proxy closes it."""
        while True:
            try:
                yield await self.read_request(reader)
            except asyncio.IncompleteReadError:
                return


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[tuple[ScriptedUpstream, str]]]]:
    """`make(handler)` runs `handler` per connection; `make(answer=bytes)` reads one request and
    writes those bytes, the usual case."""
    servers: list[ScriptedUpstream] = []

    async def make(handler: Handler | None = None, *, answer: bytes | None = None) -> tuple[ScriptedUpstream, str]:
        async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            assert answer is not None
            writer.write(answer)
            await writer.drain()

        server = ScriptedUpstream(handler or answer_once)
        servers.append(server)
        return server, await server.start()

    yield make
    for server in servers:
        assert server.server is not None
        server.server.close()


def ok_json(body: bytes = b'{"ok":true}') -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


async def test_request_forwarded_byte_for_byte_with_credentials_replaced(start_proxy, upstream) -> None:
    """The body is the client's bytes; our token, X-Priority and a client X-Vllm-Priority never reach vLLM."""
    scripted, url = await upstream(answer=ok_json())
    proxy = await start_proxy(url, api_key="vllm-key", vllm_priority=3)
    body = b'{"model": "proxy-model",   "messages": [],\n "extra": "\xc3\xa9"}'
    client = await RawClient.connect(proxy.port)
    response, answer = await client.request(
        "POST", "/v1/chat/completions?x=1", [AUTH, JSON, ("x-priority", "2"), ("x-vllm-priority", "0"),
                                             ("x-custom", "kept")], body)
    assert response.status_code == 200 and answer == b'{"ok":true}'
    sent = scripted.requests[0]
    head, _, forwarded = sent.partition(b"\r\n\r\n")
    assert forwarded == body
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"post /v1/chat/completions?x=1 http/1.1"
    assert b"authorization: bearer vllm-key" in lines
    assert b"x-vllm-priority: 3" in lines and b"x-vllm-priority: 0" not in lines
    assert not any(line.startswith(b"x-priority") for line in lines)
    assert b"x-custom: kept" in lines
    assert proxy.capacity.granted == [(MODEL, 2)]
    await client.close()


async def test_upstream_failure_mid_stream_closes_without_final_chunk(start_proxy, upstream) -> None:
    async def handler(reader, writer):
        await scripted.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        writer.transport.abort()

    scripted, url = await upstream(handler)
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.port)
    with pytest.raises((h11.RemoteProtocolError, ConnectionError)):
        await client.request("POST", "/v1/chat/completions", [AUTH, JSON], CHAT)
    await async_wait_until(lambda: proxy.capacity.released == ["lease-0"], what="the grant released")


async def test_upstream_unreachable_before_response_is_502(start_proxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")  # discard port: nothing listens
    client = await RawClient.connect(proxy.port)
    response, body = await client.request("POST", "/v1/chat/completions", [AUTH, JSON], CHAT)
    assert response.status_code == 502
    assert json.loads(body)["error"]["code"] == "upstream_unreachable"
    assert proxy.capacity.released == ["lease-0"]


async def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(start_proxy, upstream) -> None:
    """vLLM closes idle keep-alive connections; the next request must not fail because of it."""
    async def handler(reader, writer):
        await scripted.read_request(reader)
        writer.write(ok_json())
        await writer.drain()
        # keep-alive promised, then the connection is dropped without a word, like an idle timeout

    scripted, url = await upstream(handler)
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.port)
    for _ in range(3):
        response, _ = await client.request("POST", "/v1/chat/completions", [AUTH, JSON], CHAT)
        assert response.status_code == 200
    assert scripted.connections == 3


async def test_upstream_connection_reused_across_requests(start_proxy, upstream) -> None:
    async def handler(reader, writer):
        async for _ in scripted.each_request(reader):
            writer.write(ok_json())
            await writer.drain()

    scripted, url = await upstream(handler)
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.port)
    for _ in range(20):
        response, body = await client.request("POST", "/v1/chat/completions", [AUTH, JSON], CHAT)
        assert response.status_code == 200 and body == b'{"ok":true}'
    assert scripted.connections == 1
    assert len(proxy.capacity.released) == 20


async def test_client_hangup_while_waiting_closes_upstream_and_releases(start_proxy, upstream) -> None:
    async def handler(reader, writer):
        await scripted.read_request(reader)
        # vLLM "generating": answer nothing until the proxy closes the connection
        await reader.read()
        scripted.closed_by_peer.set()

    scripted, url = await upstream(handler)
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.port)
    data = client.h11.send(h11.Request(method="POST", target="/v1/chat/completions",
                                       headers=[("host", "t"), AUTH, JSON, ("content-length", str(len(CHAT)))]))
    client.writer.write(data + CHAT)
    await async_wait_until(lambda: len(scripted.requests) == 1, what="the request upstream")
    await client.close()
    await asyncio.wait_for(scripted.closed_by_peer.wait(), 5)
    await async_wait_until(lambda: proxy.capacity.released == ["lease-0"], what="the grant released")


async def test_vllm_error_passed_through_untouched(start_proxy, upstream) -> None:
    error = b'{"error":{"message":"max_tokens=99999 cannot be greater than max_model_len=4096","type":"BadRequestError","param":"max_tokens","code":400}}'

    scripted, url = await upstream(answer=b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                          b"x-vllm: 1\r\ncontent-length: %d\r\n\r\n%s" % (len(error), error))
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.port)
    response, body = await client.request("POST", "/v1/chat/completions", [AUTH, JSON], CHAT)
    assert response.status_code == 400 and body == error
    assert header(response, "x-vllm") == "1"


@pytest.mark.parametrize(("headers", "body", "status", "code"), [
    pytest.param([JSON], CHAT, 401, "invalid_api_key", id="no-token"),
    pytest.param([("authorization", "Bearer sk-nope"), JSON], CHAT, 401, "invalid_api_key", id="unknown-token"),
    pytest.param([("authorization", "Basic abc"), JSON], CHAT, 401, "invalid_api_key", id="not-bearer"),
    pytest.param([AUTH, JSON], b"{not json", 400, "invalid_json", id="invalid-json"),
    pytest.param([AUTH, JSON], b'{"messages": []}', 400, "missing_model", id="no-model"),
    pytest.param([AUTH, JSON], b'{"model": 3}', 400, "invalid_model", id="model-not-string"),
    pytest.param([AUTH, JSON], b'[1, 2]', 400, "missing_model", id="json-array"),
    pytest.param([AUTH, JSON, ("x-priority", "high")], CHAT, 400, "invalid_priority", id="bad-x-priority"),
    pytest.param([AUTH, JSON], b'{"model": "nobody-serves-this"}', 404, "model_not_found", id="unknown-model"),
])
async def test_own_errors_are_openai_envelopes(start_proxy, headers, body, status, code) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")
    client = await RawClient.connect(proxy.port)
    response, answer = await client.request("POST", "/v1/chat/completions", headers, body)
    assert response.status_code == status
    assert header(response, "content-type") == "application/json"
    error = json.loads(answer)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    assert proxy.capacity.granted == []


async def test_queue_longer_than_threshold_is_429_with_retry_after(start_proxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")
    proxy.capacity.queue_lengths[MODEL] = 1
    client = await RawClient.connect(proxy.port)
    low = await client.request("POST", "/v1/chat/completions", [("authorization", "Bearer sk-low"), JSON], CHAT)
    assert low[0].status_code == 429 and int(header(low[0], "retry-after")) >= 1
    assert json.loads(low[1])["error"]["type"] == "rate_limit_error"


async def test_body_over_limit_is_413_before_upload_and_connection_closed(start_proxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:9", max_body_bytes=1000)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer sk-high\r\n"
                 b"content-type: application/json\r\ncontent-length: 5000000\r\n\r\n" + b"x" * 100_000)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # read to EOF: the sender closes
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"code":"request_too_large"' in answer
    writer.close()


async def test_chunked_body_over_limit_is_413(start_proxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:9", max_body_bytes=1000)
    client = await RawClient.connect(proxy.port)
    response, body = await client.request("POST", "/v1/chat/completions",
                                          [AUTH, JSON, ("transfer-encoding", "chunked")], b"x" * 5000)
    assert response.status_code == 413


async def test_unauthorized_answered_before_body_with_expect_continue(start_proxy) -> None:
    """A client waiting for 100-continue gets the 401 instead, and never has to upload."""
    proxy = await start_proxy("http://127.0.0.1:9")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                 b"content-length: 10\r\nexpect: 100-continue\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in answer
    writer.close()


async def test_expect_continue_gets_100_then_the_answer(start_proxy, upstream) -> None:
    scripted, url = await upstream(answer=ok_json())
    proxy = await start_proxy(url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer sk-high\r\n"
                 b"content-type: application/json\r\ncontent-length: %d\r\nexpect: 100-continue\r\n\r\n" % len(CHAT))
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 ")
    writer.write(CHAT)
    final = await asyncio.wait_for(reader.readuntil(b'{"ok":true}'), 5)
    assert final.startswith(b"HTTP/1.1 200 ")
    assert scripted.requests[0].endswith(CHAT)
    assert b"expect:" not in scripted.requests[0].lower()
    writer.close()


async def test_oversized_head_is_431(start_proxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 431 ")
    writer.close()


async def test_malformed_request_is_400_then_close(start_proxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"THIS IS NOT HTTP\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'"error"' in answer
    writer.close()


async def test_slow_head_is_dropped_after_header_timeout(start_proxy, monkeypatch) -> None:
    monkeypatch.setattr(sender, "HEADER_TIMEOUT_S", 0.05)
    proxy = await start_proxy("http://127.0.0.1:9")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_multipart_body_routed_by_its_model_field(start_proxy, upstream) -> None:
    scripted, url = await upstream(answer=ok_json())
    proxy = await start_proxy(url)
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\nRIFF\x00\x01binary\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nproxy-model\r\n--XyZ--\r\n")
    client = await RawClient.connect(proxy.port)
    response, _ = await client.request("POST", "/v1/audio/transcriptions",
                                       [AUTH, ("content-type", "multipart/form-data; boundary=XyZ")], body)
    assert response.status_code == 200
    assert scripted.requests[0].endswith(body)


async def test_multipart_without_model_is_400(start_proxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")
    body = b"--B\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--B--\r\n"
    client = await RawClient.connect(proxy.port)
    response, answer = await client.request("POST", "/v1/audio/transcriptions",
                                            [AUTH, ("content-type", "multipart/form-data; boundary=B")], body)
    assert response.status_code == 400 and json.loads(answer)["error"]["param"] == "model"


async def test_health_routes_need_no_token(start_proxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")
    client = await RawClient.connect(proxy.port)
    for path in ("/health/liveness", "/health/readiness"):
        response, _ = await client.request("GET", path, [])
        assert response.status_code == 200


async def test_models_need_a_token_and_list_live_models(start_proxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")
    client = await RawClient.connect(proxy.port)
    response, _ = await client.request("GET", "/v1/models", [])
    assert response.status_code == 401
    client = await RawClient.connect(proxy.port)
    response, body = await client.request("GET", "/v1/models", [AUTH])
    assert response.status_code == 200 and [m["id"] for m in json.loads(body)["data"]] == [MODEL]
    response, body = await client.request("GET", f"/v1/models/{MODEL}", [AUTH])
    assert response.status_code == 200 and json.loads(body)["id"] == MODEL
    response, body = await client.request("GET", "/v1/models/other", [AUTH])
    assert response.status_code == 404 and json.loads(body)["error"]["code"] == "model_not_found"


async def test_shutdown_closes_idle_connections_and_lets_streams_finish(start_proxy, upstream) -> None:
    """Readiness turns red, idle keep-alive connections close, a response in progress completes."""
    release = asyncio.Event()

    async def handler(reader, writer):
        await scripted.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"c\r\ndata: last\n\n\r\n0\r\n\r\n")
        await writer.drain()

    scripted, url = await upstream(handler)
    proxy = await start_proxy(url)
    idle = await RawClient.connect(proxy.port)
    response, _ = await idle.request("GET", "/health/liveness", [])
    assert response.status_code == 200
    streaming = await RawClient.connect(proxy.port)
    request = streaming.h11.send(h11.Request(method="POST", target="/v1/chat/completions",
                                             headers=[("host", "t"), AUTH, JSON, ("content-length", str(len(CHAT)))]))
    streaming.writer.write(request + CHAT)
    await async_wait_until(lambda: len(scripted.requests) == 1, what="the request upstream")

    shutdown = asyncio.create_task(proxy.server.shut_down())
    assert await asyncio.wait_for(idle.reader.read(), 5) == b""  # the idle connection is closed at once
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", proxy.port)
    assert not shutdown.done()  # the stream is still running
    release.set()
    response, body = await streaming.read_response()
    assert response.status_code == 200 and body == b"data: first\n\ndata: last\n\n"
    await asyncio.wait_for(shutdown, 5)


async def test_slow_body_gets_408_then_close(start_proxy, monkeypatch) -> None:
    monkeypatch.setattr(sender, "BODY_IDLE_TIMEOUT_S", 0.05)
    proxy = await start_proxy("http://127.0.0.1:9")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer sk-high\r\n"
                 b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\": ")
    answer = await asyncio.wait_for(reader.read(), 5)  # answered, then closed
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in answer
    assert proxy.capacity.granted == []
    writer.close()


async def test_chunked_request_body_reaches_vllm_whole_with_a_length(start_proxy, upstream) -> None:
    scripted, url = await upstream(answer=ok_json())
    proxy = await start_proxy(url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer sk-high\r\n"
                 b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"a\r\n{\"model\": \r\n" + b"%x\r\n" % (len(CHAT) - 10) + CHAT[10:] + b"\r\n0\r\n\r\n")
    answer = await asyncio.wait_for(reader.readuntil(b'{"ok":true}'), 5)
    assert answer.startswith(b"HTTP/1.1 200 ")
    head, _, body = scripted.requests[0].partition(b"\r\n\r\n")
    assert body == b'{"model": ' + CHAT[10:]
    assert b"content-length: %d" % len(body) in head.lower() and b"transfer-encoding" not in head.lower()
    writer.close()


def requests_counted(proxy) -> dict[str, float]:
    """The sender's `dispatcher_requests_total`, by status."""
    counts: dict[str, float] = {}
    for metric in proxy.server.service.metrics.requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                counts[sample.labels["status"]] = counts.get(sample.labels["status"], 0) + sample.value
    return counts


def idle_upstream_connections(proxy) -> int:
    return sum(len(idle) for idle in proxy.server.service.upstream._idle.values())


async def test_client_closing_right_after_done_is_a_complete_stream(start_proxy, upstream) -> None:
    """vLLM often writes the chunked terminator a moment after `data: [DONE]`, and a synchronous openai
    client closes as soon as it reads [DONE]: the stream was delivered whole, so it is counted as a 200,
    not a 499, and the vLLM connection, finished when the terminator comes, serves the next request."""
    client_gone = asyncio.Event()
    sse_head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

    async def handler(reader, writer):
        async for _ in scripted.each_request(reader):
            writer.write(sse_head + b"10\r\ndata: {\"n\": 1}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n")
            await writer.drain()
            await client_gone.wait()  # vLLM's terminator comes after the client has left
            client_gone.clear()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    scripted, url = await upstream(handler)
    proxy = await start_proxy(url)
    for round_ in range(1, 4):
        client = await RawClient.connect(proxy.port)
        data = client.h11.send(h11.Request(method="POST", target="/v1/chat/completions",
                                           headers=[("host", "t"), AUTH, JSON, ("content-length", str(len(CHAT)))]))
        client.writer.write(data + CHAT)
        received = b""
        while not received.endswith(b"data: [DONE]\n\n\r\n"):
            data = await asyncio.wait_for(client.reader.read(65536), 5)
            assert data, f"the sender closed the connection after {received!r}"
            received += data
        await client.close()
        await async_wait_until(lambda: sum(requests_counted(proxy).values()) == round_, what="the request counted")
        assert requests_counted(proxy) == {"200": round_}
        client_gone.set()
        await async_wait_until(lambda: idle_upstream_connections(proxy) == 1, what="the vLLM connection pooled")
    assert scripted.connections == 1
    assert proxy.capacity.released == ["lease-0", "lease-1", "lease-2"]
