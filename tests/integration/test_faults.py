"""Fault injection on the real path: a broker restarted under load, a consumer killed, vLLM dying mid-stream,
clients hanging up en masse. Each test counts what the clients saw: answered (and how), hung, lost.

The broker that is restarted is a node of the test's own (`PrivateBroker`), never the machine's shared one.
`FAULT_BROKER_RESTARTS` (default 8) sets how many restarts the restart loop makes; CI runs the default, a
longer run is e.g. `FAULT_BROKER_RESTARTS=40 pytest tests/integration/test_faults.py`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.helpers import ClosedLoop, free_port, http, wait_until
from tests.integration.brokers import PrivateBroker
from tests.integration.conftest import Service, Stack, Tokens, http_get, metric_value, queue_ready_count

PROMPT = [{"role": "user", "content": "hello"}]
RESTARTS = int(os.environ.get("FAULT_BROKER_RESTARTS", "8"))
OUTAGE_S = 2.0       # how long the broker stays down in the restart loop (the fault, not a wait)
RECOVERY_BOUND_S = 5.0  # the service answers 200 again within this long of the broker's return (target: 2 s)


@pytest.fixture(scope="module")
def broker() -> Iterator[PrivateBroker]:
    node = PrivateBroker()
    node.start()
    try:
        yield node
    finally:
        node.shutdown()


@pytest.fixture
def broker_up(broker: PrivateBroker) -> PrivateBroker:
    """The private node, running (a failed test may have left it stopped)."""
    try:
        broker.ctl("await_startup", "--timeout", "1")
    except subprocess.CalledProcessError:  # stopped: start it
        broker.start_app()
    return broker


def tokens_file(tmp_path: Path) -> str:
    path = tmp_path / "tokens.yaml"
    path.write_text("- {token: sk-fault-high, name: fault-high, priority: 9, threshold: 1000}\n"
                    "- {token: sk-fault-low, name: fault-low, priority: 1, threshold: 1000}\n")
    return str(path)


def private_stack(stack: Stack, broker: PrivateBroker, model: str, tmp_path: Path, *, slots: str,
                  fake_args: tuple[str, ...] = (), **sender_env: str) -> tuple[Service, Service]:
    fake = stack.fake_vllm(model, *fake_args)
    consumer = stack.consumer(model, fake.url, RABBITMQ_URL=broker.url, MAX_PARALLEL_REQUESTS=slots)
    sender = stack.sender(RABBITMQ_URL=broker.url, DATABASE_URL="", TOKENS_FILE=tokens_file(tmp_path),
                          **sender_env)
    stack.served(sender, model, "sk-fault-high")
    return consumer, sender


def listed_models(sender: Service, token: str = "sk-fault-high") -> list[str]:
    status, body = http(sender.url + "/v1/models", token=token, timeout_s=5)
    assert status == 200, body
    return [model["id"] for model in json.loads(body)["data"]]


def test_broker_restarts_under_load_recover_every_time(stack: Stack, broker_up: PrivateBroker, unique_model: str,
                                                       tmp_path: Path) -> None:
    """The broker is stopped (CONNECTION_FORCED) and started again, again and again, under load. After every
    restart the service answers again within a few seconds; the model never vanishes (no 404); readiness is
    green again; no client hangs."""
    _, sender = private_stack(stack, broker_up, unique_model, tmp_path, slots="4", fake_args=("--tpot-ms", "5"))
    recoveries = []
    with ClosedLoop(sender.url + "/v1", "sk-fault-high", unique_model, 6, max_tokens=5) as load:
        wait_until(lambda: load.answered_since(0), what="the first answer under load")
        for restart in range(RESTARTS):
            broker_up.stop_app()
            time.sleep(OUTAGE_S)  # the outage itself
            assert unique_model in listed_models(sender), f"restart {restart}: the model vanished"
            broker_up.start_app()
            back = time.monotonic()
            wait_until(lambda: load.answered_since(back), timeout_s=30, interval_s=0.02,
                       what=f"an answer after restart {restart} (statuses so far: {dict(load.statuses)})")
            recoveries.append(load.last_ok - back)
            time.sleep(1.0)  # load between two restarts
    print(f"recovery after each restart (s): {[round(r, 2) for r in recoveries]}; statuses: {dict(load.statuses)}")
    assert max(recoveries) < RECOVERY_BOUND_S, recoveries
    assert load.statuses["404"] == 0, load.statuses
    assert load.statuses["timeout"] == 0 and load.statuses["connection error"] == 0, load.statuses
    assert set(load.statuses) <= {"200", "503"}, load.statuses
    assert http_get(sender.url + "/health/readiness")[0] == 200


def test_waiting_requests_are_served_after_a_broker_restart_in_priority_order(
        stack: Stack, broker_up: PrivateBroker, unique_model: str, tmp_path: Path) -> None:
    """Requests waiting for a grant when the broker goes away are re-published when it is back, with their
    priority: they are served (not 503), high before low, although the broker lost every message."""
    _, sender = private_stack(stack, broker_up, unique_model, tmp_path, slots="1", fake_args=("--tpot-ms", "20"))
    high = openai.OpenAI(base_url=sender.url + "/v1", api_key="sk-fault-high", max_retries=0, timeout=60)
    low = openai.OpenAI(base_url=sender.url + "/v1", api_key="sk-fault-low", max_retries=0, timeout=60)
    held = high.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1000, stream=True)
    next(iter(held))  # the one slot is taken
    finished: list[str] = []
    lock = threading.Lock()

    def call(client: openai.OpenAI, name: str) -> str:
        client.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=2)
        with lock:
            finished.append(name)
        return name

    def waiting() -> float | None:
        return metric_value(sender, f'dispatcher_queue_waiting{{model="{unique_model}"}}')

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(call, low, f"low-{i}") for i in range(3)]
        wait_until(lambda: waiting() == 3, what="three low requests waiting")
        futures += [pool.submit(call, high, f"high-{i}") for i in range(2)]
        wait_until(lambda: waiting() == 5, what="five requests waiting")
        broker_up.stop_app()  # every waiting message is lost with the node's queues
        time.sleep(OUTAGE_S)
        broker_up.start_app()
        wait_until(lambda: queue_ready_count(unique_model, broker_up.url) == 5, timeout_s=15,
                   what="the five requests in the queue again")
        held.close()  # the slot is released on the new connection
        results = [future.result(60) for future in futures]
    assert sorted(results) == ["high-0", "high-1", "low-0", "low-1", "low-2"]
    assert set(finished[:2]) == {"high-0", "high-1"}, finished


def test_waiting_request_gets_503_at_its_own_deadline_while_the_broker_stays_away(
        stack: Stack, broker_up: PrivateBroker, unique_model: str, tmp_path: Path) -> None:
    """Waiting through an outage is bounded by the request's grant timeout, never by the outage: it is
    answered 503 with Retry-After when its own deadline comes, not at the moment of loss and not never."""
    _, sender = private_stack(stack, broker_up, unique_model, tmp_path, slots="1", fake_args=("--tpot-ms", "20"),
                              GRANT_TIMEOUT="4")
    client = openai.OpenAI(base_url=sender.url + "/v1", api_key="sk-fault-high", max_retries=0, timeout=60)
    held = client.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=400, stream=True)
    next(iter(held))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        waiting = pool.submit(client.chat.completions.create, model=unique_model, messages=PROMPT, max_tokens=1)
        wait_until(lambda: metric_value(sender, f'dispatcher_queue_waiting{{model="{unique_model}"}}') == 1,
                   what="a request waiting")
        broker_up.stop_app()
        try:
            with pytest.raises(openai.InternalServerError) as caught:
                waiting.result(30)
            waited = time.monotonic() - started
        finally:
            broker_up.start_app()
    assert caught.value.status_code == 503 and caught.value.body["code"] == "grant_timeout"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert waited >= 3.5  # its own 4 s deadline, not the moment the broker went away
    held.close()


def test_model_stays_listed_and_answers_503_while_the_broker_is_away(
        stack: Stack, broker_up: PrivateBroker, unique_model: str, tmp_path: Path) -> None:
    """A model does not vanish because the sender cannot hear the broker: longer than an announcement lives
    (10 s), the model stays listed and requests get 503 + Retry-After (which SDKs retry), never 404."""
    _, sender = private_stack(stack, broker_up, unique_model, tmp_path, slots="2", RPC_RECONNECT_ATTEMPTS="2")
    client = openai.OpenAI(base_url=sender.url + "/v1", api_key="sk-fault-high", max_retries=0, timeout=10)
    broker_up.stop_app()
    try:
        wait_until(lambda: http_get(sender.url + "/health/readiness")[0] == 503, timeout_s=30,
                   what="readiness to turn red")
        outage_end = time.monotonic() + 12  # longer than an announcement's 10 s
        statuses = collections.Counter()
        while time.monotonic() < outage_end:
            assert unique_model in listed_models(sender)
            try:
                client.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1)
                statuses[200] += 1
            except openai.APIStatusError as error:
                statuses[error.status_code] += 1
                assert error.response.headers.get("retry-after"), error
            time.sleep(0.2)
    finally:
        broker_up.start_app()
    assert set(statuses) == {503}, statuses
    wait_until(lambda: http_get(sender.url + "/health/readiness")[0] == 200, timeout_s=RECOVERY_BOUND_S,
               what="readiness green again")
    client.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1)


def consumer_metric(consumer: Service, name: str) -> float:
    """The sum of one metric family's samples on a consumer's probe port."""
    status, body = http_get(consumer.url + "/metrics")
    assert status == 200
    return sum(float(line.rpartition(" ")[2]) for line in body.decode().splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_consumer_killed_while_its_slots_are_busy_loses_no_request(stack: Stack, tokens: Tokens,
                                                                   unique_model: str) -> None:
    """SIGKILL a consumer while its slots stream and more requests wait: the running streams end normally
    (they talk to vLLM directly), the waiting ones are served by the other consumer of the model, and no
    client hangs or is lost."""
    fakes = [stack.fake_vllm(unique_model, "--tpot-ms", "10") for _ in range(2)]
    doomed, survivor = (stack.consumer(unique_model, fake.url, MAX_PARALLEL_REQUESTS="2") for fake in fakes)
    sender = stack.sender()
    stack.served(sender, unique_model, tokens.high)
    client = openai.OpenAI(base_url=sender.url + "/v1", api_key=tokens.high, max_retries=0, timeout=60)

    def stream() -> str:
        chunks = list(client.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=100,
                                                     stream=True))
        return chunks[-1].choices[0].finish_reason or "none"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        running = [pool.submit(stream) for _ in range(4)]
        wait_until(lambda: sum(fake.stats()["running"] for fake in fakes) == 4, what="four slots streaming")
        waiting = [pool.submit(stream) for _ in range(4)]
        wait_until(lambda: queue_ready_count(unique_model) == 4, what="four requests waiting")
        doomed.kill()
        outcomes = collections.Counter(future.result(60) for future in running + waiting)
    assert outcomes == {"length": 8}, outcomes  # every stream complete: answered 8, hung 0, lost 0
    assert unique_model in listed_models(sender, tokens.high)


def test_vllm_crash_mid_stream_fails_the_streams_and_service_returns_with_vllm(
        stack: Stack, tokens: Tokens, unique_model: str) -> None:
    """vLLM dies with three streams running: each client sees its stream fail (never a short success, never a
    hang); while vLLM is down a request waits and gets 503 at its deadline; once vLLM is back, requests are
    served again."""
    port = free_port()
    fake = stack.fake_vllm(unique_model, "--tpot-ms", "20", port=port)
    consumer = stack.consumer(unique_model, fake.url, MAX_PARALLEL_REQUESTS="4")
    sender = stack.sender(GRANT_TIMEOUT="3")
    stack.served(sender, unique_model, tokens.high)
    client = openai.OpenAI(base_url=sender.url + "/v1", api_key=tokens.high, max_retries=0, timeout=30)

    def stream() -> str:
        try:
            for chunk in client.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1000,
                                                        stream=True):
                if chunk.choices and chunk.choices[0].finish_reason:
                    return "complete"
        except Exception as exc:  # noqa: BLE001 - what the SDK raises on a cut stream is the outcome
            return f"failed: {type(exc).__name__}"
        return "ended without a finish reason"

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(stream) for _ in range(3)]
        wait_until(lambda: fake.stats()["running"] == 3, what="three streams running")
        fake.service.kill()
        outcomes = [future.result(30) for future in streams]
    assert all(outcome.startswith("failed") for outcome in outcomes), outcomes

    wait_until(lambda: consumer_metric(consumer, "dispatcher_consumer_server_healthy") == 0, timeout_s=15,
               what="the consumer to see vLLM down")
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1)
    assert caught.value.body["code"] == "grant_timeout"

    stack.fake_vllm(unique_model, "--tpot-ms", "1", port=port)
    wait_until(lambda: consumer_metric(consumer, "dispatcher_consumer_server_healthy") == 1, timeout_s=15,
               what="the consumer to see vLLM back")
    answer = client.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=3)
    assert answer.choices[0].finish_reason == "length"


HANGUPS = 100


async def hang_up_mid_stream(port: int, token: str, model: str) -> bool:
    """Opens a stream, reads until its first event, and closes the connection. True if an event came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": model, "messages": PROMPT, "max_tokens": 2000, "stream": True}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                 b"authorization: Bearer " + token.encode() + b"\r\ncontent-length: " + str(len(body)).encode() +
                 b"\r\n\r\n" + body)
    received = b""
    try:
        async with asyncio.timeout(30):
            while b"data: " not in received:
                data = await reader.read(65536)
                if not data:
                    return False
                received += data
    finally:
        writer.close()
    return received.startswith(b"HTTP/1.1 200")


def test_mass_hang_ups_mid_stream_abort_every_generation_and_free_every_slot(
        stack: Stack, tokens: Tokens, unique_model: str) -> None:
    """A hundred clients leave mid-stream at once: vLLM sees every connection closed (its only abort signal),
    no generation keeps running, every slot comes back, each hang-up is logged as 499, and the next
    client is served."""
    fake = stack.fake_vllm(unique_model, "--tpot-ms", "20")
    consumer = stack.consumer(unique_model, fake.url, MAX_PARALLEL_REQUESTS=str(HANGUPS))
    sender = stack.sender()
    stack.served(sender, unique_model, tokens.high)
    port = int(sender.url.rsplit(":", 1)[1])

    async def hang_up_all() -> list[bool]:
        return await asyncio.gather(*(hang_up_mid_stream(port, tokens.high, unique_model) for _ in range(HANGUPS)))

    streamed = asyncio.run(hang_up_all())
    assert all(streamed), f"{streamed.count(False)} clients got no stream"
    wait_until(lambda: fake.stats()["running"] == 0, timeout_s=20, what="every generation aborted")
    assert fake.stats()["disconnects"] == HANGUPS
    wait_until(lambda: consumer_metric(consumer, "dispatcher_consumer_in_flight") == 0, timeout_s=20,
               what="every slot released")
    wait_until(lambda: metric_value(sender, f'dispatcher_requests_total{{model="{unique_model}",priority="9",'
                                            f'status="499"}}') == HANGUPS, what="every hang-up counted as 499")
    client = openai.OpenAI(base_url=sender.url + "/v1", api_key=tokens.high, max_retries=0, timeout=30)
    assert client.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=2).choices
