"""What users rely on when the GPU is busy: priority order, threshold shedding, time-outs, hang-ups, revocation."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from tests.helpers import wait_until
from tests.integration.conftest import Fake, Service, Stack, Tokens, http_get, metric_value, queue_ready_count

PROMPT = [{"role": "user", "content": "hello"}]
SLOW = ("--tpot-ms", "20")   # 20 ms per token: a 500-token answer holds the slot for about 10 s


def client(sender: Service, token: str, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=sender.url + "/v1", api_key=token, **{"max_retries": 0, "timeout": 60, **options})


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as executor:
        yield executor


def hold_slot(sender: Service, token: str, model: str) -> openai.Stream:
    """Starts a long streamed answer and reads its first chunk: the model's only slot is now in use."""
    stream = client(sender, token).chat.completions.create(model=model, messages=PROMPT, max_tokens=500,
                                                           stream=True)
    next(iter(stream))
    return stream


def ask(sender: Service, token: str, model: str, marker: str) -> str:
    answer = client(sender, token).chat.completions.create(
        model=model, messages=[{"role": "user", "content": marker}], max_tokens=1)
    return answer.choices[0].message.content


def arrival_order(fake: Fake) -> list[str]:
    status, body = http_get(fake.url + "/_fake/requests")
    assert status == 200
    return [json.loads(r["body"])["messages"][0]["content"] for r in json.loads(body) if r["method"] == "POST"]


def test_higher_priority_is_served_first(stack: Stack, tokens: Tokens, unique_model: str, pool) -> None:
    """Cap 1, the slot held, three low-priority requests waiting; a high one arriving last is served next."""
    fake, _, sender = stack.served_model(unique_model, tokens.high, SLOW, {"MAX_PARALLEL_REQUESTS": "1"})
    held = hold_slot(sender, tokens.high, unique_model)
    lows = []
    for index in range(3):
        lows.append(pool.submit(ask, sender, tokens.low, unique_model, f"low-{index}"))
        wait_until(lambda queued=index + 1: queue_ready_count(unique_model) == queued, what=f"low-{index} to be queued")
    high = pool.submit(ask, sender, tokens.high, unique_model, "high")
    wait_until(lambda: queue_ready_count(unique_model) == 4, what="the high request to be queued")
    held.close()  # the client leaves: the slot is released
    assert high.result(30) == "tok0"
    assert [low.result(30) for low in lows] == ["tok0"] * 3
    assert arrival_order(fake) == ["hello", "high", "low-0", "low-1", "low-2"]


def test_x_priority_header_lowers_a_request(stack: Stack, tokens: Tokens, unique_model: str, pool) -> None:
    fake, _, sender = stack.served_model(unique_model, tokens.high, SLOW, {"MAX_PARALLEL_REQUESTS": "1"})
    held = hold_slot(sender, tokens.high, unique_model)
    lowered = pool.submit(lambda: client(sender, tokens.high, default_headers={"X-Priority": "0"})
                          .chat.completions.create(model=unique_model, max_tokens=1,
                                                   messages=[{"role": "user", "content": "lowered"}]))
    wait_until(lambda: queue_ready_count(unique_model) == 1, what="the lowered request to be queued")
    low = pool.submit(ask, sender, tokens.low, unique_model, "low")
    wait_until(lambda: queue_ready_count(unique_model) == 2, what="the low request to be queued")
    held.close()
    lowered.result(30), low.result(30)
    assert arrival_order(fake) == ["hello", "low", "lowered"]
    assert all(header != "x-priority" for r in json.loads(http_get(fake.url + "/_fake/requests")[1])
               for header, _ in r["headers"])


def test_threshold_sheds_low_importance_traffic(stack: Stack, tokens: Tokens, unique_model: str, pool) -> None:
    """With one request waiting, a threshold-0 token is refused at once; a high-threshold token queues."""
    _, _, sender = stack.served_model(unique_model, tokens.high, SLOW, {"MAX_PARALLEL_REQUESTS": "1"})
    held = hold_slot(sender, tokens.high, unique_model)
    waiting = pool.submit(ask, sender, tokens.low, unique_model, "waiting")
    wait_until(lambda: queue_ready_count(unique_model) == 1, what="a request to be waiting")
    # The sender reads queue lengths every 100 ms; its metric shows when it has seen this one.
    wait_until(lambda: metric_value(sender, f'dispatcher_queue_waiting{{model="{unique_model}"}}') == 1,
               what="the sender to see the waiting request")
    with pytest.raises(openai.RateLimitError) as caught:
        ask(sender, tokens.strict, unique_model, "strict")
    error = caught.value
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.body["code"] == "queue_full"
    queued = pool.submit(ask, sender, tokens.high, unique_model, "queued")
    wait_until(lambda: queue_ready_count(unique_model) == 2, what="the high-threshold request to be queued")
    held.close()
    assert waiting.result(30) == "tok0" and queued.result(30) == "tok0"


def test_grant_timeout_is_503_with_retry_after(stack: Stack, tokens: Tokens, unique_model: str) -> None:
    _, _, sender = stack.served_model(unique_model, tokens.high, SLOW, {"MAX_PARALLEL_REQUESTS": "1"},
                                      {"GRANT_TIMEOUT": "1"})
    held = hold_slot(sender, tokens.high, unique_model)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        ask(sender, tokens.high, unique_model, "too late")
    assert caught.value.status_code == 503 and caught.value.body["code"] == "grant_timeout"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert time.monotonic() - started < 10
    held.close()
    # Its message expired in the queue: the next request is served, and vLLM never saw the late one.
    assert ask(sender, tokens.high, unique_model, "next") == "tok0"


def test_client_leaving_mid_stream_frees_the_slot_and_stops_vllm(stack: Stack, tokens: Tokens,
                                                                  unique_model: str) -> None:
    fake, _, sender = stack.served_model(unique_model, tokens.high, SLOW, {"MAX_PARALLEL_REQUESTS": "1"})
    stream = hold_slot(sender, tokens.high, unique_model)
    next(iter(stream))
    stream.close()
    wait_until(lambda: fake.stats()["disconnects"] == 1, what="vLLM to see the disconnect")
    assert fake.stats()["running"] == 0
    started = time.monotonic()
    assert ask(sender, tokens.high, unique_model, "after") == "tok0"  # the one slot is free again
    assert time.monotonic() - started < 10


def test_vllm_failing_mid_stream_is_an_error_not_a_short_success(stack: Stack, tokens: Tokens,
                                                                  unique_model: str) -> None:
    fake, _, sender = stack.served_model(unique_model, tokens.high, SLOW, {"MAX_PARALLEL_REQUESTS": "1"})
    fake.control(fail_after_tokens=3)
    stream = client(sender, tokens.high).chat.completions.create(model=unique_model, messages=PROMPT,
                                                                 max_tokens=50, stream=True)
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert 1 <= len(received) < 50
    fake.control(fail_after_tokens=0)
    assert ask(sender, tokens.high, unique_model, "after") == "tok0"  # the slot was released


def test_vllm_unreachable_before_answering_is_502(stack: Stack, tokens: Tokens, unique_model: str) -> None:
    fake, _, sender = stack.served_model(unique_model, tokens.high)
    fake.control(drop_requests=True)
    with pytest.raises(openai.APIStatusError) as caught:
        ask(sender, tokens.high, unique_model, "dropped")
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_unreachable"
    fake.control(drop_requests=False)
    assert ask(sender, tokens.high, unique_model, "back") == "tok0"


def test_model_list_follows_consumers(stack: Stack, tokens: Tokens, unique_model: str) -> None:
    """A model appears when its consumer starts and disappears within 15 s of its consumer's end."""
    _, consumer, sender = stack.served_model(unique_model, tokens.high)
    consumer.stop()

    def listed() -> bool:
        request = urllib.request.Request(sender.url + "/v1/models", headers={"authorization": f"Bearer {tokens.high}"})
        with urllib.request.urlopen(request, timeout=2) as response:
            return unique_model in [m["id"] for m in json.loads(response.read())["data"]]

    wait_until(lambda: not listed(), timeout_s=15, what="the model to disappear")
    with pytest.raises(openai.NotFoundError):
        ask(sender, tokens.high, unique_model, "gone")


def test_client_leaving_while_queued_gets_its_late_grant_released(stack: Stack, tokens: Tokens,
                                                                   unique_model: str) -> None:
    """A request abandoned in the queue is granted later; the sender gives that grant back at once."""
    fake, _, sender = stack.served_model(unique_model, tokens.high, SLOW, {"MAX_PARALLEL_REQUESTS": "1"})
    held = hold_slot(sender, tokens.high, unique_model)
    impatient = client(sender, tokens.high, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):  # the client gives up and closes its connection
        impatient.chat.completions.create(model=unique_model, messages=[{"role": "user", "content": "gone"}],
                                          max_tokens=1)
    assert queue_ready_count(unique_model) == 1  # its grant request still waits in RabbitMQ
    held.close()
    started = time.monotonic()
    assert ask(sender, tokens.high, unique_model, "next") == "tok0"
    assert time.monotonic() - started < 10  # not after the consumer's lease time-out
    assert arrival_order(fake) == ["hello", "next"]


def test_sender_metrics_count_requests_by_model_status_and_priority(stack: Stack, tokens: Tokens,
                                                                    unique_model: str) -> None:
    _, _, sender = stack.served_model(unique_model, tokens.high)
    for _ in range(3):
        ask(sender, tokens.low, unique_model, "counted")
    labels = f'model="{unique_model}",priority="1",status="200"'
    assert metric_value(sender, f"dispatcher_requests_total{{{labels}}}") == 3
    assert metric_value(sender, f'dispatcher_grant_wait_seconds_count{{model="{unique_model}",priority="1"}}') == 3
    assert metric_value(sender, f'dispatcher_requests_in_flight{{model="{unique_model}"}}') == 0
