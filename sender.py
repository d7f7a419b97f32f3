"""The sender: an OpenAI-compatible HTTP/1.1 front door that serves shared vLLM GPUs by priority.

To a client it looks like a vLLM server. Each POST is authenticated by its bearer token (a
priority and a threshold, from its database or a token file, cached), routed by the `model` of its
body, refused with 429 when that model's queue is longer than the token's threshold, and
otherwise queued in RabbitMQ as a tiny grant request with the token's priority. A consumer
beside the model's vLLM answers with a grant (which server to use) when the GPU has room; the
sender then forwards the original request to that server and streams the answer back.

    read head -> authenticate -> read body -> read model -> check threshold -> acquire grant
      -> acquire upstream connection -> send head and original body -> relay response -> release

Invariants:
- The request body reaches vLLM byte for byte; only hop-by-hop, framing and credential headers
  are replaced. The response is vLLM's: status, headers (less hop-by-hop), body as it arrives.
- A grant is always released: when the response ends, fails, or the client leaves; a grant that
  arrives for a request nobody waits for any more is released at once.
- An upstream connection is reused only after a complete exchange; it is closed when the client
  leaves before the end, since closing is the only signal on which vLLM aborts a generation.
- Nothing is retried after a response byte; a pooled connection that fails before the first
  byte is retried once on a fresh one (vLLM closes idle keep-alive connections after 5 s).
- A request whose framing is in doubt (malformed, or both Content-Length and Transfer-Encoding)
  is answered with an error and its connection closed: nothing behind it is served. What a client
  sends ahead while a request is answered is kept up to MAX_PIPELINED_BYTES, never more.

Known limitations: no HTTP/2 and no TLS on the client side (the ingress terminates TLS).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import signal
import sys
import time
import urllib.parse
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiormq
import aiormq.exceptions
import h11
import orjson
import prometheus_client as prom
import uvloop
from aiormq.abc import DeliveredMessage

from common import amqp
from common.config import (ConfigError, env_float, env_int, env_str, log_level, rabbitmq_url,
                           setup_logging)
from common.messages import (ANNOUNCE_EXCHANGE, Grant, GrantRequest, MessageError, Release,
                             decode_announcement, decode_grant, encode, is_valid_model_id,
                             model_queue, queue_priority, share_bucket)
from common.tasks import cancel_and_wait
from queue_state import STATE_EXCHANGE, STATE_INTERVAL_S, STATE_TTL_S, QueueState, retry_after_s
from tokenstore import DatabaseError, TokenInfo, TokenStore, TokenStoreUnavailable, database_class
from upstream import (READ_CHUNK_BYTES, ChunkedBody, Origin, UpstreamConnection, UpstreamError, UpstreamPool,
                      is_chunked)
from usage import UsageMeter, UsageRecorder, UsageWriter, first_day

log = logging.getLogger("sender")

MAX_HEAD_BYTES = 64 * 1024          # request line + headers; larger gets 431
HEADER_TIMEOUT_S = 30.0             # from the first byte of a request to the end of its head
KEEP_ALIVE_TIMEOUT_S = 75.0         # idle client connection between two requests
BODY_IDLE_TIMEOUT_S = 30.0          # silence while a request body is being received
LINGER_TIMEOUT_S = 2.0              # reading and discarding after an early answer, before closing
MAX_PIPELINED_BYTES = 64 * 1024     # read ahead while a request is answered; past it, that answer is the last
RETRY_AFTER_QUEUE_FULL_S = 1
RETRY_AFTER_UNAVAILABLE_S = 5
SHUTDOWN_GRACE_S = 25.0
HANGUP_WATCH_DELAY_S = 0.05         # a request still running after this gets a reader that notices a hang-up
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# Releases wait this long at most, to travel together: under load that is several per message, which
# saves the broker and the consumer a delivery each (bench/RESULTS.md: +6-9 % req/s). A slot comes
# back 2 ms later at worst, less than one vLLM engine step, so vLLM could not have used it sooner.
RELEASE_BATCH_S = 0.002
AGING_OVERLAP_S = 1.0               # an aged request's previous copy outlives the next one's publication by this

# RFC 9110 §7.6.1 hop-by-hop headers, plus the framing headers we set anew on each side.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"content-length", b"expect",
})
# Request headers that never reach vLLM: our token, the Host of our side, our own priority and
# deadline headers, and vLLM's priority header, which vLLM obeys over the body (only a grant sets it).
DROPPED_REQUEST_HEADERS = HOP_BY_HOP | {b"host", b"authorization", b"x-priority", b"x-queue-timeout",
                                       b"x-vllm-priority"}

# The last event of an OpenAI stream: a client may leave as soon as it has it (see relay_response).
SSE_DONE = b"data: [DONE]\n\n"
SSE_DONE_CHUNK_END = SSE_DONE + b"\r\n"     # the same at the end of its HTTP chunk
DONE_CHUNK_TAIL_BYTES = len(SSE_DONE_CHUNK_END)

JSON_HEADERS = ((b"content-type", b"application/json"),)
CLOSE_HEADER = ((b"connection", b"close"),)


# ---------------------------------------------------------------------------------------------
# Configuration

@dataclass(frozen=True, slots=True)
class Config:
    host: str
    port: int
    metrics_port: int
    rabbitmq_url: str
    database_url: str | None
    tokens_file: str | None
    token_cache_s: float
    grant_timeout_s: float
    upstream_timeout_s: float
    max_body_bytes: int
    max_priority: int
    priority_aging_s: float
    rpc_reconnect_attempts: int
    usage_flush_s: float
    log_level: int

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Config:
        database_url = env.get("DATABASE_URL", "").strip() or None
        tokens_file = env.get("TOKENS_FILE", "").strip() or None
        if database_url is None and tokens_file is None:
            raise ConfigError("set DATABASE_URL (postgresql://... or mysql://...) or TOKENS_FILE "
                              "(a YAML or JSON token list)")
        if database_url is not None:
            database_class(database_url)  # a ConfigError for a wrong scheme or address
        return cls(
            host=env_str(env, "SENDER_HOST", "0.0.0.0"),
            port=env_int(env, "SENDER_PORT", 8080, minimum=0, maximum=65535),
            metrics_port=env_int(env, "METRICS_PORT", 9090, minimum=0, maximum=65535),
            rabbitmq_url=rabbitmq_url(env),
            database_url=database_url,
            tokens_file=tokens_file,
            token_cache_s=env_float(env, "TOKEN_CACHE_SECONDS", 30.0, minimum=0),
            grant_timeout_s=env_float(env, "GRANT_TIMEOUT", 570.0, minimum=0.001),
            upstream_timeout_s=env_float(env, "UPSTREAM_TIMEOUT", 600.0, minimum=0.001),
            max_body_bytes=env_int(env, "MAX_BODY_BYTES", 32 * 1024 * 1024, minimum=1),
            max_priority=env_int(env, "MAX_PRIORITY", 10, minimum=1, maximum=255),
            priority_aging_s=env_float(env, "PRIORITY_AGING_SECONDS", 0.0, minimum=0),
            rpc_reconnect_attempts=env_int(env, "RPC_RECONNECT_ATTEMPTS", 10, minimum=1),
            usage_flush_s=env_float(env, "USAGE_FLUSH_SECONDS", 10.0, minimum=0.01, maximum=10.0),
            log_level=log_level(env),
        )


# ---------------------------------------------------------------------------------------------
# Errors: one type, one renderer

class ApiError(Exception):
    """An error the sender answers itself, rendered as an OpenAI error envelope."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, retry_after_s: int | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        self.close = close


def render_error(error: ApiError) -> tuple[h11.Response, bytes]:
    body = orjson.dumps({"error": {"message": error.message, "type": error.type,
                                   "param": error.param, "code": error.code}})
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if error.retry_after_s is not None:
        headers.append((b"retry-after", str(error.retry_after_s).encode()))
    if error.close:
        headers.extend(CLOSE_HEADER)
    return h11.Response(status_code=error.status, headers=headers), body


def unauthorized() -> ApiError:
    return ApiError(401, "Invalid or missing bearer token. Send 'Authorization: Bearer <token>'.",
                    code="invalid_api_key")


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist or has no running server.",
                    code="model_not_found", param="model")


def broker_unavailable() -> ApiError:
    return ApiError(503, "The request queue is unreachable; try again shortly.", type="server_error",
                    code="queue_unavailable", retry_after_s=RETRY_AFTER_UNAVAILABLE_S)


# ---------------------------------------------------------------------------------------------
# Metrics

class Children:
    """A metric whose children the request path looks up, kept by label values: prometheus_client's
    `labels()` takes a lock and checks every value on each call, several times a request. For
    metrics whose children are never removed; anything else is the metric's own."""

    __slots__ = ("metric", "children")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metric, name)


@dataclass(frozen=True, slots=True)
class Metrics:
    requests: Children
    token_queries: prom.Counter
    grant_wait: Children
    shed: prom.Counter
    time_to_first_byte: Children
    in_flight: Children
    queue_waiting: prom.Gauge
    tokens: Children
    usage_dropped: prom.Counter

    @classmethod
    def create(cls, registry: prom.CollectorRegistry) -> Metrics:
        return cls(
            requests=Children(prom.Counter("dispatcher_requests", "Requests answered, by model, status and priority.",
                                           ["model", "status", "priority"], registry=registry)),
            token_queries=prom.Counter("dispatcher_token_queries", "Token lookups the cache could not answer, by "
                                       "result (found, unknown, failed): one per token however many requests "
                                       "wait for it.", ["result"], registry=registry),
            grant_wait=Children(prom.Histogram(
                "dispatcher_grant_wait_seconds", "Time from queueing to grant, by model and effective priority.",
                ["model", "priority"], registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))),
            shed=prom.Counter("dispatcher_shed", "Requests refused at once with 429, by model and reason: "
                              "queue_full (threshold), token_limit (max_in_flight), queue_timeout (X-Queue-Timeout).",
                              ["model", "reason"], registry=registry),
            time_to_first_byte=Children(prom.Histogram(
                "dispatcher_upstream_time_to_first_byte_seconds", "Time from sending to vLLM to its response head.",
                ["model"], registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))),
            in_flight=Children(prom.Gauge("dispatcher_requests_in_flight", "Requests holding a grant, by model.",
                                          ["model"], registry=registry)),
            queue_waiting=prom.Gauge("dispatcher_queue_waiting", "Requests waiting for a grant for the model, "
                                     "all senders, as the threshold check sees it (refreshed every 250 ms).", ["model"],
                                     registry=registry),
            tokens=Children(prom.Counter("dispatcher_tokens", "Tokens used, by model, token name and kind (prompt, "
                                         "completion); estimated from the streamed deltas when vLLM sent no usage.",
                                         ["model", "token", "kind"], registry=registry)),
            usage_dropped=prom.Counter("dispatcher_usage_dropped", "Requests whose usage was not recorded in the "
                                       "database: the buffer of unwritten totals was full, or the last write at "
                                       "shutdown failed.", registry=registry),
        )


# ---------------------------------------------------------------------------------------------
# Tokens: the store (tokenstore.py: a cache in front of the database or TOKENS_FILE), as the
# request path asks it

async def authenticate(tokens: TokenStore, authorization: bytes | None) -> TokenInfo:
    """The owner of the bearer token: 401 when it is missing, unknown or revoked; 503 when the
    store cannot tell (the token may well be valid)."""
    if not authorization or authorization[:7].lower() != b"bearer ":
        raise unauthorized()
    token = authorization[7:].strip()
    if not token:
        raise unauthorized()
    try:
        info = await tokens.lookup(token)
    except TokenStoreUnavailable:
        raise ApiError(503, "The token store is unreachable; try again shortly.", type="server_error",
                       code="token_store_unavailable", retry_after_s=RETRY_AFTER_UNAVAILABLE_S) from None
    if info is None:
        raise unauthorized()
    return info


# ---------------------------------------------------------------------------------------------
# Capacity RPC client: the RabbitMQ side of the sender

@dataclass(slots=True)
class ModelEntry:
    card: dict[str, Any]
    consumers: dict[str, float] = field(default_factory=dict)  # consumer id -> expires (monotonic)
    slots: dict[str, int] = field(default_factory=dict)        # consumer id -> its servers' parallel cap
    queue: str = ""                                            # where its requests wait, as last announced
    levels: int = 1                                            # fair-share sub-levels per priority there

    def total_slots(self) -> int:
        return sum(self.slots.get(consumer, 0) for consumer in self.consumers)

    def is_live(self, now: float) -> bool:
        for consumer, expires in list(self.consumers.items()):
            if expires <= now:
                del self.consumers[consumer]
        return bool(self.consumers)


@dataclass(slots=True)
class WaitingRequest:
    """A grant request this sender waits for, with what it takes to publish it again after a reconnect."""
    model: str
    priority: int
    share_bucket: int  # fair share: the token's outstanding requests when it came, as `share_bucket` ranks them
    deadline: float    # monotonic
    future: asyncio.Future[Grant]
    queued_at: float = field(default_factory=time.monotonic)
    age: int = 0       # aging: levels gained by waiting (PRIORITY_AGING_SECONDS)
    aging_timer: asyncio.TimerHandle | None = None

    def stop_aging(self) -> None:
        if self.aging_timer is not None:
            self.aging_timer.cancel()
            self.aging_timer = None


def aging_plan(priority: int, age: int, queued_at: float, deadline: float, aging_s: float,
               max_priority: int) -> tuple[int, float | None]:
    """A waiting request's priority after `age` aging steps, and when its next step comes (None: no more).

    A request that has waited k x PRIORITY_AGING_SECONDS competes as priority + k, at most MAX_PRIORITY.
    """
    effective = min(priority + age, max_priority)
    if aging_s <= 0 or effective >= max_priority:
        return effective, None
    next_step = queued_at + (age + 1) * aging_s
    return effective, next_step if next_step < deadline else None


class CapacityClient:
    """Owns the broker connection: grant RPCs, releases, model announcements and queue lengths.

    - Grant requests go to the model's priority queue with `reply_to` = direct reply-to
      (no reply queue at all); replies are matched to waiting futures by correlation id.
    - Releases go out on a channel without publisher confirms: nothing waits for them, and those
      of RELEASE_BATCH_S are gathered into one message per consumer.
    - The counts of waiting and running requests are shared with the other senders every 250 ms
      (queue_state.py), so the threshold check needs no broker round trip on the request path.
    - aiormq does not reconnect; `maintain` does, with a short back-off. The sender holds each
      waiting client, so it owns the waiting requests: when the connection drops they keep
      waiting (until their own deadline), and are published again, in their order of arrival,
      with their priority and what is left of their deadline, once the broker is back. While it
      is away, the models it last heard of stay listed: the sender cannot tell that they left.
    """

    def __init__(self, url: str, max_priority: int, reconnect_attempts: int, state: QueueState,
                 queue_waiting: prom.Gauge, *, aging_s: float = 0.0) -> None:
        self._url = url
        self._aging_s = aging_s
        self._state = state
        self._queue_waiting = queue_waiting
        self._max_priority = max_priority
        self._reconnect_attempts = reconnect_attempts
        self._rpc: amqp.FastChannel | None = None
        self._release: amqp.FastChannel | None = None
        self._pending: dict[str, WaitingRequest] = {}  # by correlation id, in order of arrival
        self._ids = itertools.count()
        self._id_prefix = os.urandom(4).hex() + "-"
        self._models: dict[str, ModelEntry] = {}
        self._failures = 0
        self._ever_connected = False
        self._lost_at: float | None = None  # when the broker connection was lost, while it is
        # After a reconnect, the models whose consumers have not announced themselves again: their queue
        # may be gone with a restarted broker until their consumer declares it again.
        self._unconfirmed: set[str] = set()
        self._parked: dict[str, list[str]] = {}  # model -> correlation ids waiting for that declare
        self._gauged: set[str] = set()  # models with a dispatcher_queue_waiting sample
        self._releases: dict[str, list[str]] = {}  # release_to -> leases, sent within RELEASE_BATCH_S
        self._release_timer: asyncio.TimerHandle | None = None

    # -- state read by the request path (no I/O) --

    def is_ready(self) -> bool:
        """Ready while grant requests can be published, and through a reconnect until
        RPC_RECONNECT_ATTEMPTS attempts in a row have failed. A channel that is closed while the
        sender still holds it (whatever closed it) is not ready."""
        channel = self._rpc
        if channel is not None:
            return not channel.aiormq.is_closed
        return self._ever_connected and self._failures < self._reconnect_attempts

    def _liveness_clock(self) -> float:
        # Announcements cannot arrive while the broker is away: time stands still for them.
        return self._lost_at if self._lost_at is not None else time.monotonic()

    def live_models(self) -> dict[str, dict[str, Any]]:
        now = self._liveness_clock()
        return {model: entry.card for model, entry in self._models.items() if entry.is_live(now)}

    def is_live(self, model: str) -> bool:
        entry = self._models.get(model)
        return entry is not None and entry.is_live(self._liveness_clock())

    def slots(self, model: str) -> int:
        entry = self._models.get(model)
        return 0 if entry is None or not entry.is_live(self._liveness_clock()) else entry.total_slots()

    # -- the RPC --

    async def acquire_grant(self, model: str, priority: int, share_bucket: int, deadline: float) -> Grant:
        if self._rpc is None:
            raise broker_unavailable()
        correlation_id = f"{self._id_prefix}{next(self._ids)}"
        waiting = WaitingRequest(model, min(priority, self._max_priority), share_bucket, deadline,
                                 asyncio.get_running_loop().create_future())
        self._pending[correlation_id] = waiting
        try:
            self._publish_grant_request(correlation_id, waiting)
            try:
                async with asyncio.timeout_at(deadline):
                    return await waiting.future
            except TimeoutError:
                raise ApiError(503, f"No capacity for model `{model}` was granted in time; try again later.",
                               type="server_error", code="grant_timeout",
                               retry_after_s=RETRY_AFTER_UNAVAILABLE_S) from None
            except aiormq.exceptions.PublishError:
                # The model's queue is gone: its last consumer left moments ago.
                raise model_not_found(model) from None
            except aiormq.exceptions.DeliveryError:
                log.warning("grant request for %s refused by RabbitMQ", model)
                raise broker_unavailable() from None
        except BaseException:
            # A grant that arrived while we were being cancelled is nobody's: give it back.
            future = waiting.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release_soon(future.result())
            raise
        finally:
            self._pending.pop(correlation_id, None)
            waiting.stop_aging()

    def _publish_grant_request(self, correlation_id: str, waiting: WaitingRequest) -> None:
        """Publishes a grant request, confirmed and mandatory (a queue that is gone comes back as
        PublishError at once). If the channel is down, the request stays waiting: `_serve`
        publishes it again when the broker is back."""
        channel = self._rpc
        entry = self._models.get(waiting.model)
        if channel is None or entry is None:
            return
        priority, next_step = aging_plan(waiting.priority, waiting.age, waiting.queued_at, waiting.deadline,
                                         self._aging_s, self._max_priority)
        now = time.monotonic()
        expires = waiting.deadline
        if next_step is not None:
            # Aging publishes a copy one level up at the next step; this copy lasts a little beyond it, so
            # that one of them is always queued, then expires (the broker drops it without delivering it).
            waiting.stop_aging()
            waiting.aging_timer = asyncio.get_running_loop().call_later(
                next_step - now, self._age, correlation_id, waiting)
            expires = min(expires, next_step + AGING_OVERLAP_S)
        expiration_ms = max(1, int((expires - now) * 1000))
        try:
            confirmation = channel.basic_publish(
                encode(GrantRequest(waiting.priority)), routing_key=entry.queue, mandatory=True,
                priority=queue_priority(priority, waiting.share_bucket, entry.levels),
                correlation_id=correlation_id, reply_to=DIRECT_REPLY_TO, expiration=str(expiration_ms),
                message_id=correlation_id, delivery_mode=1)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            log.debug("grant request kept for the next connection: %s", type(exc).__name__)
            return
        assert confirmation is not None  # the RPC channel has publisher confirms
        confirmation.add_done_callback(lambda done: self._on_confirm(correlation_id, waiting, done))

    def _age(self, correlation_id: str, waiting: WaitingRequest) -> None:
        """One aging step: the request competes one level higher, through a copy published at that level.
        If both copies are granted, the second grant finds nobody waiting and is released at once."""
        waiting.aging_timer = None
        if self._pending.get(correlation_id) is waiting and not waiting.future.done():
            waiting.age += 1
            self._publish_grant_request(correlation_id, waiting)

    def _on_confirm(self, correlation_id: str, waiting: WaitingRequest, confirmation: asyncio.Future[Any]) -> None:
        """Only a refusal matters: it is handed to the grant's future, so that the request's task wakes
        once, for the grant or for the refusal. A confirm that failed because the connection went down
        leaves the request waiting for its next publication."""
        if waiting.future.done() or confirmation.cancelled():
            return
        exc = confirmation.exception()
        if not isinstance(exc, aiormq.exceptions.DeliveryError):
            return  # confirmed, or lost with the connection
        if isinstance(exc, aiormq.exceptions.PublishError) and waiting.model in self._unconfirmed:
            # No queue, but the broker came back after an outage: the model's consumer declares its queue
            # again when it reconnects, then announces itself (`on_announcement` publishes this again).
            self._parked.setdefault(waiting.model, []).append(correlation_id)
            return
        waiting.future.set_exception(exc)

    def publish_releases(self, release_to: str, leases: list[str]) -> None:
        channel = self._release
        if channel is None:
            return  # the consumer's reconciliation with vLLM frees the slots
        try:
            channel.basic_publish(encode(Release(tuple(leases))), routing_key=release_to, delivery_mode=1)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            log.warning("release of %d grant(s) failed: %s", len(leases), type(exc).__name__)

    # -- broker callbacks --

    async def on_reply(self, message: DeliveredMessage) -> None:
        try:
            grant = decode_grant(message.body)
        except MessageError as exc:
            log.warning("ignored a malformed grant: %s", exc)
            return
        waiting = self._pending.pop(message.header.properties.correlation_id or "", None)
        if waiting is None or waiting.future.done():
            self.release_soon(grant)  # nobody waits for it any more
            return
        waiting.future.set_result(grant)

    async def on_announcement(self, message: DeliveredMessage) -> None:
        try:
            announcement = decode_announcement(message.body)
        except MessageError as exc:
            log.warning("ignored a malformed announcement: %s", exc)
            return
        entry = self._models.get(announcement.model)
        if not announcement.alive:
            if entry is not None:
                entry.consumers.pop(announcement.consumer, None)
                entry.slots.pop(announcement.consumer, None)
            return
        if entry is None:
            entry = self._models[announcement.model] = ModelEntry(card=announcement.card)
            log.info("model %s is served", announcement.model)
        entry.card = announcement.card
        entry.consumers[announcement.consumer] = time.monotonic() + announcement.ttl_s
        entry.slots[announcement.consumer] = announcement.slots
        # All consumers of a model share MAX_PRIORITY and FAIR_SHARE_LEVELS, hence one queue.
        entry.queue = announcement.queue or model_queue(announcement.model)
        entry.levels = announcement.levels
        if announcement.model in self._unconfirmed:  # its consumer is back, and has declared its queue
            self._unconfirmed.discard(announcement.model)
            self._publish_again(self._parked.pop(announcement.model, []))

    # -- connection lifecycle --

    async def maintain(self) -> None:
        """Connects, and reconnects with back-off (`amqp.reconnect_delay`) for as long as the process runs.

        This is a supervisor: any failure of a connection attempt or of a live connection (aiormq
        raises several unrelated exception families) leads to the next attempt, never to its end.
        """
        while True:
            try:
                connection = await amqp.connect(self._url)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                self._failures += 1
                delay = amqp.reconnect_delay(self._failures)
                log.warning("RabbitMQ unreachable (%s, attempt %d); retrying in %.1fs",
                            type(exc).__name__, self._failures, delay)
                await asyncio.sleep(delay)
                continue
            try:
                await self._serve(connection)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                log.warning("RabbitMQ connection lost: %s; %d waiting request(s) kept", type(exc).__name__,
                            len(self._pending))
            finally:
                if self._rpc is not None:
                    self._lost_at = time.monotonic()
                self._rpc = self._release = None
                if not connection.aiormq.is_closed:
                    await connection.aiormq.close()
            await asyncio.sleep(amqp.reconnect_delay(0))

    async def _serve(self, connection: amqp.Connection) -> None:
        rpc = await connection.channel()
        await rpc.aiormq.basic_consume(DIRECT_REPLY_TO, self.on_reply, no_ack=True)
        release = await connection.channel(publisher_confirms=False)
        await release.aiormq.exchange_declare(ANNOUNCE_EXCHANGE, exchange_type="fanout")
        announcements = await release.aiormq.queue_declare("", exclusive=True, auto_delete=True)
        await release.aiormq.queue_bind(announcements.queue, ANNOUNCE_EXCHANGE)
        await release.aiormq.basic_consume(announcements.queue, self.on_announcement, no_ack=True)
        await release.aiormq.exchange_declare(STATE_EXCHANGE, exchange_type="fanout")
        states = await release.aiormq.queue_declare("", exclusive=True, auto_delete=True)
        await release.aiormq.queue_bind(states.queue, STATE_EXCHANGE)
        await release.aiormq.basic_consume(states.queue, self.on_state, no_ack=True)
        self._rpc, self._release = rpc, release
        self._failures = 0
        self._ever_connected = True
        self._resume_after_outage()
        log.info("connected to RabbitMQ")
        sharer = asyncio.create_task(self._share_state(connection.aiormq, release))
        try:
            await amqp.wait_closed(connection.aiormq, rpc.aiormq, release.aiormq)
        finally:
            await cancel_and_wait(sharer)

    def _resume_after_outage(self) -> None:
        """After a reconnect: the announcements' clock runs again where it stopped, and the requests
        that waited through the outage are published again, in their order of arrival."""
        if self._lost_at is not None:
            outage_s = time.monotonic() - self._lost_at
            for entry in self._models.values():
                for consumer in entry.consumers:
                    entry.consumers[consumer] += outage_s
            self._lost_at = None
            self._unconfirmed = set(self.live_models())
        if self._pending:
            log.info("publishing %d waiting request(s) again after the reconnect", len(self._pending))
        self._publish_again(list(self._pending))

    def _publish_again(self, correlation_ids: list[str]) -> None:
        for correlation_id in correlation_ids:
            request = self._pending.get(correlation_id)
            if request is not None and not request.future.done():
                self._publish_grant_request(correlation_id, request)

    def _expire_parked(self) -> None:
        """Requests parked for a model whose consumer did not come back (its announcements ran out): 404."""
        for model in [model for model in self._parked if not self.is_live(model)]:
            self._unconfirmed.discard(model)
            for correlation_id in self._parked.pop(model):
                request = self._pending.get(correlation_id)
                if request is not None and not request.future.done():
                    request.future.set_exception(model_not_found(model))

    async def _share_state(self, connection: aiormq.abc.AbstractConnection, channel: amqp.FastChannel) -> None:
        """Every STATE_INTERVAL_S, for as long as the connection is open: publishes this sender's
        counts for the other senders (queue_state.py), and refreshes the queue gauge.

        The loop ends with the connection, not only when cancelled: aiormq runs some operations in a
        task of its own and, when the connection closes, may turn a cancellation that arrives meanwhile
        into the connection's error, which a loop that survives errors would swallow.
        """
        expiration = str(int(STATE_TTL_S * 1000))  # a stale snapshot is worthless: the broker drops it
        while not connection.is_closed:
            try:
                channel.basic_publish(self._state.snapshot(), exchange=STATE_EXCHANGE, routing_key="",
                                      delivery_mode=1, expiration=expiration)
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                log.debug("queue state not shared: %s", type(exc).__name__)
            live = self.live_models()
            for model in live:
                self._queue_waiting.labels(model).set(self._state.waiting(model))
            for model in self._gauged - live.keys():
                self._queue_waiting.remove(model)
            self._gauged = set(live)
            self._expire_parked()
            await asyncio.sleep(STATE_INTERVAL_S)

    async def on_state(self, message: DeliveredMessage) -> None:
        try:
            self._state.on_snapshot(message.body)
        except ValueError as exc:
            log.warning("ignored a malformed queue state: %s", exc)

    def release_soon(self, grant: Grant) -> None:
        """Gives a grant back. Not a coroutine, so that a cancelled handler cannot lose it; the
        releases of RELEASE_BATCH_S go out as one message per consumer."""
        if not self._releases:
            self._release_timer = asyncio.get_running_loop().call_later(RELEASE_BATCH_S, self.flush_releases)
        self._releases.setdefault(grant.release_to, []).append(grant.lease)

    def flush_releases(self) -> None:
        """Publishes the gathered releases now (at the end of the batch, and at shutdown)."""
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        releases, self._releases = self._releases, {}
        for release_to, leases in releases.items():
            self.publish_releases(release_to, leases)


# ---------------------------------------------------------------------------------------------
# The client side: h11 server connection

class ClientGone(Exception):
    """The client closed its connection."""


class ClientConnection:
    """One client socket with its h11 state; the only place client-side h11 events are built."""

    __slots__ = ("reader", "writer", "h11", "idle", "status", "method")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.idle = False  # waiting for the first byte of a request: safe to close at shutdown
        self.status = 0    # of the last response the sender answered itself, for the access log
        self.method = b""  # of the request being answered: a HEAD gets no body

    async def read_head(self) -> h11.Request | h11.ConnectionClosed:
        """The next request head: the keep-alive timeout runs until its first byte, then the head timeout.

        A head that is malformed, too large or framed ambiguously is an ApiError that ends the connection.
        """
        self.idle = True
        self.method = b""
        try:
            async with asyncio.timeout(KEEP_ALIVE_TIMEOUT_S) as deadline:
                while True:
                    try:
                        event = self.h11.next_event()
                    except h11.RemoteProtocolError as exc:
                        raise malformed_request(exc) from None
                    if event is not h11.NEED_DATA:
                        break
                    data = await self.reader.read(READ_CHUNK_BYTES)
                    if self.idle:
                        self.idle = False
                        deadline.reschedule(asyncio.get_running_loop().time() + HEADER_TIMEOUT_S)
                    self.h11.receive_data(data)
        finally:
            self.idle = False
        if type(event) is h11.Request:
            self.method = event.method
            check_head(event)
        return event

    async def next_event(self, timeout_s: float) -> Any:
        """The next event of the request body; each read waits at most `timeout_s`."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:  # a malformed chunked body
                raise malformed_request(exc) from None
            if event is not h11.NEED_DATA:
                return event
            if self.h11.they_are_waiting_for_100_continue:
                await self.send(h11.InformationalResponse(status_code=100, headers=()))
            async with asyncio.timeout(timeout_s):
                data = await self.reader.read(READ_CHUNK_BYTES)
            if not data:
                raise ClientGone()  # in the middle of a body: nothing more can come
            self.h11.receive_data(data)

    async def send(self, event: Any) -> None:
        self.write(event)
        await self.drain()

    def write(self, event: Any) -> None:
        self.write_all(self.encode(event))

    def encode(self, event: Any) -> list[bytes]:
        """The bytes of one event; a Data event's payload is handed back as is, not copied."""
        try:
            return self.h11.send_with_data_passthrough(event)
        except h11.LocalProtocolError:
            self.h11.send_failed()
            raise

    def write_all(self, parts: list[bytes]) -> None:
        """One socket write for all `parts` (each write is a send() of its own on loopback and LAN)."""
        if parts:
            if self.writer.transport.is_closing():
                # The client reset the connection and the transport closed itself; uvloop refuses
                # any further write with RuntimeError (asyncio's own loop drops it silently).
                self.h11.send_failed()
                raise ClientGone()
            self.writer.writelines(parts)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError:
            self.h11.send_failed()
            raise ClientGone() from None

    def can_start_response(self) -> bool:
        return self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    async def send_json(self, status: int, payload: Any) -> None:
        self.status = status
        body = orjson.dumps(payload)
        await self.send_whole(h11.Response(status_code=status, headers=[*JSON_HEADERS,
                                                                        (b"content-length", str(len(body)).encode())]),
                              body)

    async def send_error(self, error: ApiError) -> None:
        """Answers `error`; a client that has already left is no failure here (the connection ends anyway)."""
        self.status = error.status
        try:
            await self.send_whole(*render_error(error))
        except ClientGone:
            pass

    async def send_whole(self, response: h11.Response, body: bytes) -> None:
        """A whole response; to a HEAD request, the same head without the body (RFC 9110 §9.3.2)."""
        parts = self.encode(response)
        if self.method != b"HEAD":
            parts += self.encode(h11.Data(data=body))
        self.write_all(parts + self.encode(h11.EndOfMessage()))
        await self.drain()

    async def close_gracefully(self) -> None:
        """Stop writing, read and discard what the client still sends for a while, then close.

        Closing with unread data makes the kernel send a RST, which can destroy our answer
        before the client reads it (RFC 9112 §9.6).
        """
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(LINGER_TIMEOUT_S):
                while await self.reader.read(READ_CHUNK_BYTES):
                    pass
        except (OSError, TimeoutError):
            pass
        finally:
            self.writer.close()


def head_size(request: h11.Request) -> int:
    return len(request.target) + sum(len(name) + len(value) + 4 for name, value in request.headers)


def malformed_request(exc: h11.RemoteProtocolError) -> ApiError:
    """h11's verdict on a request it cannot parse, as our error; the connection cannot go on after it."""
    status = exc.error_status_hint
    if status == 431:
        return ApiError(431, "Request header fields too large.", code="bad_http_request", close=True)
    if status == 501:  # RFC 9112 §6.1: a transfer coding we do not implement (only chunked is)
        return ApiError(501, f"Unsupported Transfer-Encoding ({exc}).", code="unsupported_transfer_encoding",
                        close=True)
    return ApiError(status, f"Malformed HTTP request: {exc}", code="bad_http_request", close=True)


def check_head(request: h11.Request) -> None:
    """The checks h11 leaves to us: the size of a complete head, and framing that could smuggle a request."""
    if head_size(request) > MAX_HEAD_BYTES:  # h11 bounds only what is still incomplete after a read
        raise ApiError(431, "Request header fields too large.", code="bad_http_request", close=True)
    names = {name for name, _ in request.headers}
    if b"transfer-encoding" in names and (b"content-length" in names or request.http_version == b"1.0"):
        # h11 frames such a body by Transfer-Encoding; a peer that frames it by Content-Length would
        # see another request in it. RFC 9112 §6.1 and §6.3: an error, and close after answering.
        raise ApiError(400, "Malformed HTTP request: Transfer-Encoding together with Content-Length, or in "
                       "HTTP/1.0.", code="bad_http_request", close=True)


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# Request handling

@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    http_version: bytes


@dataclass(slots=True)
class Service:
    """Everything a request handler needs, built in `run()`."""
    config: Config
    tokens: TokenStore
    capacity: CapacityClient
    upstream: UpstreamPool
    metrics: Metrics
    queue: QueueState
    usage: UsageRecorder
    shutting_down: bool = False


async def read_body(client: ClientConnection, request: Request, max_bytes: int) -> bytes:
    length = header_value(request.headers, b"content-length")
    if length is not None and int(length) > max_bytes:  # h11 has checked that it is a number
        raise request_too_large(max_bytes)
    parts: list[bytes] = []
    size = 0
    while True:
        event = await client.next_event(BODY_IDLE_TIMEOUT_S)
        if type(event) is h11.Data:
            size += len(event.data)
            if size > max_bytes:
                raise request_too_large(max_bytes)
            parts.append(event.data)
        elif type(event) is h11.EndOfMessage:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        else:  # ConnectionClosed in the middle of the body
            raise ClientGone()


def request_too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"The request body is larger than {max_bytes} bytes.", code="request_too_large", close=True)


def read_model(headers: list[tuple[bytes, bytes]], body: bytes) -> str:
    """The `model` the body names: a JSON object's field, or a multipart form's field."""
    content_type = header_value(headers, b"content-type") or b""
    if content_type[:19].lower() == b"multipart/form-data":
        model = read_multipart_field(content_type, body, b"model")
        if model is None:
            raise ApiError(400, "The multipart body has no `model` field.", code="missing_model", param="model")
        try:
            return model.decode()
        except UnicodeDecodeError:
            raise ApiError(400, "The `model` field is not UTF-8.", code="invalid_model", param="model") from None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    model = payload.get("model") if isinstance(payload, dict) else None
    if model is None:
        raise ApiError(400, "The request body has no `model` field; name the model to use.",
                       code="missing_model", param="model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` must be a non-empty string.", code="invalid_model", param="model")
    return model


def read_multipart_field(content_type: bytes, body: bytes, name: bytes) -> bytes | None:
    """The value of one text field of a multipart/form-data body (RFC 7578), without copying the rest."""
    boundary = None
    for parameter in content_type.split(b";")[1:]:
        key, _, value = parameter.strip().partition(b"=")
        if key.lower() == b"boundary":
            boundary = value.strip(b'"')
    if not boundary:
        return None
    delimiter = b"--" + boundary
    wanted = b'name="' + name + b'"'
    position = body.find(delimiter)
    while position != -1:
        head_start = position + len(delimiter) + 2  # past "\r\n"
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end == -1:
            return None
        next_position = body.find(b"\r\n" + delimiter, head_end)
        if next_position == -1:
            return None
        for line in body[head_start:head_end].split(b"\r\n"):
            if line[:20].lower() == b"content-disposition:" and wanted in line:
                return body[head_end + 4:next_position]
        position = next_position + 2
    return None


def effective_priority(token: TokenInfo, headers: list[tuple[bytes, bytes]]) -> int:
    """The token's priority, or lower for this request with `X-Priority: N` (never higher)."""
    asked = header_value(headers, b"x-priority")
    if asked is None:
        return token.priority
    try:
        value = int(asked)
    except ValueError:
        value = -1
    if value < 0:
        raise ApiError(400, "X-Priority must be a non-negative integer.", code="invalid_priority", param="X-Priority")
    return min(value, token.priority)


def queue_timeout(headers: list[tuple[bytes, bytes]]) -> float | None:
    """The client's `X-Queue-Timeout: N`: how many seconds it accepts to wait for a grant."""
    asked = header_value(headers, b"x-queue-timeout")
    if asked is None:
        return None
    try:
        value = float(asked)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise ApiError(400, "X-Queue-Timeout must be a non-negative number of seconds.", code="invalid_queue_timeout",
                       param="X-Queue-Timeout")
    return value


def check_admission(state: QueueState, model: str, token: TokenInfo, priority: int, timeout_s: float | None) -> int:
    """The three reasons to refuse a request at once (429), from the counts all senders share:
    the queue is longer than the token's threshold, the token has `max_in_flight` requests out for
    this model, or the client will not wait as long as the wait is estimated to last. Returns the
    token's outstanding requests for the model (its fair-share level comes from them)."""
    waiting = state.waiting(model)
    if waiting > token.threshold:
        raise ApiError(429, f"{waiting} requests are waiting for model `{model}`, more than this token "
                       f"accepts ({token.threshold}); try again later.", type="rate_limit_error", code="queue_full",
                       retry_after_s=retry_after_s(state.estimated_wait_s(model, waiting - token.threshold),
                                                   RETRY_AFTER_QUEUE_FULL_S))
    outstanding = state.outstanding(model, token.name)
    if token.max_in_flight is not None and outstanding >= token.max_in_flight:
        raise ApiError(429, f"This token already has {outstanding} requests for model `{model}` waiting or "
                       f"running, its limit; try again when one has finished.", type="rate_limit_error",
                       code="token_limit", retry_after_s=retry_after_s(
                           state.estimated_wait_s(model, outstanding - token.max_in_flight + 1),
                           RETRY_AFTER_QUEUE_FULL_S))
    if timeout_s is not None:
        estimate = state.estimated_wait_s(model, state.waiting(model, at_least=priority) + 1)
        if estimate is not None and estimate > timeout_s:
            raise ApiError(429, f"The wait for model `{model}` is estimated at {estimate:.0f} s, longer than the "
                           f"{timeout_s:g} s of X-Queue-Timeout.", type="rate_limit_error", code="queue_timeout",
                           retry_after_s=retry_after_s(estimate, RETRY_AFTER_QUEUE_FULL_S))
    return outstanding


def listed_in_connection(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names that `Connection` declares hop-by-hop for this message (RFC 9110 §7.6.1)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            names.update(token.strip().lower() for token in value.split(b","))
    return frozenset(names)


def upstream_request(request: Request, body: bytes, origin: Origin, grant: Grant) -> h11.Request:
    dropped = DROPPED_REQUEST_HEADERS | listed_in_connection(request.headers)
    headers = [(name, value) for name, value in request.headers if name not in dropped]
    headers.append((b"host", origin.host_header))
    headers.append((b"content-length", str(len(body)).encode()))
    if grant.api_key:
        headers.append((b"authorization", b"Bearer " + grant.api_key.encode()))
    if grant.vllm_priority is not None:
        headers.append((b"x-vllm-priority", str(grant.vllm_priority).encode()))
    # _parsed=True: h11 skips re-validating each header with its regexes. Every name and value here
    # was validated by h11 when the client's request was parsed, or is ours (host, length, key).
    return h11.Request(method=request.method, target=request.target, headers=headers, _parsed=True)


def response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """vLLM's response headers less hop-by-hop ones; Content-Length is kept, so h11 frames alike."""
    dropped = HOP_BY_HOP | listed_in_connection(headers)
    return [(name, value) for name, value in headers if name == b"content-length" or name not in dropped]


async def send_upstream(service: Service, grant: Grant, request: Request, body: bytes
                        ) -> tuple[UpstreamConnection, h11.Response]:
    """Sends the request and returns the response head; retries once on a stale pooled connection."""
    origin = Origin.parse(grant.url)
    outgoing = upstream_request(request, body, origin, grant)
    for attempt in (1, 2):
        connection, reused = await service.upstream.acquire(origin)
        try:
            await connection.send_request(outgoing, body)
            while True:
                event = await connection.next_event(service.config.upstream_timeout_s)
                if type(event) is h11.Response:
                    return connection, event
                if type(event) is not h11.InformationalResponse:
                    raise UpstreamError("vLLM closed the connection", before_response=True)
        except (OSError, TimeoutError, h11.ProtocolError, UpstreamError) as exc:
            connection.close()
            if reused and attempt == 1 and not isinstance(exc, TimeoutError):
                continue  # vLLM had closed this idle connection; once more on a fresh one
            raise UpstreamError(f"vLLM failed before answering: {type(exc).__name__}", before_response=True) from None
        except BaseException:
            connection.close()
            raise
    raise AssertionError("unreachable")


async def relay_chunks(client: ClientConnection, connection: UpstreamConnection, head: h11.Response,
                       out: list[bytes], timeout_s: float, meter: UsageMeter) -> None:
    """relay_response for a chunked body (every stream) to an HTTP/1.1 client, after the head in
    `out`: each read of vLLM's goes out in one write as it came, its chunks' framing included
    (`ChunkedBody`)."""
    body = connection.body = ChunkedBody()
    connection.relayed_done = False
    connection.keep_alive = head.http_version == b"1.1" and b"close" not in listed_in_connection(head.headers)
    data = connection.h11.trailing_data[0]  # what came with the head; h11 has not looked at it
    tail = b""
    while True:
        if data:
            try:
                parts = body.feed(data)
            except ValueError as exc:
                client.write_all(out)
                raise UpstreamError(f"vLLM sent a bad chunked body: {exc}", before_response=False) from None
            for part in parts:
                meter.feed(part)
                tail = part[-DONE_CHUNK_TAIL_BYTES:] if len(part) >= DONE_CHUNK_TAIL_BYTES else (
                    tail + part)[-DONE_CHUNK_TAIL_BYTES:]
            out += parts
        if body.ended:
            client.write_all(out + client.encode(h11.EndOfMessage()))
            await client.drain()
            return
        client.write_all(out)
        out = []
        await client.drain()
        connection.relayed_done = tail.endswith(SSE_DONE_CHUNK_END)
        try:
            async with asyncio.timeout(timeout_s):
                data = await connection.reader.read(READ_CHUNK_BYTES)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"vLLM failed mid-response: {type(exc).__name__}", before_response=False) from None
        if not data:
            raise UpstreamError("vLLM closed the connection mid-response", before_response=False)


async def relay_response(client: ClientConnection, connection: UpstreamConnection, head: h11.Response,
                         timeout_s: float, meter: UsageMeter) -> None:
    """Streams vLLM's response to the client as it arrives, with back-pressure on a slow client.

    What one read from vLLM brings (often the head, the body and its end; or many SSE chunks) goes
    to the client in one socket write, before the next read; nothing waits for more to arrive.
    Once what went out ends with `data: [DONE]` (only the tail of the last two Data events is
    looked at, once per read), the stream counts as delivered even if the client leaves before
    vLLM's terminator, which often comes in a write of its own.
    `meter` sees each Data event as relayed (byte searches, no parse): usage counts what was relayed.
    A chunked body to an HTTP/1.1 client, every stream, takes `relay_chunks` instead.
    """
    headers = response_headers(head.headers)
    meter.start(headers)
    out = client.encode(h11.Response(status_code=head.status_code, headers=headers, reason=head.reason,
                                     _parsed=True))  # headers h11 parsed, as above
    if is_chunked(head) and client.h11.their_http_version == b"1.1":
        return await relay_chunks(client, connection, head, out, timeout_s, meter)
    upstream = connection.h11
    reader = connection.reader
    before = last = b""
    connection.relayed_done = False
    while True:
        try:
            event = upstream.next_event()
        except h11.ProtocolError as exc:  # e.g. vLLM closed the connection in the middle of a chunked body
            raise UpstreamError(f"vLLM failed mid-response: {exc}", before_response=False) from None
        if event is h11.NEED_DATA:
            client.write_all(out)
            out = []
            await client.drain()
            connection.relayed_done = ends_with_done(before, last)
            try:
                async with asyncio.timeout(timeout_s):
                    data = await reader.read(READ_CHUNK_BYTES)
            except (OSError, TimeoutError) as exc:
                raise UpstreamError(f"vLLM failed mid-response: {type(exc).__name__}", before_response=False) from None
            upstream.receive_data(data)
            continue
        if type(event) is h11.Data:
            out += client.encode(event)  # h11 events are immutable: vLLM's chunk is sent on as it came
            before, last = last, event.data
            meter.feed(event.data)
        elif type(event) is h11.EndOfMessage:
            client.write_all(out + client.encode(h11.EndOfMessage()))
            await client.drain()
            return
        else:  # ConnectionClosed before the end of the body: what came is relayed, then the close
            client.write_all(out)
            raise UpstreamError("vLLM closed the connection mid-response", before_response=False)


def ends_with_done(before: bytes, last: bytes) -> bool:
    """Whether a body whose last two Data events are `before` and `last` ends with `data: [DONE]`."""
    if len(last) >= len(SSE_DONE):
        return last.endswith(SSE_DONE)
    return (bytes(before[-len(SSE_DONE):]) + last).endswith(SSE_DONE)  # the event split across two reads


async def proxy(service: Service, client: ClientConnection, request: Request, token: TokenInfo,
                hangup: HangupWatch, outcome: dict[str, Any]) -> None:
    """One POST, through the queue, to vLLM and back."""
    config = service.config
    # 1. read body (401 was checked on the head; a too large body is refused before it is read)
    body = await read_body(client, request, config.max_body_bytes)
    hangup.start_soon()
    # 2. read model
    model = read_model(request.headers, body)
    priority = effective_priority(token, request.headers)
    outcome["model"], outcome["priority"] = model, priority
    timeout_s = queue_timeout(request.headers)
    if not is_valid_model_id(model) or not service.capacity.is_live(model):
        raise model_not_found(model)
    # 3. check threshold, cap and deadline
    state = service.queue
    try:
        outstanding = check_admission(state, model, token, priority, timeout_s)
    except ApiError as error:
        service.metrics.shed.labels(model, error.code or "").inc()
        raise
    # 4. acquire grant
    queued_at = time.monotonic()
    wait_s = config.grant_timeout_s if timeout_s is None else min(timeout_s, config.grant_timeout_s)
    bucket = share_bucket(outstanding + 1)  # fair share: fewer outstanding, sooner
    state.add_waiting(model, token.name, priority)
    try:
        grant = await service.capacity.acquire_grant(model, priority, bucket, queued_at + wait_s)
    except ApiError as error:
        if error.status == 503:  # when a request of this priority would be granted
            error.retry_after_s = retry_after_s(
                state.estimated_wait_s(model, state.waiting(model, at_least=priority)), RETRY_AFTER_UNAVAILABLE_S)
        raise
    finally:
        state.remove_waiting(model, token.name, priority)
    granted_at = time.monotonic()
    service.metrics.grant_wait.labels(model, str(priority)).observe(granted_at - queued_at)
    meter = outcome["usage"] = UsageMeter()  # from here on the request counts as used (log_outcome records it)
    outcome["token"], outcome["wait_ms"] = token.name, (granted_at - queued_at) * 1000
    in_flight = service.metrics.in_flight.labels(model)
    in_flight.inc()
    state.add_running(model, token.name)
    connection = None
    try:
        # 5. acquire upstream connection, send head and original body
        try:
            connection, head = await send_upstream(service, grant, request, body)
        except UpstreamError as exc:
            log.warning("vLLM at %s unreachable: %s", grant.url, exc)
            outcome["ended"] = "upstream_failed"
            raise ApiError(502, "The model server could not be reached.", type="server_error",
                           code="upstream_unreachable") from None
        service.metrics.time_to_first_byte.labels(model).observe(time.monotonic() - granted_at)
        outcome["status"] = head.status_code
        # 6. relay response
        await relay_response(client, connection, head, config.upstream_timeout_s, meter)
    finally:
        # 7. release: the connection goes back to the pool only after a complete exchange
        if connection is not None:
            outcome["delivered"] = connection.relayed_done
            service.upstream.release(connection)
        in_flight.dec()
        state.remove_running(model, token.name)
        service.capacity.release_soon(grant)  # not awaited: a hang-up cancelling us cannot lose it


async def queue_status(service: Service, client: ClientConnection, token: TokenInfo) -> None:
    """GET /v1/queue: each live model's queue as all senders count it, seen from the caller's priority."""
    state = service.queue
    data = []
    for model in sorted(service.capacity.live_models()):
        ahead = state.waiting(model, at_least=token.priority)
        rate = state.grant_rate(model)
        data.append({"model": model, "waiting": state.waiting(model), "waiting_ahead": ahead,
                     "running": state.running(model), "slots": service.capacity.slots(model),
                     "grant_rate": round(rate or 0.0, 3),
                     "estimated_wait_seconds": None if rate is None else round((ahead + 1) / rate, 1),
                     "your_waiting": state.waiting(model, token=token.name),
                     "your_running": state.running(model, token=token.name)})
    await client.send_json(200, {"object": "list", "data": data})


async def usage_report(service: Service, client: ClientConnection, token: TokenInfo, target: bytes) -> None:
    """GET /v1/usage?days=N: the caller's own totals per model and UTC day, the last N days (default 30)."""
    query = urllib.parse.parse_qs(target.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)
    asked = query.get("days", ["30"])
    days = int(asked[0]) if len(asked) == 1 and asked[0].isascii() and asked[0].isdigit() else 0
    if not 1 <= days <= 366:
        raise ApiError(400, "`days` must be a whole number from 1 to 366.", code="invalid_days", param="days")
    since = first_day(days)
    database = service.tokens.database
    unavailable = ApiError(503, "The usage database is unreachable; try again shortly.", type="server_error",
                           code="usage_unavailable", retry_after_s=RETRY_AFTER_UNAVAILABLE_S)
    if service.usage.memory is not None:
        rows, source = service.usage.memory_rows(token.name, since), "memory"
    elif database is None:  # configured, not connected yet
        raise unavailable
    else:
        try:
            rows, source = await database.usage_rows(since, token.name), "database"
        except DatabaseError:
            raise unavailable from None
    await client.send_json(200, {"object": "list", "source": source,
                                 "data": [row.as_dict(with_token=False) for row in rows]})


async def list_models(service: Service, client: ClientConnection, model_id: str | None) -> None:
    models = service.capacity.live_models()
    if model_id is None:
        await client.send_json(200, {"object": "list", "data": [models[m] for m in sorted(models)]})
    elif model_id in models:
        await client.send_json(200, models[model_id])
    else:
        raise ApiError(404, f"The model `{model_id}` does not exist.", code="model_not_found", param="model")


async def handle(service: Service, client: ClientConnection, request: Request, hangup: HangupWatch,
                 outcome: dict[str, Any]) -> None:
    """The routing table: health routes, the model list, and every POST, which goes to vLLM."""
    path = request.target.split(b"?", 1)[0]
    if request.method == b"POST":
        token = await authenticate(service.tokens, header_value(request.headers, b"authorization"))
        await proxy(service, client, request, token, hangup, outcome)
        return
    await read_body(client, request, MAX_HEAD_BYTES)  # GET and others: an empty body, normally
    if request.method not in (b"GET", b"HEAD"):
        raise ApiError(405, f"Method {request.method.decode()} is not allowed here.", code="method_not_allowed")
    if path == b"/health/liveness":
        await client.send_json(200, {"status": "ok"})
    elif path == b"/health/readiness":
        ready = not service.shutting_down and service.capacity.is_ready() and await service.tokens.is_ready()
        await client.send_json(200 if ready else 503, {"status": "ready" if ready else "not ready"})
    else:
        token = await authenticate(service.tokens, header_value(request.headers, b"authorization"))
        if path == b"/v1/models":
            await list_models(service, client, None)
        elif path == b"/v1/queue":
            await queue_status(service, client, token)
        elif path == b"/v1/usage":
            await usage_report(service, client, token, request.target)
        elif path.startswith(b"/v1/models/"):
            await list_models(service, client, urllib.parse.unquote(path[len(b"/v1/models/"):].decode("latin-1")))
        else:
            raise ApiError(404, f"No route GET {path.decode('latin-1')}.", code="not_found")


async def serve_connection(service: Service, client: ClientConnection) -> None:
    """The h11 cycle loop of one client connection.

    Theory: a request is read head first; the handler authenticates, then reads the body. Our
    own errors go out as an OpenAI envelope only while h11 says a response can still start; after
    the response head has gone out, a failure closes the connection instead (the client sees a
    truncated message, never a false success). A request answered before its body was read ends
    the connection, gracefully (`close_gracefully`), and so does the last answer of a connection
    (`Connection: close`, HTTP/1.0, input read ahead past MAX_PIPELINED_BYTES), so that a reset
    cannot destroy it before the client reads it. Once the body is in, a `HangupWatch` reads
    the socket: if the client hangs up, the handler is cancelled, and its `finally` blocks release
    the grant and close the vLLM connection, which makes vLLM abort the generation.
    """
    this_task = asyncio.current_task()
    assert this_task is not None
    while not service.shutting_down:
        try:
            event = await client.read_head()
        except ApiError as error:  # malformed, too large, or framed ambiguously: answered, then closed
            await client.send_error(error)
            await client.close_gracefully()
            return
        except (TimeoutError, ConnectionError):
            return
        if type(event) is not h11.Request:
            return  # the client closed the connection between two requests
        request = Request(event.method, event.target, list(event.headers), event.http_version)
        outcome: dict[str, Any] = {"model": "-", "priority": "-", "status": 0}
        client.status = 0
        started = time.monotonic()
        hangup = HangupWatch(client, this_task)
        try:
            await handle(service, client, request, hangup, outcome)
        except ApiError as error:
            outcome["status"] = error.status
            if not client.can_start_response():
                return
            if client.h11.their_state is h11.SEND_BODY:
                error.close = True  # answered before the body was read: this connection ends
            await hangup.stop()
            await client.send_error(error)
            if error.close:
                await client.close_gracefully()
                return
        except UpstreamError as error:
            outcome["status"] = 502  # for the log and the metrics; the client sees the connection close
            outcome["ended"] = "upstream_failed"
            log.warning("vLLM failed mid-response: %s", error)
            return  # closing without the final chunk: the client sees an error, not a short success
        except TimeoutError:  # the request body stopped arriving (every other wait has its own error)
            outcome["status"] = 408
            if client.can_start_response():
                await client.send_error(ApiError(408, "The request body did not arrive in time.",
                                                 code="request_timeout", close=True))
                await client.close_gracefully()
            return
        except (ClientGone, ConnectionError):
            mark_client_gone(outcome)
            return
        except asyncio.CancelledError:
            if hangup.hung_up and this_task.uncancel() == 0:
                mark_client_gone(outcome)
                return
            if service.shutting_down and not outcome.get("delivered"):  # cut at the end of the shutdown grace
                outcome["status"], outcome["ended"] = 503, "shutdown"
            raise
        finally:
            try:
                await hangup.stop()  # re-raises a cancellation of this task (the shutdown's)
            finally:
                outcome["status"] = outcome["status"] or client.status
                log_outcome(service, request, outcome, started)
        if hangup.hung_up:
            return  # the hang-up came after the last await: its cancel is still pending
        if hangup.overflowed or client.h11.our_state is h11.MUST_CLOSE:
            # The last answer of this connection (pipelined input dropped, `Connection: close`, HTTP/1.0).
            await client.close_gracefully()
            return
        if client.h11.our_state is not h11.DONE or client.h11.their_state is not h11.DONE:
            return  # a failed write, or a body left unread
        client.h11.start_next_cycle()


def mark_client_gone(outcome: dict[str, Any]) -> None:
    """499 (nginx's code for a client that went away), unless it left with the whole stream."""
    if not outcome.get("delivered"):
        outcome["status"] = 499


class HangupWatch:
    """Reads the client socket while its request is being answered, and cancels the handler on EOF.

    Started by the handler once the request body is in (until then the handler reads the
    socket). Pipelined bytes are handed to h11, which keeps them for the next cycle, up to
    MAX_PIPELINED_BYTES; past that they are read and dropped, so that the watch still sees a
    hang-up but a flood costs no memory, and the connection closes after the current answer (the
    client can tell which requests were not answered, RFC 9112 §9.3.2).
    """

    __slots__ = ("client", "handler", "task", "timer", "hung_up", "read_ahead")

    def __init__(self, client: ClientConnection, handler: asyncio.Task[Any]) -> None:
        self.client = client
        self.handler = handler
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.hung_up = False
        self.read_ahead = 0  # bytes read past the request being answered

    @property
    def overflowed(self) -> bool:
        """Pipelined input was dropped: this connection cannot serve another request."""
        return self.read_ahead > MAX_PIPELINED_BYTES

    def start_soon(self) -> None:
        """Starts watching if the request is still being answered after HANGUP_WATCH_DELAY_S: most
        answers come sooner, and then cost no task at all (a client leaving in between is caught
        by the failed write, or by the watch once it runs)."""
        self.timer = asyncio.get_running_loop().call_later(HANGUP_WATCH_DELAY_S, self._start)

    def _start(self) -> None:
        self.timer = None
        self.task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                data = await self.client.reader.read(READ_CHUNK_BYTES)
            except ConnectionError:
                data = b""
            if not data:
                self.hung_up = True
                self.handler.cancel()
                return
            if not self.overflowed:
                self.read_ahead += len(data)
                if not self.overflowed:
                    self.client.h11.receive_data(data)

    async def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        task, self.task = self.task, None
        if task is None or task.done():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if self.handler.cancelling():
                raise


def log_outcome(service: Service, request: Request, outcome: dict[str, Any], started: float) -> None:
    status = outcome["status"]
    model = outcome["model"]
    if model != "-":
        # Only served models become label values: clients choose the model string.
        label = model if service.capacity.is_live(model) else "(not served)"
        service.metrics.requests.labels(label, str(status), str(outcome["priority"])).inc()
    path = request.target.split(b"?", 1)[0]
    meter: UsageMeter | None = outcome.get("usage")
    if meter is not None:  # forwarded to vLLM: the usage record, in memory, and its log line
        prompt_tokens, completion_tokens, exact = meter.counts()
        service.usage.record(outcome["token"], model, prompt_tokens, completion_tokens, exact)
        if not log.isEnabledFor(logging.INFO):
            return
        ended = outcome.get("ended") or ("client_gone" if status == 499 else "complete")
        log.info("%s %s model=%s priority=%s status=%s token_name=%s streamed=%d queue_wait_ms=%.1f total_ms=%.1f "
                 "prompt_tokens=%d completion_tokens=%d counts=%s ended=%s", request.method.decode(),
                 path.decode("latin-1"), model, outcome["priority"], status, outcome["token"], meter.streamed,
                 outcome["wait_ms"], (time.monotonic() - started) * 1000, prompt_tokens, completion_tokens,
                 "exact" if exact else "estimated", ended)
        return
    level = logging.DEBUG if path.startswith(b"/health/") else logging.INFO  # probes would drown the rest
    if log.isEnabledFor(level):
        log.log(level, "%s %s model=%s priority=%s status=%s %.1fms", request.method.decode(), path.decode("latin-1"),
                model, outcome["priority"], status, (time.monotonic() - started) * 1000)


def count_tokens(metrics: Metrics, token: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
    metrics.tokens.labels(model, token, "prompt").inc(prompt_tokens)
    metrics.tokens.labels(model, token, "completion").inc(completion_tokens)


# ---------------------------------------------------------------------------------------------
# Start-up and shutdown

async def run(config: Config) -> None:
    async with AsyncExitStack() as stack:
        registry = prom.CollectorRegistry()
        metrics = Metrics.create(registry)
        connector = None
        if config.database_url:
            tokens = TokenStore(config.token_cache_s,
                                on_query=lambda result: metrics.token_queries.labels(result).inc())
            connector = asyncio.create_task(tokens.connect(config.database_url))  # in the background: see TokenStore
            stack.push_async_callback(tokens.close)
            stack.push_async_callback(cancel_and_wait, connector)
        else:
            assert config.tokens_file is not None
            tokens = TokenStore.from_file(config.tokens_file, config.token_cache_s, config.max_priority)
        state = QueueState(sender_id=os.urandom(6).hex())
        capacity = CapacityClient(config.rabbitmq_url, config.max_priority, config.rpc_reconnect_attempts, state,
                                  metrics.queue_waiting, aging_s=config.priority_aging_s)
        upstream = UpstreamPool()
        stack.callback(upstream.close)
        usage = UsageRecorder(keep_memory=config.database_url is None, on_tokens=partial(count_tokens, metrics),
                              on_dropped=metrics.usage_dropped.inc)
        if config.database_url:
            writer = UsageWriter(usage, lambda: tokens.database, config.usage_flush_s,
                                 is_failure=lambda exc: isinstance(exc, (DatabaseError, TimeoutError)))
            writer.start()
            stack.push_async_callback(writer.close)  # unwinds before the database closes: the last totals go out
        service = Service(config, tokens, capacity, upstream, metrics, state, usage)

        maintainer = asyncio.create_task(capacity.maintain())
        stack.push_async_callback(cancel_and_wait, maintainer)
        stack.callback(capacity.flush_releases)  # before the broker connection closes (the stack unwinds in reverse)
        if config.metrics_port:
            metrics_server, metrics_thread = prom.start_http_server(config.metrics_port, registry=registry)
            stack.callback(metrics_server.shutdown)

        server = await start_server(service, config.host, config.port)
        log.info("sender listening on %s:%d (credentials from %s)", config.host, server.port,
                 database_class(config.database_url).dialect if config.database_url else config.tokens_file)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if connector is not None:  # a bad database setting ends the process, as at start-up
            connector.add_done_callback(lambda task: task.cancelled() or task.exception() is None or stop.set())
        await stop.wait()

        await server.shut_down()
        if connector is not None and connector.done() and not connector.cancelled() and connector.exception():
            raise connector.exception()  # type: ignore[misc]


@dataclass(slots=True)
class Server:
    """The listening socket and the connections it serves."""
    service: Service
    server: asyncio.Server
    connections: dict[asyncio.Task[None], ClientConnection]

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def shut_down(self) -> None:
        """Readiness red, no new connections, idle ones closed, requests in progress given a grace period."""
        log.info("shutting down with %d open connections", len(self.connections))
        self.service.shutting_down = True
        self.server.close()
        for task, client in list(self.connections.items()):
            if client.idle:
                task.cancel()
        if self.connections:
            _, pending = await asyncio.wait(self.connections, timeout=SHUTDOWN_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.server.wait_closed()


async def start_server(service: Service, host: str, port: int) -> Server:
    connections: dict[asyncio.Task[None], ClientConnection] = {}

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        client = connections[task] = ClientConnection(reader, writer)
        try:
            await serve_connection(service, client)
        except asyncio.CancelledError:
            # The top of a connection task, cancelled at shutdown. Python 3.11's stream callback
            # would log a cancelled task as an error, so the cancellation ends here.
            pass
        finally:
            del connections[task]
            writer.close()

    server = await asyncio.start_server(on_connect, host, port, limit=READ_CHUNK_BYTES, backlog=1024)
    return Server(service, server, connections)


def main() -> None:
    try:
        config = Config.from_env(dict(os.environ))
    except ConfigError as exc:
        print(f"sender: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    setup_logging(config.log_level)
    try:
        uvloop.run(run(config))
    except ConfigError as exc:
        print(f"sender: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
