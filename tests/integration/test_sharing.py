"""Sharing a saturated GPU: fair share within a priority, counts shared by every sender, computed Retry-After,
the client's deadline (X-Queue-Timeout), and GET /v1/queue. Real senders, consumers and RabbitMQ; the openai SDK.

Assertions compare the clients' own measurements with each other (the light token against the heavy one, the
advertised wait against the wait observed), never with a fixed number of milliseconds.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import statistics
import time
import uuid

import openai
import pytest

from tests.helpers import ClosedLoop, http, wait_until
from tests.integration.conftest import Service, Stack, Tokens, metric_value

PROMPT = [{"role": "user", "content": "hello"}]
# Each request holds its slot for about 0.3 s (15 tokens at 20 ms, whatever else runs).
STEADY = ("--tpot-ms", "20", "--slowdown", "0")
SERVICE_TOKENS = 15


def client(sender: Service, token: str, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=sender.url + "/v1", api_key=token, **{"max_retries": 0, "timeout": 60, **options})


def queue_of(sender: Service, token: str, model: str) -> dict:
    status, body = http(sender.url + "/v1/queue", token=token)
    assert status == 200, body
    return next(entry for entry in json.loads(body)["data"] if entry["model"] == model)


def clients(sender: Service, token: str, model: str, count: int, **headers: str) -> ClosedLoop:
    """`count` requests of `token` kept outstanding (ClosedLoop), started."""
    return ClosedLoop(sender.url + "/v1", token, model, count, max_tokens=SERVICE_TOKENS, headers=headers or None,
                      timeout_s=60).start()


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def test_fair_share_puts_a_light_token_before_a_heavy_one_of_the_same_priority(
        stack: Stack, tokens: Tokens, unique_model: str) -> None:
    """Two tokens of one priority on a model with 2 slots: the heavy one keeps 12 requests outstanding, the
    light one 2. The light token's requests no longer wait behind the heavy token's backlog: its p90 latency
    is below the heavy token's median, and the heavy token still gets the slots the light one leaves."""
    suffix = uuid.uuid4().hex[:6]
    heavy_token = tokens.create(f"heavy-{suffix}", 5, 1000)
    light_token = tokens.create(f"light-{suffix}", 5, 1000)
    _, _, sender = stack.served_model(unique_model, heavy_token, STEADY, {"MAX_PARALLEL_REQUESTS": "2"})
    heavy = clients(sender, heavy_token, unique_model, 12)
    wait_until(lambda: queue_of(sender, heavy_token, unique_model)["waiting"] >= 8, what="the heavy backlog")
    light = clients(sender, light_token, unique_model, 2)
    wait_until(lambda: len(light.latencies) >= 20, timeout_s=60, interval_s=0.2, what="20 light requests")
    light.stop()
    heavy.stop()
    print(f"light p90 {p90(light.latencies):.2f}s ({len(light.latencies)} done), heavy median "
          f"{statistics.median(heavy.latencies):.2f}s ({len(heavy.latencies)} done)")
    assert p90(light.latencies) < statistics.median(heavy.latencies)
    assert len(heavy.latencies) >= 10  # not starved: it gets the slots the light token leaves
    assert set(light.statuses) == set(heavy.statuses) == {"200"}


def test_counts_are_shared_between_senders_and_a_stopped_sender_leaves_none(
        stack: Stack, tokens: Tokens, unique_model: str) -> None:
    """Requests waiting on one sender count for the threshold on another (within a second), and when that
    sender dies they stop counting (within a few seconds): nobody is shed for requests that no longer exist."""
    fake, _, first = stack.served_model(unique_model, tokens.high, STEADY, {"MAX_PARALLEL_REQUESTS": "1"})
    second = stack.sender()
    stack.served(second, unique_model, tokens.high)
    held = client(first, tokens.high).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=2000,
                                                             stream=True)
    next(iter(held))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(client(first, tokens.high, timeout=5).chat.completions.create, model=unique_model,
                        messages=PROMPT, max_tokens=1)
        wait_until(lambda: queue_of(second, tokens.strict, unique_model)["waiting"] == 3, timeout_s=5,
                   what="the second sender to count the first one's waiting requests")
        with pytest.raises(openai.RateLimitError) as caught:
            client(second, tokens.strict).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1)
        assert caught.value.body["code"] == "queue_full"
        assert metric_value(second, f'dispatcher_shed_total{{model="{unique_model}",reason="queue_full"}}') == 1
        first.kill()
        wait_until(lambda: queue_of(second, tokens.strict, unique_model)["waiting"] == 0, timeout_s=5,
                   what="the dead sender's requests to stop counting")
    held.close()


def test_retry_after_follows_the_measured_wait(stack: Stack, tokens: Tokens, unique_model: str) -> None:
    """On a saturated model with a steady service rate, the Retry-After of a 429 (the client would not wait
    that long) is within a factor of 2 of the wait the same request then really has."""
    _, _, sender = stack.served_model(unique_model, tokens.low, STEADY,
                                      {"MAX_PARALLEL_REQUESTS": "2", "FAIR_SHARE_LEVELS": "1"})
    backlog = clients(sender, tokens.low, unique_model, 10)
    try:
        wait_until(lambda: queue_of(sender, tokens.low, unique_model)["waiting"] >= 7 and len(backlog.latencies) >= 20,
                   timeout_s=30, what="a steady backlog and a measured rate")
        with pytest.raises(openai.RateLimitError) as caught:
            client(sender, tokens.low, default_headers={"X-Queue-Timeout": "0.1"}).chat.completions.create(
                model=unique_model, messages=PROMPT, max_tokens=SERVICE_TOKENS)
        assert caught.value.body["code"] == "queue_timeout"
        advertised = int(caught.value.response.headers["retry-after"])
        started = time.monotonic()
        client(sender, tokens.low).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1)
        waited = time.monotonic() - started
    finally:
        backlog.stop()
    print(f"Retry-After {advertised}s, waited {waited:.2f}s")
    # Within a factor of 2 of the truth, as whole seconds can say it (Retry-After rounds up).
    assert waited / 2 <= advertised <= max(1, math.ceil(waited * 2))


def test_queue_timeout_waits_at_most_that_long_and_is_not_forwarded(stack: Stack, tokens: Tokens,
                                                                    unique_model: str) -> None:
    fake, _, sender = stack.served_model(unique_model, tokens.high, STEADY, {"MAX_PARALLEL_REQUESTS": "1"})
    quick = client(sender, tokens.high, default_headers={"X-Queue-Timeout": "30"})
    for _ in range(10):  # a measured grant rate, and the header checked on the way
        quick.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1)
    assert "x-queue-timeout" not in {name.lower() for name in fake.stats()["last_request"]["headers"]}

    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(openai.BadRequestError) as caught:
            client(sender, tokens.high, default_headers={"X-Queue-Timeout": bad}).chat.completions.create(
                model=unique_model, messages=PROMPT, max_tokens=1)
        assert caught.value.body["param"] == "X-Queue-Timeout"

    held = client(sender, tokens.high).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=2000,
                                                               stream=True)
    next(iter(held))
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        client(sender, tokens.high, default_headers={"X-Queue-Timeout": "1"}).chat.completions.create(
            model=unique_model, messages=PROMPT, max_tokens=1)
    waited = time.monotonic() - started
    assert caught.value.body["code"] == "grant_timeout"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert 0.9 <= waited < 5  # its own 1 s, not GRANT_TIMEOUT
    held.close()


def test_queue_status_shows_the_queue_from_the_callers_priority(stack: Stack, tokens: Tokens,
                                                                unique_model: str) -> None:
    fake, _, sender = stack.served_model(unique_model, tokens.high, STEADY, {"MAX_PARALLEL_REQUESTS": "1"})
    held = client(sender, tokens.low).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=2000,
                                                              stream=True)
    next(iter(held))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        pool.submit(client(sender, tokens.high, timeout=5).chat.completions.create, model=unique_model,
                    messages=PROMPT, max_tokens=1)
        for _ in range(2):
            pool.submit(client(sender, tokens.low, timeout=5).chat.completions.create, model=unique_model,
                        messages=PROMPT, max_tokens=1)
        wait_until(lambda: queue_of(sender, tokens.low, unique_model)["waiting"] == 3, what="three waiting")
        low, high = queue_of(sender, tokens.low, unique_model), queue_of(sender, tokens.high, unique_model)
        held.close()
    assert set(low) == {"model", "waiting", "waiting_ahead", "running", "slots", "grant_rate",
                        "estimated_wait_seconds", "your_waiting", "your_running"}
    assert (low["waiting"], low["waiting_ahead"], low["running"], low["slots"]) == (3, 3, 1, 1)
    assert (low["your_waiting"], low["your_running"]) == (2, 1)
    assert (high["waiting_ahead"], high["your_waiting"], high["your_running"]) == (1, 1, 0)
    assert low["grant_rate"] > 0 and low["estimated_wait_seconds"] > high["estimated_wait_seconds"]
    assert http(sender.url + "/v1/queue")[0] == 401


def test_aging_bounds_the_wait_of_a_low_priority_under_endless_high_priority_load(
        stack: Stack, tokens: Tokens, unique_model: str) -> None:
    """Priority 9 keeps the one slot busy for good. Through a sender with PRIORITY_AGING_SECONDS, a priority-1
    request rises one level per period and is served; through a sender without it (the default, strict
    priority), the same request gets 503 when its grant timeout runs out."""
    _, _, aging = stack.served_model(unique_model, tokens.high, STEADY, {"MAX_PARALLEL_REQUESTS": "1"},
                                     {"PRIORITY_AGING_SECONDS": "0.3", "GRANT_TIMEOUT": "30"})
    strict = stack.sender(GRANT_TIMEOUT="3")
    stack.served(strict, unique_model, tokens.high)
    high = clients(aging, tokens.high, unique_model, 4)
    try:
        wait_until(lambda: queue_of(aging, tokens.high, unique_model)["waiting"] >= 2, what="a high-priority backlog")
        with pytest.raises(openai.InternalServerError) as caught:
            client(strict, tokens.low).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1)
        assert caught.value.body["code"] == "grant_timeout"
        answer = client(aging, tokens.low).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1)
        assert answer.choices
    finally:
        high.stop()
    assert set(high.statuses) == {"200"}


def test_per_token_cap_holds_over_two_senders(stack: Stack, tokens: Tokens, unique_model: str) -> None:
    """A token with max_in_flight 2 has one request running and one waiting on one sender: its next request,
    on another sender, gets 429 token_limit with Retry-After; another token is not affected; once its
    requests are done, the token is served again."""
    suffix = uuid.uuid4().hex[:6]
    result = tokens.admin("create", f"capped-{suffix}", "--priority", "5", "--threshold", "1000",
                          "--max-in-flight", "2")
    assert result.returncode == 0, result.stderr
    capped = result.stdout.strip()
    _, _, first = stack.served_model(unique_model, capped, STEADY, {"MAX_PARALLEL_REQUESTS": "1"})
    second = stack.sender()
    stack.served(second, unique_model, capped)
    held = client(first, capped).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=2000,
                                                         stream=True)
    next(iter(held))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client(first, capped).chat.completions.create, model=unique_model, messages=PROMPT,
                              max_tokens=1)
        wait_until(lambda: queue_of(second, capped, unique_model)["your_waiting"] == 1, timeout_s=5,
                   what="the second sender to count the token's waiting request")
        with pytest.raises(openai.RateLimitError) as caught:
            client(second, capped).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1)
        assert caught.value.body["code"] == "token_limit"
        assert int(caught.value.response.headers["retry-after"]) >= 1
        assert metric_value(second, f'dispatcher_shed_total{{model="{unique_model}",reason="token_limit"}}') == 1
        held.close()
        assert waiting.result(30).choices
    wait_until(lambda: queue_of(second, capped, unique_model)["your_running"] == 0, timeout_s=5,
               what="the token's requests to be done")
    assert client(second, capped).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1).choices


def test_a_queue_left_by_an_older_version_does_not_wedge_an_upgrade(stack: Stack, tokens: Tokens,
                                                                    unique_model: str) -> None:
    """Before fair share, a model's queue was `dispatcher.model.<model>` with x-max-priority 10; RabbitMQ refuses
    to declare an existing queue again with other arguments. The queue left by that version does not stop
    the new consumer (its queue's name carries its x-max-priority) nor the sender, which publishes where the
    consumer announces: the model is served."""
    import asyncio

    import aiormq

    from common.messages import model_queue
    from tests.integration.conftest import RABBITMQ_URL

    async def declare_old_queue() -> None:
        connection = await aiormq.connect(RABBITMQ_URL)
        try:
            channel = await connection.channel()
            await channel.queue_declare(model_queue(unique_model), arguments={"x-max-priority": 10,
                                                                              "x-expires": 30000})
        finally:
            await connection.close()

    asyncio.run(declare_old_queue())
    _, _, sender = stack.served_model(unique_model, tokens.high, STEADY)
    answer = client(sender, tokens.high).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1)
    assert answer.choices
