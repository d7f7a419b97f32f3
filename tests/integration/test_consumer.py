"""`consumer.py` as a subprocess against the real RabbitMQ and a stub vLLM in the test.

The test plays the sender with aiormq: it publishes grant requests on the model's queue with
direct reply-to, reads the grants, and publishes releases. It also plays vLLM's figures: the stub's
/metrics says what the test sets (`running`, `waiting`, a generation rate), so the consumer's rule
and its reconciliation of slots are driven exactly. Each test has its own model name, so its own queue.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiormq
import h11
import orjson
import pytest
from pamqp import commands as spec

from common.messages import (ANNOUNCE_EXCHANGE, Announcement, Grant, GrantRequest, Release, decode_announcement,
                             decode_grant, encode, max_queue_priority, model_queue, queue_priority)
from tests.helpers import async_wait_until, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
NO_GRANT_WAIT_S = 0.5   # how long "no grant arrives" is watched for
LEVELS = 4              # the consumer's default FAIR_SHARE_LEVELS, with MAX_PRIORITY 10


def queue_of(model: str) -> str:
    """The queue a consumer with the default MAX_PRIORITY and FAIR_SHARE_LEVELS serves."""
    return model_queue(model, max_queue_priority(10, LEVELS))


# ---------------------------------------------------------------------------------------------
# A stub vLLM: /health (switchable), /v1/models, /metrics (figures set by the test); it records the requests

@dataclass
class StubVLLM:
    model: str
    healthy: bool = True
    metrics_ok: bool = True
    running: int = 0
    waiting: int = 0
    requests: list[tuple[str, dict[bytes, bytes]]] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None
    tokens_per_s: float = 0.0
    tokens_base: float = 1000.0     # vLLM has generated before: the speed rule applies
    tokens_since: float = field(default_factory=time.monotonic)

    def generate(self, tokens_per_s: float) -> None:
        """From now on, vllm:generation_tokens_total grows this fast."""
        now = time.monotonic()
        self.tokens_base = self.generation_tokens(now)
        self.tokens_since = now
        self.tokens_per_s = tokens_per_s

    def generation_tokens(self, now: float) -> float:
        return self.tokens_base + self.tokens_per_s * (now - self.tokens_since)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": 1, "owned_by": "vllm", "root": "/models/x",
                "parent": None, "max_model_len": 4096, "permission": []}

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _respond(self, target: str) -> tuple[int, bytes]:
        if target == "/health":
            return (200, b"") if self.healthy else (503, b"")
        if target == "/v1/models":
            return 200, orjson.dumps({"object": "list", "data": [self.card]})
        if target == "/metrics":
            if not self.metrics_ok:
                return 500, b"Internal Server Error"
            labels = '{engine="0",model_name="m"}'
            return 200, (f"vllm:num_requests_running{labels} {self.running}.0\n"
                         f"vllm:num_requests_waiting{labels} {self.waiting}.0\n"
                         f"vllm:generation_tokens_total{labels} {self.generation_tokens(time.monotonic())}\n"
                         ).encode()
        return 404, b""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    target = event.target.decode()
                    self.requests.append((target, dict(event.headers)))
                    status, body = self._respond(target)
                    writer.write(connection.send(h11.Response(status_code=status, headers=[
                        ("content-length", str(len(body))), ("connection", "close")]))
                                 + connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage()))
                    await writer.drain()
                    return
                else:
                    return
        except (ConnectionError, h11.ProtocolError):
            pass
        finally:
            writer.close()


# ---------------------------------------------------------------------------------------------
# The consumer process and a sender stand-in

def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@dataclass
class ConsumerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    probe_url: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    async def ready_status(self) -> int:
        if self.process.poll() is not None:
            raise AssertionError(f"consumer exited with {self.process.returncode}:\n{self.log()}")
        try:
            return await asyncio.to_thread(http_status, self.probe_url + "/ready")
        except OSError:
            return 0  # still starting

    async def wait_ready(self, ready: bool = True, timeout_s: float = 15.0) -> None:
        expected = 200 if ready else 503
        await async_wait_until(lambda: self._is_status(expected), timeout_s=timeout_s,
                               what=f"consumer /ready to answer {expected}")

    async def _is_status(self, expected: int) -> bool:
        return await self.ready_status() == expected

    async def metric(self, sample: str) -> float | None:
        """One sample of the consumer's own /metrics, e.g. 'dispatcher_consumer_grants_total{server="..."}'."""
        def read() -> str:
            with urllib.request.urlopen(self.probe_url + "/metrics", timeout=2.0) as response:
                return response.read().decode()
        for line in (await asyncio.to_thread(read)).splitlines():
            name, _, value = line.rpartition(" ")
            if name == sample:
                return float(value)
        return None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Broker:
    """What a sender does on the broker: grant requests with direct reply-to, releases; plus a view
    of the model queue and of announcements."""

    def __init__(self, connection: aiormq.abc.AbstractConnection) -> None:
        self.connection = connection
        self.grants: asyncio.Queue[tuple[str | None, Grant]] = asyncio.Queue()
        self.announcements: asyncio.Queue[Announcement] = asyncio.Queue()
        self.channel: aiormq.abc.AbstractChannel | None = None

    async def open(self) -> None:
        self.channel = await self.connection.channel()
        await self.channel.basic_consume(DIRECT_REPLY_TO, self._on_grant, no_ack=True)
        await self.channel.exchange_declare(ANNOUNCE_EXCHANGE, exchange_type="fanout")
        declared = await self.channel.queue_declare("", exclusive=True, auto_delete=True)
        await self.channel.queue_bind(declared.queue, ANNOUNCE_EXCHANGE)
        await self.channel.basic_consume(declared.queue, self._on_announcement, no_ack=True)

    async def _on_grant(self, message: Any) -> None:
        self.grants.put_nowait((message.header.properties.correlation_id, decode_grant(message.body)))

    async def _on_announcement(self, message: Any) -> None:
        self.announcements.put_nowait(decode_announcement(message.body))

    async def request(self, model: str, priority: int, correlation_id: str, body: bytes | None = None) -> None:
        assert self.channel is not None
        await self.channel.basic_publish(
            encode(GrantRequest(priority)) if body is None else body, routing_key=queue_of(model),
            properties=spec.Basic.Properties(priority=queue_priority(priority, 0, LEVELS), correlation_id=correlation_id,
                                             reply_to=DIRECT_REPLY_TO, expiration="60000"),
            mandatory=True)

    async def release(self, grant: Grant) -> None:
        assert self.channel is not None
        await self.channel.basic_publish(encode(Release((grant.lease,))), routing_key=grant.release_to)

    async def next_grant(self, timeout_s: float = 5.0) -> tuple[str | None, Grant]:
        async with asyncio.timeout(timeout_s):
            return await self.grants.get()

    async def expect_no_grant(self, wait_s: float = NO_GRANT_WAIT_S) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self.grants.get()

    async def ready_messages(self, model: str) -> int:
        """Messages waiting in the model's queue, not delivered to anyone."""
        probe = await self.connection.channel(publisher_confirms=False)
        try:
            declared = await probe.queue_declare(queue_of(model), passive=True)
            return declared.message_count or 0
        finally:
            await probe.close()

    async def next_announcement(self, model: str, timeout_s: float = 5.0) -> Announcement:
        async with asyncio.timeout(timeout_s):
            while True:
                announcement = await self.announcements.get()
                if announcement.model == model:
                    return announcement


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    connection = await aiormq.connect(RABBITMQ_URL)  # the suite needs RabbitMQ: scripts/services.sh
    broker = Broker(connection)
    await broker.open()
    yield broker
    await connection.close()


@pytest.fixture
async def vllm() -> AsyncIterator[StubVLLM]:
    stub = StubVLLM(model=f"test-consumer-{uuid.uuid4().hex[:8]}")
    await stub.start()
    yield stub
    await stub.close()


@pytest.fixture
async def start_consumer(tmp_path: Path, request: pytest.FixtureRequest
                         ) -> AsyncIterator[Callable[..., Awaitable[ConsumerProcess]]]:
    """Returns `start(vllm, **env) -> ConsumerProcess`, ready; stopped (and its log printed on failure) after."""
    started: list[ConsumerProcess] = []

    async def start(stub: StubVLLM, **env: str) -> ConsumerProcess:
        port = free_port()
        log_path = tmp_path / f"consumer-{len(started)}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "consumer.py"], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "MODEL": stub.model, "VLLM_URL": stub.url,
                     "PROBE_PORT": str(port), "RABBITMQ_URL": RABBITMQ_URL, "METRICS_REFRESH_SECONDS": "0.2",
                     "RPC_QUEUE_EXPIRATION": "10000", "LOG_LEVEL": "DEBUG", "MIN_TOKENS_PER_SECOND_PER_USER": "0",
                     **env})
        consumer = ConsumerProcess(process, log_path, f"http://127.0.0.1:{port}")
        started.append(consumer)
        await consumer.wait_ready()
        return consumer

    yield start
    for consumer in started:
        consumer.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for consumer in started:
            print(f"----- {consumer.log_path.name} -----\n{consumer.log()}")


# ---------------------------------------------------------------------------------------------
# Tests

async def test_grant_names_the_server_and_model_is_announced(broker, vllm, start_consumer):
    await start_consumer(vllm, MAX_PARALLEL_REQUESTS="2", FORWARD_PRIORITY="1", VLLM_API_KEY="sk-vllm")

    announcement = await broker.next_announcement(vllm.model)
    assert announcement.alive and announcement.card == vllm.card

    await broker.request(vllm.model, 3, "req-1")
    correlation_id, grant = await broker.next_grant()
    assert correlation_id == "req-1"
    assert grant.url == vllm.url
    assert grant.api_key == "sk-vllm"
    assert grant.vllm_priority == 10 - 3
    assert grant.release_to.startswith("dispatcher.release.")
    assert grant.lease
    models_requests = [headers for target, headers in vllm.requests if target == "/v1/models"]
    assert models_requests and models_requests[0][b"authorization"] == b"Bearer sk-vllm"


async def test_vllm_priority_is_absent_without_forward_priority(broker, vllm, start_consumer):
    await start_consumer(vllm)
    await broker.request(vllm.model, 3, "req-1")
    _, grant = await broker.next_grant()
    assert grant.vllm_priority is None and grant.api_key is None


async def test_full_server_holds_nothing_and_grants_high_priority_first(broker, vllm, start_consumer):
    """With the one slot in use, waiting requests stay in the queue (none held unacked by the consumer),
    so a later high-priority request is granted before earlier low-priority ones."""
    await start_consumer(vllm, MAX_PARALLEL_REQUESTS="1")
    await broker.request(vllm.model, 1, "first")
    _, first = await broker.next_grant()
    vllm.running = 1  # each granted request runs on vLLM until its release

    for priority, correlation_id in ((1, "low-1"), (1, "low-2"), (9, "high")):
        await broker.request(vllm.model, priority, correlation_id)
    await broker.expect_no_grant()
    assert await broker.ready_messages(vllm.model) == 3

    order = []
    grant = first
    for _ in range(3):
        await broker.release(grant)
        correlation_id, grant = await broker.next_grant()
        order.append(correlation_id)
        await broker.expect_no_grant()
    assert order == ["high", "low-1", "low-2"]


async def test_roomy_consumer_takes_several_at_once_yet_keeps_priority_and_cap(broker, vllm, start_consumer):
    """With room for 40, the consumer has several requests in flight to it at once (prefetch 8), and
    drops back to one before the room runs out: from a queue of 60, the 20 high-priority ones are
    granted first, exactly 40 in all, and the 20 left stay in the queue, none held unacked."""
    assert broker.channel is not None
    await broker.channel.queue_declare(queue_of(vllm.model), arguments={"x-max-priority": max_queue_priority(10, LEVELS),
                                                                        "x-expires": 10000})
    for index in range(40):
        await broker.request(vllm.model, 1, f"low-{index}")
    for index in range(20):
        await broker.request(vllm.model, 9, f"high-{index}")
    consumer = await start_consumer(vllm, MAX_PARALLEL_REQUESTS="40")

    granted = [(await broker.next_grant())[0] for _ in range(40)]
    vllm.running = 40  # each granted request runs on vLLM until its release
    await broker.expect_no_grant()
    assert sorted(granted[:20]) == sorted(f"high-{index}" for index in range(20))
    assert all(correlation_id.startswith("low-") for correlation_id in granted[20:])
    assert await broker.ready_messages(vllm.model) == 20
    log = consumer.log()
    assert "prefetch 8" in log and "prefetch 1" in log  # took several at once, then one by one near the cap


async def test_waiting_requests_outlive_queue_expiration_while_every_slot_is_in_use(broker, vllm, start_consumer):
    """x-expires deletes a queue that has no consumer, and a full consumer has none on its queue:
    it must renew the queue (by redeclaring it) or the waiting requests are lost."""
    expiration_ms = 1000
    await start_consumer(vllm, MAX_PARALLEL_REQUESTS="1", RPC_QUEUE_EXPIRATION=str(expiration_ms))
    await broker.request(vllm.model, 1, "first")
    _, first = await broker.next_grant()
    vllm.running = 1
    await broker.request(vllm.model, 1, "waiting")
    await asyncio.sleep(3 * expiration_ms / 1000)  # the point of the test: outlast the expiration, full
    assert await broker.ready_messages(vllm.model) == 1
    await broker.release(first)
    assert (await broker.next_grant())[0] == "waiting"


async def test_release_of_unknown_lease_frees_nothing(broker, vllm, start_consumer):
    await start_consumer(vllm, MAX_PARALLEL_REQUESTS="1")
    await broker.request(vllm.model, 1, "first")
    _, first = await broker.next_grant()
    vllm.running = 1
    await broker.request(vllm.model, 1, "second")
    await broker.release(Grant("no-such-lease", first.url, None, first.release_to, None))
    await broker.expect_no_grant()
    # The first request ends (vLLM no longer runs it) and its sender releases it. Left at 1, the stub's
    # count would make a reading taken after the release see a request no lease explains.
    vllm.running = 0
    await broker.release(first)
    assert (await broker.next_grant())[0] == "second"


async def test_lost_release_frees_the_slot_once_vllm_reports_the_request_gone(broker, vllm, start_consumer):
    """No release ever comes (the sender died); the slot is freed by vLLM's count, not by a timer."""
    consumer = await start_consumer(vllm, MAX_PARALLEL_REQUESTS="1", LEASE_TIMEOUT_SECONDS="600")
    await broker.request(vllm.model, 1, "first")
    _, first = await broker.next_grant()
    vllm.running = 1
    await broker.request(vllm.model, 1, "second")
    await broker.expect_no_grant(wait_s=2.0)  # older than the grace period, but vLLM still runs it
    vllm.running = 0
    correlation_id, _ = await broker.next_grant(timeout_s=3.0)
    assert correlation_id == "second"
    assert await consumer.metric(f'dispatcher_consumer_lost_releases_total{{server="{vllm.url}"}}') == 1
    await broker.release(first)  # a late release of the freed lease frees nothing more
    vllm.running = 1
    await broker.request(vllm.model, 1, "third")
    await broker.expect_no_grant()


async def test_lease_timeout_forgets_a_lease_but_vllm_still_holds_the_slot(broker, vllm, start_consumer):
    """The lease timeout is bookkeeping only: a request vLLM still runs keeps its slot after it."""
    consumer = await start_consumer(vllm, MAX_PARALLEL_REQUESTS="1", LEASE_TIMEOUT_SECONDS="0.5")
    await broker.request(vllm.model, 1, "first")
    await broker.next_grant()
    vllm.running = 1
    await broker.request(vllm.model, 1, "second")
    server = f'{{server="{vllm.url}"}}'
    await async_wait_until(lambda: consumer.metric(f"dispatcher_consumer_lease_expiries_total{server}"),
                           timeout_s=5.0, what="the lease to be forgotten")
    await broker.expect_no_grant()
    vllm.running = 0
    assert (await broker.next_grant(timeout_s=3.0))[0] == "second"


async def test_restarted_consumer_counts_requests_already_running(broker, vllm, start_consumer):
    """vLLM runs two requests granted by a consumer that has since restarted: the cap is two."""
    vllm.running = 2
    await start_consumer(vllm, MAX_PARALLEL_REQUESTS="2")
    await broker.request(vllm.model, 1, "first")
    await broker.expect_no_grant()
    vllm.running = 1  # one of them ended
    assert (await broker.next_grant(timeout_s=3.0))[0] == "first"
    vllm.running = 2
    await broker.request(vllm.model, 1, "second")
    await broker.expect_no_grant()
    assert await broker.ready_messages(vllm.model) == 1


async def test_speed_rule_holds_requests_while_each_user_is_too_slow(broker, vllm, start_consumer):
    """Two running, 10 tokens/s in all: 5 per user, under a floor of 10. Nothing is taken off the
    queue until vLLM is fast enough again."""
    vllm.running = 2
    vllm.generate(10.0)
    consumer = await start_consumer(vllm, MAX_PARALLEL_REQUESTS="8", MIN_TOKENS_PER_SECOND_PER_USER="10")
    speed = f'dispatcher_consumer_blocked{{reason="speed",server="{vllm.url}"}}'
    await async_wait_until(lambda: consumer.metric(speed), timeout_s=5.0, what="the speed rule to hold")
    await broker.request(vllm.model, 1, "waiting")
    await broker.expect_no_grant()
    assert await broker.ready_messages(vllm.model) == 1
    vllm.generate(100.0)  # 50 tokens/s each
    assert (await broker.next_grant(timeout_s=5.0))[0] == "waiting"
    per_request = await consumer.metric(f'dispatcher_consumer_tokens_per_second_per_request{{server="{vllm.url}"}}')
    assert per_request is not None and per_request >= 10


async def test_requests_waiting_inside_vllm_hold_new_grants(broker, vllm, start_consumer):
    vllm.running, vllm.waiting = 1, 1
    await start_consumer(vllm, MAX_PARALLEL_REQUESTS="8")
    await broker.request(vllm.model, 1, "held")
    await broker.expect_no_grant()
    vllm.waiting = 0
    assert (await broker.next_grant(timeout_s=3.0))[0] == "held"


@pytest.mark.parametrize("failing", [
    pytest.param("metrics_ok", id="unreachable-metrics"),
    pytest.param("healthy", id="health-failing"),
])
async def test_unhealthy_server_gets_no_grant_until_it_recovers(broker, vllm, start_consumer, failing):
    consumer = await start_consumer(vllm)
    setattr(vllm, failing, False)
    await consumer.wait_ready(False, timeout_s=10.0)
    await broker.request(vllm.model, 1, "waiting")
    await broker.expect_no_grant()
    assert await broker.ready_messages(vllm.model) == 1

    setattr(vllm, failing, True)
    await consumer.wait_ready(True, timeout_s=10.0)
    assert (await broker.next_grant())[0] == "waiting"


async def test_malformed_request_is_dropped(broker, vllm, start_consumer):
    await start_consumer(vllm)
    await broker.request(vllm.model, 1, "bad", body=b"not json")
    await broker.request(vllm.model, 1, "good")
    assert (await broker.next_grant())[0] == "good"
    await broker.expect_no_grant()
    assert await broker.ready_messages(vllm.model) == 0


async def test_sigterm_announces_departure_and_exits_cleanly(broker, vllm, start_consumer):
    consumer = await start_consumer(vllm, MAX_PARALLEL_REQUESTS="1")
    await broker.next_announcement(vllm.model)
    await broker.request(vllm.model, 1, "first")
    await broker.next_grant()
    vllm.running = 1
    await broker.request(vllm.model, 1, "waiting")

    assert await asyncio.to_thread(consumer.stop) == 0
    while (await broker.next_announcement(vllm.model)).alive:
        pass
    assert await broker.ready_messages(vllm.model) == 1  # still waiting for another consumer


def close_connection_named(name: str) -> bool:
    """Has the broker force-close the connection whose client named itself `name` (needs rabbitmqctl)."""
    listing = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                             capture_output=True, text=True, timeout=30)
    pids = [line.split("\t", 1)[0] for line in listing.stdout.splitlines()
            if f'{{"connection_name","{name}"}}' in line]
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "closed by test"],
                       capture_output=True, timeout=30, check=True)
    return bool(pids)


async def test_reconnect_keeps_leases_and_release_queue(broker, vllm, start_consumer):
    """After the broker drops the consumer's connection, it reconnects; the slot granted before is still
    counted, and a release sent meanwhile to the same release queue still frees it."""
    name = f"consumer-{vllm.model}"
    url = f"{RABBITMQ_URL}{'&' if '?' in RABBITMQ_URL else '?'}name={name}"
    await start_consumer(vllm, MAX_PARALLEL_REQUESTS="1", RABBITMQ_URL=url)
    await broker.request(vllm.model, 1, "first")
    _, first = await broker.next_grant()
    vllm.running = 1
    await broker.request(vllm.model, 1, "second")

    assert await asyncio.to_thread(close_connection_named, name), "rabbitmqctl found no consumer connection"
    await broker.expect_no_grant()  # the slot is still in use after the reconnect
    await broker.release(first)
    correlation_id, second = await broker.next_grant(timeout_s=15.0)
    assert correlation_id == "second"
    assert second.release_to == first.release_to
    await broker.request(vllm.model, 1, "third")
    await broker.expect_no_grant()
