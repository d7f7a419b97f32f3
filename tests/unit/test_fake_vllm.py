"""The fake vLLM as a client sees it: through the official openai SDK, and byte by byte over raw HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import h11
import openai
import pytest

from tests.fake_vllm import FINISH_REASONS, FakeVLLM, FakeVLLMOptions
from tests.helpers import RawClient, async_wait_until, header

pytestmark = pytest.mark.asyncio

JSON = ("content-type", "application/json")
HELLO = [{"role": "user", "content": "hello there"}]   # two prompt tokens

StartFake = Callable[..., Awaitable[FakeVLLM]]


@pytest.fixture
async def start_fake() -> AsyncIterator[StartFake]:
    """Returns `start(**options) -> FakeVLLM`, in-process on port 0, closed after the test."""
    started: list[FakeVLLM] = []

    async def start(**options: Any) -> FakeVLLM:
        fake = await FakeVLLM(FakeVLLMOptions(**options)).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.close()


def sdk(fake: FakeVLLM, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fake.url + "/v1", api_key=api_key, max_retries=0)


async def raw(fake: FakeVLLM, method: str, path: str, body: Any = None,
              headers: tuple[tuple[str, str], ...] = (JSON,)) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; `body` is JSON-encoded unless it is bytes."""
    client = await RawClient.connect(fake.port)
    try:
        data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        response, payload = await client.request(method, path, list(headers), data)
    finally:
        await client.close()
    return response.status_code, {k.decode(): v.decode() for k, v in response.headers}, payload


# --- the OpenAI API through the SDK

async def test_chat_completion_non_streamed_has_vllm_shape(start_fake: StartFake) -> None:
    fake = await start_fake(model="org/fake", served_model_name="fake")
    async with sdk(fake) as client:
        raw_response = await client.chat.completions.with_raw_response.create(
            model="fake", messages=HELLO, max_tokens=3)  # type: ignore[arg-type]
        completion = raw_response.parse()
    assert completion.choices[0].message.content == "tok0 tok1 tok2"
    assert completion.choices[0].finish_reason == "length"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "fake"
    assert completion.usage is not None
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2, 3, 5)
    body = json.loads(raw_response.http_response.content)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "service_tier",
                         "system_fingerprint", "prompt_logprobs", "prompt_token_ids", "prompt_text",
                         "kv_transfer_params", "ec_transfer_params", "metrics"}
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2", "refusal": None,
                                             "annotations": None, "audio": None, "function_call": None,
                                             "reasoning": None}
    assert body["choices"][0]["stop_reason"] is None
    assert raw_response.http_response.headers["content-type"] == "application/json"
    assert raw_response.http_response.headers["server"] == "uvicorn"
    assert "date" in raw_response.http_response.headers


@pytest.mark.parametrize(("options", "finish_reason", "completion_tokens"), [
    pytest.param({"max_model_len": 50}, "length", 48, id="no-eos-fills-the-context"),
    pytest.param({"default_max_tokens": 16}, "stop", 16, id="default-max-tokens-as-an-eos"),
])
async def test_chat_completion_without_max_tokens(start_fake: StartFake, options: dict[str, Any], finish_reason: str,
                                                  completion_tokens: int) -> None:
    """The fake model never emits EOS: like vLLM then, a request without max_tokens fills the context,
    unless default_max_tokens stands for an EOS."""
    fake = await start_fake(**options)
    async with sdk(fake) as client:
        completion = await client.chat.completions.create(messages=HELLO, model="fake-model")  # type: ignore[arg-type]
    assert completion.choices[0].finish_reason == finish_reason
    assert completion.usage is not None and completion.usage.completion_tokens == completion_tokens


async def test_default_max_tokens_yields_to_max_tokens_and_ignore_eos(start_fake: StartFake) -> None:
    fake = await start_fake(default_max_tokens=16)
    async with sdk(fake) as client:
        longer = await client.chat.completions.create(messages=HELLO, model="fake-model",  # type: ignore[arg-type]
                                                      max_tokens=20)
        assert longer.usage is not None and longer.usage.completion_tokens == 20
        ignored = await client.completions.create(prompt="a", model="fake-model", max_tokens=None,
                                                  extra_body={"ignore_eos": True})
        assert ignored.choices[0].finish_reason == "length"
        assert ignored.usage is not None and ignored.usage.completion_tokens == 4096 - 1


async def test_chat_completion_streamed_with_usage(start_fake: StartFake) -> None:
    fake = await start_fake()
    async with sdk(fake) as client:
        stream = await client.chat.completions.create(
            model="fake-model", messages=HELLO, max_tokens=5, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 tok4"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (2, 5)
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_framing_is_sse_over_chunked(start_fake: StartFake) -> None:
    fake = await start_fake()
    status, headers, body = await raw(fake, "POST", "/v1/chat/completions",
                                      {"messages": HELLO, "max_tokens": 2, "stream": True})
    assert status == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["transfer-encoding"] == "chunked"
    events = body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert len(events) == 2 + 3  # role chunk, two tokens, [DONE], and the empty tail
    assert all(event.startswith("data: ") for event in events[:-1])


async def test_completion_streamed_and_not(start_fake: StartFake) -> None:
    fake = await start_fake()
    async with sdk(fake) as client:
        completion = await client.completions.create(model="fake-model", prompt="one two three", max_tokens=2)
        stream = await client.completions.create(model="fake-model", prompt="one two three", max_tokens=2,
                                                 stream=True)
        chunks = [chunk async for chunk in stream]
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.choices[0].text == "tok0 tok1"
    assert completion.usage is not None and completion.usage.prompt_tokens == 3
    assert "".join(c.choices[0].text for c in chunks) == "tok0 tok1"
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_embeddings_are_deterministic_unit_vectors(start_fake: StartFake) -> None:
    fake = await start_fake(kind="embed", model="fake-embed")
    async with sdk(fake) as client:
        first = await client.embeddings.create(model="fake-embed", input=["a b", "c"])  # SDK asks for base64
        again = await client.embeddings.create(model="fake-embed", input="a b", encoding_format="float")
    assert [item.index for item in first.data] == [0, 1]
    assert len(first.data[0].embedding) == 8
    assert first.data[0].embedding == pytest.approx(again.data[0].embedding, abs=1e-6)
    assert first.data[0].embedding != pytest.approx(first.data[1].embedding)
    assert math.fsum(x * x for x in first.data[1].embedding) == pytest.approx(1.0, abs=1e-5)
    assert first.usage.prompt_tokens == 3


async def test_models_list_has_vllm_cards(start_fake: StartFake) -> None:
    fake = await start_fake(model="org/weights", served_model_name=("alias-a", "alias-b"), max_model_len=2048)
    async with sdk(fake) as client:
        models = [model async for model in client.models.list()]
    assert [model.id for model in models] == ["alias-a", "alias-b"]
    status, _, body = await raw(fake, "GET", "/v1/models")
    card = json.loads(body)["data"][0]
    assert status == 200
    assert (card["root"], card["max_model_len"], card["owned_by"], card["parent"]) == (
        "org/weights", 2048, "vllm", None)
    assert card["permission"][0]["object"] == "model_permission"


async def test_max_tokens_above_max_model_len_is_400(start_fake: StartFake) -> None:
    fake = await start_fake(max_model_len=100)
    async with sdk(fake) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="fake-model", messages=HELLO,  # type: ignore[arg-type]
                                                 max_tokens=101)
    assert caught.value.param == "max_tokens"
    assert caught.value.type == "BadRequestError"
    message = caught.value.body["message"]  # type: ignore[index]
    assert message == ("max_tokens=101 cannot be greater than max_model_len=100. Please request fewer output "
                       "tokens. (parameter=max_tokens, value=101)")


async def test_unknown_model_is_404(start_fake: StartFake) -> None:
    fake = await start_fake()
    async with sdk(fake) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="other", messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.param == "model"
    assert caught.value.type == "NotFoundError"
    assert caught.value.body["message"] == "The model `other` does not exist. Valid aliases: fake-model."  # type: ignore[index]


async def test_api_key_guards_v1_only(start_fake: StartFake) -> None:
    fake = await start_fake(api_key="sk-fake")
    async with sdk(fake, "wrong") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()
    assert caught.value.body == "Unauthorized"
    async with sdk(fake, "sk-fake") as client:
        assert [model.id async for model in client.models.list()] == ["fake-model"]
    status, _, body = await raw(fake, "GET", "/v1/models", headers=(("authorization", "bearer sk-fake"),))
    assert status == 200, body
    status, _, body = await raw(fake, "POST", "/v1/nothing-here", {})
    assert (status, json.loads(body)) == (401, {"error": "Unauthorized"})
    assert (await raw(fake, "GET", "/health"))[0] == 200
    assert (await raw(fake, "POST", "/tokenize", {"prompt": "a"}))[0] == 200


# --- HTTP rules, byte by byte

ENVELOPE_CASES = [
    pytest.param({}, "GET", "/nope", None, (JSON,), 404, {"detail": "Not Found"}, id="unknown-path"),
    pytest.param({}, "GET", "/v1/chat/completions", None, (), 405, {"detail": "Method Not Allowed"},
                 id="wrong-method"),
    pytest.param({"kind": "embed"}, "POST", "/v1/chat/completions", {"messages": HELLO}, (JSON,), 404,
                 {"detail": "Not Found"}, id="chat-on-embedding-model"),
    pytest.param({}, "POST", "/v1/embeddings", {"input": "a"}, (JSON,), 404, {"detail": "Not Found"},
                 id="embeddings-on-chat-model"),
    pytest.param({}, "POST", "/v1/chat/completions", {"messages": HELLO}, (("content-type", "text/plain"),), 400,
                 {"error": {"message": "1 validation error:\n  Unsupported Media Type: Only 'application/json' is "
                                       "allowed",
                            "type": "Bad Request", "param": None, "code": 400}}, id="wrong-content-type"),
]


@pytest.mark.parametrize(("options", "method", "path", "body", "headers", "status", "expected"), ENVELOPE_CASES)
async def test_error_bodies_match_vllm(start_fake: StartFake, options: dict[str, Any], method: str, path: str,
                                       body: Any, headers: tuple[tuple[str, str], ...], status: int,
                                       expected: dict[str, Any]) -> None:
    fake = await start_fake(**options)
    got_status, got_headers, got_body = await raw(fake, method, path, body, headers)
    assert (got_status, json.loads(got_body)) == (status, expected)
    assert got_headers["content-type"] == "application/json"


PARAM_CASES = [
    pytest.param(b"{not json", "Bad Request", "body.1", id="invalid-json"),
    pytest.param({"messages": HELLO, "stream_options": {"include_usage": True}}, "BadRequestError", "stream_options",
                 id="stream-options-without-stream"),
    pytest.param({"messages": HELLO, "max_tokens": "seven"}, "Bad Request", "body.max_tokens",
                 id="max-tokens-not-int"),
    pytest.param({"messages": HELLO, "max_tokens": 2.5}, "Bad Request", "body.max_tokens", id="max-tokens-fraction"),
    pytest.param({"messages": HELLO, "stream": "maybe"}, "Bad Request", "body.stream", id="stream-not-bool"),
    pytest.param({"messages": []}, "BadRequestError", None, id="messages-empty"),
    pytest.param({"messages": HELLO, "max_tokens": 0}, "BadRequestError", "max_tokens", id="max-tokens-zero"),
    pytest.param({"model": "fake-model"}, "Bad Request", "body.messages", id="messages-missing"),
    pytest.param({"messages": [{"role": "user", "content": "w " * 40}]}, "BadRequestError", "input_tokens",
                 id="prompt-longer-than-max-model-len"),
    pytest.param({"messages": [{"role": "user", "content": "w " * 32}]}, "BadRequestError", "max_tokens",
                 id="prompt-fills-the-context"),
]


@pytest.mark.parametrize(("body", "error_type", "param"), PARAM_CASES)
async def test_invalid_chat_requests_are_400(start_fake: StartFake, body: Any, error_type: str,
                                             param: str | None) -> None:
    fake = await start_fake(max_model_len=32)
    status, _, payload = await raw(fake, "POST", "/v1/chat/completions", body)
    error = json.loads(payload)["error"]
    assert (status, error["type"], error["param"], error["code"]) == (400, error_type, param, 400)


async def test_health_follows_healthy_flag(start_fake: StartFake) -> None:
    fake = await start_fake()
    assert (await raw(fake, "GET", "/health"))[::2] == (200, b"")
    fake.healthy = False
    assert (await raw(fake, "GET", "/health"))[::2] == (503, b"")
    assert json.loads((await raw(fake, "GET", "/version"))[2]) == {"version": "0.33.0"}
    assert json.loads((await raw(fake, "GET", "/load"))[2]) == {"server_load": 0}


async def test_tokenize_and_detokenize(start_fake: StartFake) -> None:
    fake = await start_fake(max_model_len=64)
    status, _, body = await raw(fake, "POST", "/tokenize", {"model": "fake-model", "prompt": "tok3 tok1 word"})
    tokenized = json.loads(body)
    assert status == 200
    assert (tokenized["count"], tokenized["max_model_len"], tokenized["tokens"][:2], tokenized["token_strs"]) == (
        3, 64, [3, 1], None)
    status, _, body = await raw(fake, "POST", "/tokenize", {"messages": HELLO})
    assert json.loads(body)["count"] == 2
    status, _, body = await raw(fake, "POST", "/detokenize", {"tokens": [0, 1]})
    assert json.loads(body) == {"prompt": "tok0 tok1"}


async def test_metrics_use_vllm_names_and_labels(start_fake: StartFake) -> None:
    fake = await start_fake(model="org/m", served_model_name="m")
    await raw(fake, "POST", "/v1/completions", {"prompt": "a b c", "max_tokens": 4})
    status, headers, body = await raw(fake, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    labels = '{engine="0",model_name="m"}'
    for line in (f"vllm:num_requests_running{labels} 0.0", f"vllm:num_requests_waiting{labels} 0.0",
                 f"vllm:kv_cache_usage_perc{labels} 0.0", f"vllm:prompt_tokens_total{labels} 3.0",
                 f"vllm:generation_tokens_total{labels} 4.0",
                 'vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 1.0',
                 "# TYPE vllm:generation_tokens_total counter", "# TYPE vllm:num_requests_running gauge"):
        assert line in text.splitlines()


async def test_keep_alive_serves_many_requests_on_one_connection(start_fake: StartFake) -> None:
    fake = await start_fake()
    client = await RawClient.connect(fake.port)
    try:
        for _ in range(3):
            response, _ = await client.request("POST", "/v1/chat/completions", [JSON],
                                               json.dumps({"messages": HELLO, "max_tokens": 2}).encode())
            assert response.status_code == 200
            response, _ = await client.request("POST", "/v1/chat/completions", [JSON],
                                               json.dumps({"messages": HELLO, "max_tokens": 2,
                                                           "stream": True}).encode())
            assert response.status_code == 200
            response, _ = await client.request("GET", "/nope", [])
            assert response.status_code == 404
    finally:
        await client.close()
    assert len(fake.requests) == 9


async def test_chunked_body_with_expect_100_continue(start_fake: StartFake) -> None:
    fake = await start_fake()
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
            body = b'{"prompt": "a b", "max_tokens": 2}'
            writer.write(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:]))
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        writer.close()
    assert fake.requests[0].body == body
    assert (b"transfer-encoding", b"chunked") in fake.requests[0].headers


async def test_idle_keep_alive_connection_is_closed(start_fake: StartFake) -> None:
    fake = await start_fake(keep_alive_s=0.1)
    client = await RawClient.connect(fake.port)
    try:
        response, _ = await client.request("GET", "/health", [])
        assert response.status_code == 200
        async with asyncio.timeout(5):
            assert await client.reader.read() == b""
    finally:
        await client.close()


async def test_control_routes(start_fake: StartFake) -> None:
    fake = await start_fake()
    body = json.dumps({"messages": HELLO, "max_tokens": 1}).encode()
    await raw(fake, "POST", "/v1/chat/completions", body, (JSON, ("x-extra", "1")))
    await raw(fake, "GET", "/health")  # probes are not recorded
    stats = json.loads((await raw(fake, "GET", "/_fake/stats"))[2])
    assert (stats["requests"], stats["disconnects"], stats["running"], stats["waiting"]) == (1, 0, 0, 0)
    assert stats["last_request"]["path"] == "/v1/chat/completions"
    assert stats["last_request"]["headers"]["x-extra"] == "1"
    assert stats["last_request"]["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert stats["last_request"]["body_len"] == len(body)

    status, _, payload = await raw(fake, "POST", "/_fake/control", {"healthy": False, "tpot_ms": 1.5,
                                                                    "max_num_seqs": 3})
    assert status == 200, payload
    assert (fake.healthy, fake.options.tpot_ms, fake.engine.max_num_seqs) == (False, 1.5, 3)
    assert (await raw(fake, "GET", "/health"))[0] == 503
    assert (await raw(fake, "POST", "/_fake/control", {"tpot_ms": -1}))[0] == 400
    assert (await raw(fake, "POST", "/_fake/control", {"model": "x"}))[0] == 400

    assert (await raw(fake, "POST", "/_fake/reset"))[0] == 200
    stats = json.loads((await raw(fake, "GET", "/_fake/stats"))[2])
    assert (stats["requests"], stats["last_request"], fake.requests) == (0, None, [])


# --- the engine model: disconnects, waiting, speed

async def test_client_leaving_mid_stream_is_counted(start_fake: StartFake) -> None:
    fake = await start_fake(tpot_ms=10)
    async with sdk(fake) as client:
        stream = await client.chat.completions.create(model="fake-model", messages=HELLO, max_tokens=1000,
                                                      stream=True)  # type: ignore[arg-type]
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        await stream.close()
    await async_wait_until(lambda: fake.disconnects == 1 and fake.running == 0, timeout_s=5,
                           what="the disconnect to be counted")
    assert fake.engine.finished == dict.fromkeys(FINISH_REASONS, 0)  # vLLM does not count aborts either
    assert fake.engine.generation_tokens < 1000


async def test_client_leaving_before_a_non_streamed_answer_is_counted(start_fake: StartFake) -> None:
    fake = await start_fake(ttft_ms=10_000)
    client = await RawClient.connect(fake.port)
    body = json.dumps({"messages": HELLO}).encode()
    client.writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(body), body))
    await async_wait_until(lambda: fake.running == 1, timeout_s=5, what="the request to run")
    await client.close()
    await async_wait_until(lambda: fake.disconnects == 1 and fake.running == 0, timeout_s=5,
                           what="the disconnect to be counted")


async def test_requests_beyond_max_num_seqs_wait(start_fake: StartFake) -> None:
    fake = await start_fake(max_num_seqs=1, tpot_ms=5)
    async with sdk(fake) as client:
        calls = [asyncio.create_task(client.completions.create(model="fake-model", prompt="a", max_tokens=10))
                 for _ in range(2)]
        await async_wait_until(lambda: (fake.running, fake.waiting) == (1, 1), timeout_s=5,
                               what="one running, one waiting")
        metrics = (await raw(fake, "GET", "/metrics"))[2].decode()
        assert 'vllm:num_requests_waiting{engine="0",model_name="fake-model"} 1.0' in metrics
        results = await asyncio.gather(*calls)
    assert [r.choices[0].text.count("tok") for r in results] == [10, 10]
    assert (fake.running, fake.waiting) == (0, 0)


async def stream_rate(client: openai.AsyncOpenAI, tokens: int) -> float:
    """Tokens per second of one stream, from its first to its last content chunk."""
    stream = await client.completions.create(model="fake-model", prompt="a", max_tokens=tokens, stream=True)
    times = [time.perf_counter() async for chunk in stream if chunk.choices]
    return (len(times) - 1) / (times[-1] - times[0])


async def test_per_request_speed_drops_when_more_run(start_fake: StartFake) -> None:
    """tpot * running ** 0.5: four streams get about half the speed each, twice the throughput in total."""
    fake = await start_fake(tpot_ms=5)
    async with sdk(fake) as client:
        alone = await stream_rate(client, 30)
        together = await asyncio.gather(*[stream_rate(client, 30) for _ in range(4)])
    slowest = max(together)
    assert slowest < alone * 0.8, (alone, together)
    assert sum(together) > alone * 1.2, (alone, together)


async def test_fastest_mode_answers_without_sleeping(start_fake: StartFake) -> None:
    fake = await start_fake()
    client = await RawClient.connect(fake.port)
    body = json.dumps({"messages": HELLO, "max_tokens": 16}).encode()
    try:
        started = time.perf_counter()
        for _ in range(200):
            response, _ = await client.request("POST", "/v1/chat/completions", [JSON], body)
            assert response.status_code == 200
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    assert elapsed < 2.0  # 10 ms per round trip at most, client included; about 0.3 ms in practice
    assert header(response, "content-type") == "application/json"


async def test_drop_metrics_makes_the_scrape_fail(start_fake: StartFake) -> None:
    fake = await start_fake()
    status, _, body = await raw(fake, "POST", "/_fake/control", {"drop_metrics": True})
    assert status == 200 and json.loads(body)["drop_metrics"] is True
    with pytest.raises((ConnectionError, h11.RemoteProtocolError)):  # closed without an answer
        await raw(fake, "GET", "/metrics")
    assert (await raw(fake, "GET", "/health"))[0] == 200    # only the scrape fails
    fake.configure(drop_metrics=False)
    assert (await raw(fake, "GET", "/metrics"))[0] == 200


async def test_restart_cuts_requests_in_flight_and_zeroes_the_counters(start_fake: StartFake) -> None:
    """What a consumer sees when vLLM restarts: its streams break and its counters go down."""
    fake = await start_fake(tpot_ms=10)
    async with sdk(fake) as client:
        await client.completions.create(model="fake-model", prompt="a b", max_tokens=5)
        stream = await client.completions.create(model="fake-model", prompt="a", max_tokens=1000, stream=True)
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                if fake.running == 1 and fake.engine.generation_tokens > 10:
                    status, _, _ = await raw(fake, "POST", "/_fake/restart")
                    assert status == 200
    assert (fake.running, fake.engine.generation_tokens, fake.engine.prompt_tokens) == (0, 0, 0)
    metrics = (await raw(fake, "GET", "/metrics"))[2].decode()
    assert 'vllm:generation_tokens_total{engine="0",model_name="fake-model"} 0.0' in metrics
    async with sdk(fake) as client:  # and it serves again
        assert (await client.completions.create(model="fake-model", prompt="a", max_tokens=2)).choices[0].text


async def test_stats_report_the_most_requests_that_ran_at_once(start_fake: StartFake) -> None:
    fake = await start_fake(tpot_ms=5)
    async with sdk(fake) as client:
        await asyncio.gather(*[client.completions.create(model="fake-model", prompt="a", max_tokens=10)
                               for _ in range(3)])
    stats = json.loads((await raw(fake, "GET", "/_fake/stats"))[2])
    assert (stats["running"], stats["max_running"], stats["generation_tokens"]) == (0, 3, 30)
    await raw(fake, "POST", "/_fake/reset")
    assert json.loads((await raw(fake, "GET", "/_fake/stats"))[2])["max_running"] == 0
