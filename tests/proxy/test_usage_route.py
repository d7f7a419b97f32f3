"""Usage as the sender counts it without a database (TOKENS_FILE): `GET /v1/usage` answers from memory."""

from __future__ import annotations

import json

from tests.helpers import RawClient
from tests.proxy.conftest import MODEL
from tests.proxy.test_http import AUTH, JSON, upstream  # noqa: F401 - the fixture

STREAM = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()


def sse_chunks(*events: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events) + b"0\r\n\r\n"


def delta(text: str) -> bytes:
    return b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"' + text.encode() + b'"}}]}\n\n'


async def usage(client: RawClient, query: str = "") -> tuple[int, dict]:
    response, body = await client.request("GET", "/v1/usage" + query, [AUTH])
    return response.status_code, json.loads(body)


async def test_usage_from_memory_without_a_database(start_proxy, upstream) -> None:  # noqa: F811
    usage_event = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":9,"total_tokens":11,"completion_tokens":2}}\n\n'
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
              + sse_chunks(delta("a"), delta("b"), usage_event[:40], usage_event[40:], b"data: [DONE]\n\n"))
    scripted, url = await upstream(answer=answer)
    proxy = await start_proxy(url)
    client = await RawClient.connect(proxy.port)
    response, _ = await client.request("POST", "/v1/chat/completions", [AUTH, JSON], STREAM)
    assert response.status_code == 200
    assert scripted.requests[0].endswith(b"\r\n\r\n" + STREAM)  # the body reached vLLM as sent
    status, body = await usage(client)
    assert status == 200
    assert body["object"] == "list" and body["source"] == "memory"
    assert [{key: row[key] for key in ("model", "requests", "prompt_tokens", "completion_tokens",
                                       "estimated_requests")} for row in body["data"]] == [
        {"model": MODEL, "requests": 1, "prompt_tokens": 9, "completion_tokens": 2, "estimated_requests": 0}]
    assert (await usage(client, "?days=0"))[0] == 400
    await client.close()
