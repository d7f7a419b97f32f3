"""The dispatch path end to end: openai SDK → sender.py → RabbitMQ → consumer.py → fake vLLM, and back."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from tests.helpers import RawClient
from tests.integration.conftest import Fake, Service, Stack, Tokens, http_get, print_logs

PROMPT = [{"role": "user", "content": "Say something"}]
VLLM_KEY = "vllm-server-key"


@dataclass
class Shared:
    """One stack for the tests that only read: a chat model and an embedding model behind one sender."""
    stack: Stack
    model: str
    embed_model: str
    fake: Fake
    embed_fake: Fake
    sender: Service

    def client(self, token: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.sender.url + "/v1", api_key=token, max_retries=0, timeout=30)

    @property
    def port(self) -> int:
        return int(self.sender.url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, database_url: str, tokens: Tokens) -> Iterator[Shared]:
    stack = Stack(tmp_path_factory.mktemp("shared"), database_url)
    model, embed_model = f"it-chat-{uuid.uuid4().hex[:8]}", f"it-embed-{uuid.uuid4().hex[:8]}"
    try:
        # The chat server requires an API key: the consumer's VLLM_API_KEY reaches it through the grant.
        fake = stack.fake_vllm(model, "--api-key", VLLM_KEY)
        embed_fake = stack.fake_vllm(embed_model, "--kind", "embed")
        stack.consumer(model, fake.url, VLLM_API_KEY=VLLM_KEY)
        stack.consumer(embed_model, embed_fake.url)
        sender = stack.sender()
        stack.served(sender, model, tokens.high)
        stack.served(sender, embed_model, tokens.high)
        yield Shared(stack, model, embed_model, fake, embed_fake, sender)
    except BaseException:
        print_logs(stack)
        raise
    finally:
        stack.stop()


def direct(fake: Fake) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.url + "/v1", api_key=VLLM_KEY, max_retries=0, timeout=30)


def test_chat_completion_is_vllms_answer(shared: Shared, tokens: Tokens) -> None:
    through = shared.client(tokens.high).chat.completions.create(model=shared.model, messages=PROMPT, max_tokens=5)
    baseline = direct(shared.fake).chat.completions.create(model=shared.model, messages=PROMPT, max_tokens=5)
    assert through.object == "chat.completion" and through.model == shared.model
    assert through.choices[0].message.content == baseline.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert through.choices[0].finish_reason == "length"
    assert through.usage == baseline.usage


def test_chat_stream_relays_every_chunk_and_the_usage(shared: Shared, tokens: Tokens) -> None:
    stream = shared.client(tokens.high).chat.completions.create(
        model=shared.model, messages=PROMPT, max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(f"tok{i}" for i in range(12))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_text_completion(shared: Shared, tokens: Tokens, stream: bool) -> None:
    client = shared.client(tokens.low)
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(
            model=shared.model, prompt="Once upon", max_tokens=4, stream=True) if c.choices)
    else:
        text = client.completions.create(model=shared.model, prompt="Once upon", max_tokens=4).choices[0].text
    assert text == "tok0 tok1 tok2 tok3"


def test_embeddings(shared: Shared, tokens: Tokens) -> None:
    through = shared.client(tokens.high).embeddings.create(model=shared.embed_model, input=["a b", "c"])
    baseline = direct(shared.embed_fake).embeddings.create(model=shared.embed_model, input=["a b", "c"])
    assert [e.embedding for e in through.data] == [e.embedding for e in baseline.data]
    assert len(through.data) == 2


def test_model_list_and_retrieve_show_vllms_cards(shared: Shared, tokens: Tokens) -> None:
    client = shared.client(tokens.high)
    cards = {m.id: m for m in client.models.list().data}
    assert {shared.model, shared.embed_model} <= set(cards)
    assert cards[shared.model].model_extra["max_model_len"] == 4096
    assert cards[shared.model].owned_by == "vllm"
    assert client.models.retrieve(shared.model).id == shared.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_vllm_error_passes_through_unchanged(shared: Shared, tokens: Tokens) -> None:
    """vLLM's 400 for max_tokens above max_model_len reaches the client as vLLM wrote it (integer code)."""
    with pytest.raises(openai.BadRequestError) as through:
        shared.client(tokens.high).chat.completions.create(model=shared.model, messages=PROMPT, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError) as baseline:
        direct(shared.fake).chat.completions.create(model=shared.model, messages=PROMPT, max_tokens=100_000)
    assert through.value.body == baseline.value.body
    assert through.value.body["code"] == 400 and "max_tokens" in through.value.body["message"]


async def test_many_requests_on_one_keep_alive_connection(shared: Shared, tokens: Tokens) -> None:
    client = await RawClient.connect(shared.port)
    body = json.dumps({"model": shared.model, "messages": PROMPT, "max_tokens": 2}).encode()
    for _ in range(25):
        response, answer = await client.request("POST", "/v1/chat/completions",
                                                [("authorization", f"Bearer {tokens.high}"),
                                                 ("content-type", "application/json")], body)
        assert response.status_code == 200
        assert json.loads(answer)["choices"][0]["message"]["content"] == "tok0 tok1"
    await client.close()


def test_unknown_token_is_401(shared: Shared) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        shared.client("sk-not-a-token").chat.completions.create(model=shared.model, messages=PROMPT)
    assert caught.value.body["code"] == "invalid_api_key"


def test_model_without_consumer_is_404(shared: Shared, tokens: Tokens) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        shared.client(tokens.high).chat.completions.create(model="nobody-serves-this", messages=PROMPT)
    assert caught.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(("request_bytes", "status"), [
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {high}\r\n"
                 b"content-type: application/json\r\ncontent-length: 9\r\n\r\n{not json", 400, id="invalid-json"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {high}\r\n"
                 b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}", 400, id="no-model"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {high}\r\n"
                 b"content-length: 40000000\r\n\r\n", 413, id="body-too-large"),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n", 431,
                 id="head-too-large"),
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="malformed-http"),
])
async def test_refused_requests_get_an_envelope(shared: Shared, tokens: Tokens, request_bytes: bytes,
                                                status: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", shared.port)
    writer.write(request_bytes.replace(b"{high}", tokens.high.encode()).replace(b"{{}}", b"{}"))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 %d " % status)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    error = json.loads(await reader.readexactly(length))["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["code"], str)
    writer.close()


def test_health_routes(shared: Shared) -> None:
    assert http_get(shared.sender.url + "/health/liveness")[0] == 200
    assert http_get(shared.sender.url + "/health/readiness")[0] == 200
