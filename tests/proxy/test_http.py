"""The sender's HTTP behaviour against an upstream scripted byte by byte."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import h11
import pytest

import sender
import upstream as upstream_module  # the fixture `upstream` has the name
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


def post_head(*headers: bytes, version: bytes = b"1.1") -> bytes:
    """The head of an authenticated JSON POST to the chat route, with `headers` added."""
    return (b"POST /v1/chat/completions HTTP/" + version + b"\r\nhost: t\r\nauthorization: Bearer sk-high\r\n"
            b"content-type: application/json\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n")


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


async def exchange_raw(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Sends `data` and reads until the sender closes the connection (a deadline, not a sleep)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


async def each_request_upstream(upstream, respond: Callable[[asyncio.StreamWriter], Awaitable[None]]):
    """An upstream that runs `respond` for every request of a connection, for as long as it stays open."""
    async def handler(reader, writer):
        while True:
            try:
                await scripted.read_request(reader)
            except asyncio.IncompleteReadError:
                return
            await respond(writer)

    scripted, url = await upstream(handler)
    return scripted, url


async def keep_alive_upstream(upstream, answer: bytes):
    async def respond(writer):
        writer.write(answer)
        await writer.drain()

    return await each_request_upstream(upstream, respond)


async def held_stream_upstream(upstream, release: asyncio.Event):
    """Each answer streams a first event, is held until `release`, then ends."""
    async def respond(writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"c\r\ndata: last\n\n\r\n0\r\n\r\n")
        await writer.drain()

    return await each_request_upstream(upstream, respond)


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
    scripted, url = await keep_alive_upstream(upstream, ok_json())
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
    proxy.server.service.queue.add_waiting(MODEL, "someone", 5)  # one request waits, from another token
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
    scripted, url = await held_stream_upstream(upstream, release)
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


async def test_stream_cut_at_the_end_of_the_shutdown_grace_is_logged_as_cut(start_proxy, upstream, monkeypatch,
                                                                              caplog) -> None:
    """A stream still running when the grace period ends is cut: the client sees no final chunk, and
    the access log and the metrics say 503 and `ended=shutdown`, not a complete 200."""
    monkeypatch.setattr(sender, "SHUTDOWN_GRACE_S", 0.2)
    caplog.set_level(logging.INFO, logger="sender")
    release = asyncio.Event()
    scripted, url = await held_stream_upstream(upstream, release)  # released only after the shutdown
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.port)
    shutdown = None
    with pytest.raises(h11.RemoteProtocolError, match="incomplete chunked read"):
        async def shut_down_once_streaming() -> None:
            await async_wait_until(lambda: len(scripted.requests) == 1, what="the request upstream")
            await proxy.server.shut_down()
        shutdown = asyncio.create_task(shut_down_once_streaming())
        await client.request("POST", "/v1/chat/completions", [AUTH, JSON], CHAT)
    await asyncio.wait_for(shutdown, 5)
    release.set()
    lines = [record.getMessage() for record in caplog.records if "POST /v1/chat/completions" in record.getMessage()]
    assert len(lines) == 1 and " status=503 " in lines[0] and lines[0].endswith(" ended=shutdown"), lines
    assert requests_counted(proxy) == {"503": 1}


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


@pytest.mark.parametrize("data", [
    pytest.param(post_head(b"content-length: %d" % len(chunked(CHAT)), b"transfer-encoding: chunked")
                 + chunked(CHAT), id="length-then-chunked"),
    pytest.param(post_head(b"transfer-encoding: chunked", b"content-length: 4") + chunked(CHAT), id="chunked-then-length"),
    pytest.param(post_head(b"transfer-encoding: chunked", version=b"1.0") + chunked(CHAT), id="chunked-in-http-1.0"),
])
async def test_ambiguous_framing_is_400_and_nothing_behind_it_is_served(start_proxy, upstream, data) -> None:
    """RFC 9112 §6.1 and §6.3: both Content-Length and Transfer-Encoding (or chunked in HTTP/1.0) is an
    error, and the connection closes after the answer: a request smuggled behind it never reaches vLLM."""
    scripted, url = await keep_alive_upstream(upstream, ok_json())
    proxy = await start_proxy(url)
    smuggled = post_head(b"content-length: %d" % len(CHAT)) + CHAT
    answer = await exchange_raw(proxy.port, data + smuggled)
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1
    assert b'"code":"bad_http_request"' in answer and b"connection: close" in answer.lower()
    assert scripted.requests == [] and proxy.capacity.granted == []


async def test_malformed_chunked_body_is_400_then_close_without_traceback(start_proxy, caplog) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")
    answer = await exchange_raw(proxy.port, post_head(b"transfer-encoding: chunked") + b"zz\r\n{}\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"code":"bad_http_request"' in answer
    assert proxy.capacity.granted == []
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_unsupported_transfer_encoding_is_501_envelope_then_close(start_proxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")
    answer = await exchange_raw(proxy.port, post_head(b"transfer-encoding: gzip") + b"abc")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 ") and b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "unsupported_transfer_encoding" and "Transfer-Encoding" in error["message"]


@pytest.mark.parametrize("path", ["/health/liveness", "/health/readiness", "/v1/models", f"/v1/models/{MODEL}"])
async def test_head_is_answered_like_get_without_a_body(start_proxy, path, caplog) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")
    client = await RawClient.connect(proxy.port)
    get, get_body = await client.request("GET", path, [AUTH])
    head, head_body = await client.request("HEAD", path, [AUTH])  # the same connection: kept alive
    assert head.status_code == get.status_code == 200
    assert head_body == b"" and header(head, "content-length") == str(len(get_body))
    assert header(head, "content-type") == "application/json"
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_head_of_an_error_has_no_body(start_proxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")
    client = await RawClient.connect(proxy.port)
    response, body = await client.request("HEAD", "/v1/models", [])
    assert response.status_code == 401 and body == b""
    response, body = await client.request("GET", "/health/liveness", [])  # still in step
    assert response.status_code == 200 and json.loads(body) == {"status": "ok"}


async def test_malformed_request_after_a_head_gets_its_error_body(start_proxy, caplog) -> None:
    proxy = await start_proxy("http://127.0.0.1:9")
    answer = await exchange_raw(proxy.port, b"HEAD /health/liveness HTTP/1.1\r\nhost: t\r\n\r\nNOT HTTP\r\n\r\n")
    first, _, second = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 400 ")
    assert json.loads(second.partition(b"\r\n\r\n")[2])["error"]["code"] == "bad_http_request"
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
SSE_EVENTS = (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n', b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n',
              b"data: [DONE]\n\n")
SSE_CHUNKS = b"".join(b"%x%s\r\n%s\r\n" % (len(event), extension, event)  # vLLM sends no extension; a server may
                      for event, extension in zip(SSE_EVENTS, (b"", b";ext=1", b"")))


async def read_chunked_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body as framed on the wire) of one chunked response."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    body = b""
    while not body.endswith(b"\r\n0\r\n\r\n"):
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, f"the sender closed the connection after {body!r}"
        body += data
    return head, body


async def test_stream_reaches_the_client_chunk_for_chunk_on_a_reused_vllm_connection(start_proxy, upstream) -> None:
    """A stream goes to the client framed as vLLM framed it (chunk sizes and extensions too), and the
    vLLM connection, its body read to the end, serves the next request."""
    scripted, url = await keep_alive_upstream(upstream, SSE_HEAD + SSE_CHUNKS + b"0\r\n\r\n")
    proxy = await start_proxy(url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for _ in range(5):
        writer.write(post_head(b"content-length: %d" % len(CHAT)) + CHAT)
        head, body = await read_chunked_response(reader)
        assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
        assert body == SSE_CHUNKS + b"0\r\n\r\n"
    writer.close()
    assert scripted.connections == 1
    assert len(proxy.capacity.released) == 5


async def test_stream_from_a_vllm_connection_that_closes_is_not_pooled(start_proxy, upstream) -> None:
    """`Connection: close` from vLLM: the stream is relayed whole, the connection is never sent on again."""
    scripted, url = await keep_alive_upstream(upstream, SSE_HEAD.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
                                              + SSE_CHUNKS + b"0\r\n\r\n")
    proxy = await start_proxy(url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for _ in range(3):
        writer.write(post_head(b"content-length: %d" % len(CHAT)) + CHAT)
        assert (await read_chunked_response(reader))[1] == SSE_CHUNKS + b"0\r\n\r\n"
    writer.close()
    assert scripted.connections == 3


async def test_stream_to_an_http_1_0_client_ends_with_the_connection(start_proxy, upstream) -> None:
    """HTTP/1.0 has no chunks: the events go out unframed and the close ends the body."""
    scripted, url = await upstream(answer=SSE_HEAD + SSE_CHUNKS + b"0\r\n\r\n")
    proxy = await start_proxy(url)
    answer = await exchange_raw(proxy.port, post_head(b"content-length: %d" % len(CHAT), version=b"1.0") + CHAT)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower()
    assert body == b"".join(SSE_EVENTS)


@pytest.mark.parametrize("then", [b"", b"zz\r\nnot a chunk\r\n"], ids=["closes", "bad-chunk"])
async def test_upstream_failing_mid_stream_is_logged_as_upstream_failure(start_proxy, upstream, caplog, then) -> None:
    """vLLM dying mid-stream (a clean close, no reset) or breaking its chunked framing: no traceback, the
    access log and the metrics say 502, and the client sees the connection closed without the final chunk."""
    async def handler(reader, writer):
        await scripted.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        if then:
            writer.write(then)
            await reader.read()  # open until the sender closes it

    scripted, url = await upstream(handler)
    proxy = await start_proxy(url)
    caplog.set_level(logging.INFO, logger="sender")
    client = await RawClient.connect(proxy.port)
    with pytest.raises(h11.RemoteProtocolError, match="incomplete chunked read"):
        await client.request("POST", "/v1/chat/completions", [AUTH, JSON], CHAT)
    await async_wait_until(lambda: proxy.capacity.released == ["lease-0"], what="the grant released")
    await async_wait_until(lambda: any("status=" in r.getMessage() for r in caplog.records), what="the access log")
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
    assert [r.getMessage() for r in caplog.records if "status=" in r.getMessage()][0].split()[4] == "status=502"
    requests = proxy.server.service.metrics.requests
    assert requests.labels(MODEL, "502", "9")._value.get() == 1


async def test_pipelined_request_behind_a_stream_is_served_after_it(start_proxy, upstream) -> None:
    release = asyncio.Event()
    scripted, url = await held_stream_upstream(upstream, release)
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.port)
    request = post_head(b"content-length: %d" % len(CHAT)) + CHAT
    client.writer.write(request + request)
    await async_wait_until(lambda: len(scripted.requests) == 1, what="the first request upstream")
    release.set()
    for _ in range(2):
        client.h11.send(h11.Request(method="POST", target="/", headers=[("host", "t"), ("content-length", "0")]))
        client.h11.send(h11.EndOfMessage())
        response, body = await client.read_response()
        assert response.status_code == 200 and body == b"data: first\n\ndata: last\n\n"
    assert len(scripted.requests) == 2


async def test_pipelined_flood_during_a_stream_is_not_buffered(start_proxy, upstream) -> None:
    """Input pipelined while a response streams is kept up to MAX_PIPELINED_BYTES; past it, the rest is
    dropped, the response in progress still completes, and the connection closes after it."""
    release = asyncio.Event()
    scripted, url = await held_stream_upstream(upstream, release)
    proxy = await start_proxy(url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    request = post_head(b"content-length: %d" % len(CHAT)) + CHAT
    writer.write(request)
    await async_wait_until(lambda: len(scripted.requests) == 1, what="the request upstream")
    flood = request * (64 * 1024 // len(request))
    for _ in range(8 * 1024 * 1024 // len(flood)):  # 8 MiB, written as the sender reads it
        writer.write(flood)
        await asyncio.wait_for(writer.drain(), 10)
    [client] = proxy.server.connections.values()
    assert len(client.h11.trailing_data[0]) <= sender.MAX_PIPELINED_BYTES
    release.set()
    answer = await asyncio.wait_for(reader.read(), 10)  # the sender closes after the response
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.endswith(b"c\r\ndata: last\n\n\r\n0\r\n\r\n")
    assert len(scripted.requests) == 1
    writer.close()


async def test_pooled_connection_closed_by_vllm_while_idle_is_closed_here_too(start_proxy, upstream,
                                                                             monkeypatch) -> None:
    """vLLM closes a keep-alive connection after a while idle; the sender must close its side
    (not leave it in CLOSE-WAIT until the next request), and the next request still works."""
    monkeypatch.setattr(upstream_module, "UPSTREAM_SWEEP_S", 0.05)
    closed_here = asyncio.Event()

    async def handler(reader, writer):
        await scripted.read_request(reader)
        writer.write(ok_json())
        await writer.drain()
        await asyncio.sleep(0.05)  # this upstream's keep-alive timeout
        writer.write_eof()
        if await asyncio.wait_for(reader.read(), 5) == b"":  # the sender's side of the connection closed
            closed_here.set()

    scripted, url = await upstream(handler)
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.port)
    response, _ = await client.request("POST", "/v1/chat/completions", [AUTH, JSON], CHAT)
    assert response.status_code == 200
    await asyncio.wait_for(closed_here.wait(), 5)
    response, _ = await client.request("POST", "/v1/chat/completions", [AUTH, JSON], CHAT)
    assert response.status_code == 200 and scripted.connections == 2


async def test_hangup_after_a_pipelined_flood_still_aborts_the_generation(start_proxy, upstream) -> None:
    """Past MAX_PIPELINED_BYTES the sender keeps reading (and dropping), so a client leaving is still seen."""
    async def handler(reader, writer):
        await scripted.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        await reader.read()  # generating until the sender closes the connection
        scripted.closed_by_peer.set()

    scripted, url = await upstream(handler)
    proxy = await start_proxy(url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(post_head(b"content-length: %d" % len(CHAT)) + CHAT)
    await reader.readuntil(b"data: first\n\n")
    for _ in range(32):  # 2 MiB, written as the sender reads it
        writer.write(b"x" * 64 * 1024)
        await asyncio.wait_for(writer.drain(), 10)
    writer.close()
    await asyncio.wait_for(scripted.closed_by_peer.wait(), 5)
    await async_wait_until(lambda: proxy.capacity.released == ["lease-0"], what="the grant released")


@pytest.mark.parametrize("head", [
    pytest.param(b"GET /health/liveness HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", id="connection-close"),
    pytest.param(b"GET /health/liveness HTTP/1.0\r\n\r\n", id="http-1.0"),
])
async def test_answer_before_a_close_survives_unread_input(start_proxy, head) -> None:
    """RFC 9112 §9.6: after the last answer of a connection, the sender closes in stages (stops writing,
    reads and drops what the client still sends, then closes): closing with unread input would reset
    the connection and could destroy that answer before the client reads it."""
    proxy = await start_proxy("http://127.0.0.1:9")
    answer = await exchange_raw(proxy.port, head + b"x" * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"ok"}')


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
