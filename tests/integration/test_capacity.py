"""The consumer's capacity rules through the real path: openai SDK → sender.py → RabbitMQ → consumer.py
→ fake vLLM processes.

The fake vLLM gives each running request 1000 / (tpot_ms * running ** slowdown) tokens per second,
so with `FAST` (tpot 20 ms, slowdown 0.5) one request alone gets 50 tokens/s, n requests 50/sqrt(n)
each. Speeds are compared with wide margins, and every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Iterable

import openai
import pytest

from tests.helpers import wait_until
from tests.integration.conftest import Fake, Service, Stack, Tokens, http_get, queue_ready_count

pytestmark = pytest.mark.integration

FAST = ("--tpot-ms", "20", "--slowdown", "0.5")    # 50 tokens/s alone, 50/sqrt(n) each with n running
# Tokens/s per user, halfway between what 4 and 5 running requests get (25 and 22.4 each): the rule
# grants a fifth while 4 run at 25, and no sixth (which would bring each to 20.4). The 6 % on each side
# are more than the noise of a rate measured over one second.
FLOOR = 23.6
OVERLOAD = 20           # concurrent streams: 4 times what fits at the floor; all at once get 50/sqrt(20) = 11.2
ANSWER_TOKENS = 40


def async_client(sender: Service, token: str, **options) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sender.url + "/v1", api_key=token,
                              **{"max_retries": 0, "timeout": 60, **options})


async def stream_speed(client: openai.AsyncOpenAI, model: str, marker: str, tokens: int = ANSWER_TOKENS) -> float:
    """Tokens per second one client sees, from its first content chunk to its last."""
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": marker}],
                                                  max_tokens=tokens, stream=True)
    times = [time.perf_counter() async for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(times) == tokens
    return (len(times) - 1) / (times[-1] - times[0])


async def overload(sender: Service, token: str, model: str, count: int) -> list[float]:
    async with async_client(sender, token) as client:
        return await asyncio.gather(*[stream_speed(client, model, f"user-{index}") for index in range(count)])


def consumer_metric(consumer: Service, name: str, fake: Fake, **labels: str) -> float | None:
    """One sample of the consumer's /metrics (on its probe port) about the server `fake`."""
    label_text = ",".join(f'{key}="{value}"' for key, value in sorted({**labels, "server": fake.url}.items()))
    status, body = http_get(consumer.url + "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        name_and_labels, _, value = line.rpartition(" ")
        if name_and_labels == f"{name}{{{label_text}}}":
            return float(value)
    return None


def thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=4)


async def poll(predicate: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    """`wait_until` for a coroutine: the (blocking) predicate runs in a thread."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


def fake_requests(fake: Fake) -> list[dict]:
    status, body = http_get(fake.url + "/_fake/requests")
    assert status == 200
    return json.loads(body)


def markers(fake: Fake) -> list[str]:
    """The first message of each chat request the fake received, in arrival order."""
    return [json.loads(r["body"])["messages"][0]["content"] for r in fake_requests(fake) if r["method"] == "POST"]


def served_count(fake: Fake) -> int:
    return len(markers(fake))  # the consumer's own GET /v1/models is recorded too: not counted


def inversions(order: Iterable[str]) -> int:
    """Pairs (low, high) in which the low one came first."""
    lows_seen = count = 0
    for marker in order:
        if marker.startswith("low"):
            lows_seen += 1
        else:
            count += lows_seen
    return count


# ---------------------------------------------------------------------------------------------

def test_speed_rule_keeps_each_user_near_the_floor_under_overload(stack: Stack, tokens: Tokens,
                                                                   unique_model: str) -> None:
    """Several times more streams than fit at the floor: with the rule each one still gets about the
    floor (the others wait in the queue); without it, all run at once and each gets far less."""
    ruled, unruled = unique_model + "-ruled", unique_model + "-unruled"
    fakes = {model: stack.fake_vllm(model, *FAST) for model in (ruled, unruled)}
    stack.consumer(ruled, fakes[ruled].url, MIN_TOKENS_PER_SECOND_PER_USER=str(FLOOR), MAX_PARALLEL_REQUESTS="64")
    stack.consumer(unruled, fakes[unruled].url, MIN_TOKENS_PER_SECOND_PER_USER="0", MAX_PARALLEL_REQUESTS="64")
    sender = stack.sender()
    for model in (ruled, unruled):
        stack.served(sender, model, tokens.high)

    with_rule = asyncio.run(overload(sender, tokens.high, ruled, OVERLOAD))
    without_rule = asyncio.run(overload(sender, tokens.high, unruled, OVERLOAD))
    peak = fakes[ruled].stats()["max_running"], fakes[unruled].stats()["max_running"]
    print(f"with the rule: median {statistics.median(with_rule):.1f} min {min(with_rule):.1f} tok/s; "
          f"without: median {statistics.median(without_rule):.1f} max {max(without_rule):.1f}; peak running {peak}")
    assert statistics.median(with_rule) >= 0.9 * FLOOR, sorted(with_rule)
    assert min(with_rule) >= 0.8 * FLOOR, sorted(with_rule)
    assert statistics.median(without_rule) < 0.7 * FLOOR, sorted(without_rule)
    assert peak[0] < peak[1]


def test_idle_model_runs_a_burst_at_once_and_the_speed_rule_holds_beyond_it(stack: Stack, tokens: Tokens,
                                                                          unique_model: str) -> None:
    """Clients often send several requests at the same moment (Open WebUI: a chat and its title). On an
    idle model, a burst of BURST_GRANTS (4) all run at once; the fifth and sixth wait in the queue for
    the speed rule. Readings are 5 s apart, longer than the burst takes to answer, so nothing but the
    burst rule can have let the four run together."""
    fake, _, sender = stack.served_model(unique_model, tokens.high, FAST, {
        "MIN_TOKENS_PER_SECOND_PER_USER": str(FLOOR), "MAX_PARALLEL_REQUESTS": "64", "BURST_GRANTS": "4",
        "METRICS_REFRESH_SECONDS": "5"})

    async def scenario() -> list[float]:
        async with async_client(sender, tokens.high) as client:
            streams = [asyncio.create_task(stream_speed(client, unique_model, f"burst-{index}", 50))
                       for index in range(6)]
            await poll(lambda: fake.stats()["running"] == 4 and queue_ready_count(unique_model) == 2,
                       "four requests to run at once while two wait in the queue")
            return await asyncio.gather(*streams)

    speeds = asyncio.run(scenario())
    print(f"speeds {sorted(round(speed, 1) for speed in speeds)} tok/s; peak running {fake.stats()['max_running']}")
    assert len(speeds) == 6 and fake.stats()["max_running"] == 4


def servers_env(*fakes: Fake) -> str:
    return json.dumps([{"url": fake.url} for fake in fakes])


def test_faster_server_gets_more_grants(stack: Stack, tokens: Tokens, unique_model: str) -> None:
    """Two servers, the slow one listed first: at the floor it fits one request (25 tokens/s alone),
    the fast one about five. Both start idle and take a burst of 4 each (BURST_GRANTS); from then on
    the speed rule sends most grants to the fast one, and the slow one never runs more than its burst."""
    slow = stack.fake_vllm(unique_model, "--tpot-ms", "40", "--slowdown", "0.5")
    fast = stack.fake_vllm(unique_model, *FAST)
    consumer = stack.consumer(unique_model, slow.url, VLLM_SERVERS=servers_env(slow, fast),
                              MIN_TOKENS_PER_SECOND_PER_USER=str(FLOOR), MAX_PARALLEL_REQUESTS="64")
    sender = stack.sender()
    stack.served(sender, unique_model, tokens.high)

    speeds = asyncio.run(overload(sender, tokens.high, unique_model, 32))
    counts = served_count(slow), served_count(fast)
    print(f"grants: slow {counts[0]}, fast {counts[1]}; peak running {slow.stats()['max_running']}, "
          f"{fast.stats()['max_running']}; median speed {statistics.median(speeds):.1f}")
    assert sum(counts) == 32 and counts[0] >= 1
    assert counts[1] >= 2 * (counts[0] - 4), "beyond their first bursts, the fast one must get most grants"
    assert slow.stats()["max_running"] <= 4
    assert consumer_metric(consumer, "dispatcher_consumer_grants_total", fast) == counts[1]


def ask(sender: Service, token: str, model: str, marker: str, tokens: int = 5) -> str:
    client = openai.OpenAI(base_url=sender.url + "/v1", api_key=token, max_retries=0, timeout=60)
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": marker}],
                                            max_tokens=tokens)
    return answer.choices[0].message.content


async def ask_many(sender: Service, token: str, model: str, count: int, tokens: int) -> list[str]:
    async with async_client(sender, token) as client:
        answers = await asyncio.gather(*[client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"r{index}"}], max_tokens=tokens)
            for index in range(count)])
    return [answer.choices[0].message.content for answer in answers]


def test_unhealthy_server_gets_nothing_until_it_recovers(stack: Stack, tokens: Tokens, unique_model: str) -> None:
    """A server whose /health or /metrics fails gets no grant; with none healthy the consumer is not
    ready and requests wait in the queue (no 502); they are served once a server is back."""
    first = stack.fake_vllm(unique_model, *FAST)
    second = stack.fake_vllm(unique_model, *FAST)
    consumer = stack.consumer(unique_model, first.url, VLLM_SERVERS=servers_env(first, second),
                              MIN_TOKENS_PER_SECOND_PER_USER="0", MAX_PARALLEL_REQUESTS="2")
    sender = stack.sender()
    stack.served(sender, unique_model, tokens.high)

    def healthy(fake: Fake) -> float | None:
        return consumer_metric(consumer, "dispatcher_consumer_server_healthy", fake)

    for change in ({"healthy": False}, {"healthy": True, "drop_metrics": True}):
        first.control(**change)
        wait_until(lambda: healthy(first) == 0, what=f"the consumer to see {change}")
        before = served_count(second)
        assert len(asyncio.run(ask_many(sender, tokens.high, unique_model, 6, 20))) == 6
        assert served_count(first) == 0 and served_count(second) == before + 6

    first.control(drop_metrics=False)
    wait_until(lambda: healthy(first) == 1, what="the first server to be healthy again")
    asyncio.run(ask_many(sender, tokens.high, unique_model, 6, 20))   # more than the second one's cap of 2
    assert served_count(first) >= 1

    for fake in (first, second):
        fake.control(healthy=False)
    wait_until(lambda: http_get(consumer.url + "/ready")[0] == 503, what="the consumer to be unready")
    with thread_pool() as pool:
        waiting = pool.submit(ask, sender, tokens.high, unique_model, "waiting")
        wait_until(lambda: queue_ready_count(unique_model) == 1, what="the request to wait in the queue")
        assert not waiting.done()
        second.control(healthy=True)
        assert waiting.result(30) == "tok0 tok1 tok2 tok3 tok4"
    assert second.stats()["last_request"]["body_len"] > 0


def test_high_priority_passes_every_waiting_low_one_under_saturation(stack: Stack, tokens: Tokens,
                                                                     unique_model: str) -> None:
    """The GPU is saturated by the speed rule with low-priority streams, more of them waiting. The
    fake is then slowed down so that nothing is granted while high-priority requests join the queue;
    once it speeds up again, every high one is granted before any low one still waiting."""
    fake, consumer, sender = stack.served_model(unique_model, tokens.high, FAST, {
        "MIN_TOKENS_PER_SECOND_PER_USER": str(FLOOR), "MAX_PARALLEL_REQUESTS": "64"})

    async def scenario() -> tuple[int, list[str]]:
        async with async_client(sender, tokens.low) as low, async_client(sender, tokens.high) as high:
            lows = [asyncio.create_task(stream_speed(low, unique_model, f"low-{index}", 30)) for index in range(20)]
            await poll(lambda: fake.stats()["running"] >= 4 and queue_ready_count(unique_model) >= 8,
                       "the speed rule to saturate the fake with low requests, more of them waiting")
            fake.control(tpot_ms=300)   # 1.5 tokens/s each, 7.5 in all: under the floor even if only one ran
            await poll(lambda: (consumer_metric(consumer, "dispatcher_consumer_tokens_per_second_per_request", fake)
                                or FLOOR) < FLOOR / 3, "the speed the consumer measures to fall")
            arrived = len(markers(fake))
            lows_waiting = await asyncio.to_thread(queue_ready_count, unique_model)
            highs = [asyncio.create_task(stream_speed(high, unique_model, f"high-{index}", 30)) for index in range(5)]
            await poll(lambda: queue_ready_count(unique_model) == lows_waiting + 5, "high requests to be queued")
            assert len(markers(fake)) == arrived, "a request was granted while the speed rule held"
            fake.control(tpot_ms=20)
            await asyncio.gather(*lows, *highs)
            return arrived, markers(fake)

    arrived, order = asyncio.run(scenario())
    after = order[arrived:]
    print(f"{arrived} low requests granted before the high ones queued; then: {' '.join(after)}")
    assert len(order) == 25 and inversions(after) == 0
    assert all(marker.startswith("high") for marker in after[:5])


def test_killed_sender_gives_its_slot_back_once_vllm_drops_the_request(stack: Stack, tokens: Tokens,
                                                                        unique_model: str) -> None:
    """SIGKILL: the sender never releases, but its connection to vLLM closes, vLLM aborts the request,
    and the consumer frees the slot at its next readings (not after LEASE_TIMEOUT_SECONDS)."""
    fake, consumer, doomed = stack.served_model(unique_model, tokens.high, FAST, {
        "MAX_PARALLEL_REQUESTS": "1", "LEASE_TIMEOUT_SECONDS": "600"})
    survivor = stack.sender()
    stack.served(survivor, unique_model, tokens.high)
    client = openai.OpenAI(base_url=doomed.url + "/v1", api_key=tokens.high, max_retries=0, timeout=60)
    stream = client.chat.completions.create(model=unique_model, max_tokens=2000, stream=True,
                                            messages=[{"role": "user", "content": "doomed"}])
    next(iter(stream))
    with thread_pool() as pool:
        waiting = pool.submit(ask, survivor, tokens.high, unique_model, "next")
        wait_until(lambda: queue_ready_count(unique_model) == 1, what="the next request to wait for the slot")
        doomed.kill()
        killed_at = time.monotonic()
        assert waiting.result(30) == "tok0 tok1 tok2 tok3 tok4"
        freed_after_s = time.monotonic() - killed_at
    stream.close()
    print(f"slot back {freed_after_s:.2f}s after the sender was killed")
    assert fake.stats()["disconnects"] == 1
    assert freed_after_s < 10  # a few refreshes and the grace period, against a lease timeout of 600 s
    assert consumer_metric(consumer, "dispatcher_consumer_lost_releases_total", fake) == 1


def test_restarted_consumer_does_not_grant_beyond_the_cap(stack: Stack, tokens: Tokens, unique_model: str) -> None:
    """Three requests run when the consumer dies (SIGKILL); the new one counts them from vLLM's
    /metrics, so with a cap of 3 the next requests wait until those end."""
    cap = {"MAX_PARALLEL_REQUESTS": "3", "MIN_TOKENS_PER_SECOND_PER_USER": "0"}
    fake, old, sender = stack.served_model(unique_model, tokens.high, FAST, cap)
    client = openai.OpenAI(base_url=sender.url + "/v1", api_key=tokens.high, max_retries=0, timeout=60)
    streams = [client.chat.completions.create(model=unique_model, max_tokens=2000, stream=True,
                                              messages=[{"role": "user", "content": f"running-{index}"}])
               for index in range(3)]
    for stream in streams:
        next(iter(stream))
    assert fake.stats()["running"] == 3
    old.kill()
    new = stack.consumer(unique_model, fake.url, **cap)
    with thread_pool() as pool:
        later = [pool.submit(ask, sender, tokens.high, unique_model, f"later-{index}") for index in range(2)]
        wait_until(lambda: queue_ready_count(unique_model) == 2, what="the new requests to wait")
        wait_until(lambda: consumer_metric(new, "dispatcher_consumer_slots_used", fake) == 3,
                   what="the new consumer to count what vLLM runs")
        assert queue_ready_count(unique_model) == 2 and fake.stats()["running"] == 3
        streams[0].close()   # one ends: its release goes to the dead consumer; vLLM's count frees the slot
        assert [future.result(30) for future in later] == ["tok0 tok1 tok2 tok3 tok4"] * 2
    for stream in streams[1:]:
        stream.close()
    assert fake.stats()["max_running"] == 3


def test_forward_priority_sets_the_vllm_header_and_keeps_the_body(stack: Stack, tokens: Tokens,
                                                                  unique_model: str) -> None:
    """FORWARD_PRIORITY=1: vLLM receives X-Vllm-Priority = MAX_PRIORITY - priority (a client's own
    header is replaced), and the body bytes the client sent."""
    fake, _, sender = stack.served_model(unique_model, tokens.high, (), {"FORWARD_PRIORITY": "1"})
    sent: list[bytes] = []
    cases = [(tokens.low, {}, "9"),                              # priority 1
             (tokens.high, {"X-Priority": "4"}, "6"),            # lowered from 9 to 4 for this request
             (tokens.high, {"X-Vllm-Priority": "0"}, "1")]       # the client cannot pick its vLLM priority
    for token, headers, expected in cases:
        http_client = openai.DefaultHttpxClient(event_hooks={"request": [lambda request: sent.append(request.read())]})
        client = openai.OpenAI(base_url=sender.url + "/v1", api_key=token, max_retries=0, timeout=30,
                               default_headers=headers, http_client=http_client)
        client.chat.completions.create(model=unique_model, max_tokens=3, temperature=0.5, stream=True,
                                       messages=[{"role": "user", "content": "héllo ✓"}]).close()
        last = fake.stats()["last_request"]
        assert last["headers"]["x-vllm-priority"] == expected, (headers, last["headers"])
        assert last["body_sha256"] == hashlib.sha256(sent[-1]).hexdigest()
        assert last["body_len"] == len(sent[-1])
