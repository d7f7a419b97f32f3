"""The sender: an OpenAI-compatible HTTP/1.1 front door that serves shared vLLM GPUs by priority.

To a client it looks like a vLLM server. Each POST is authenticated by its bearer token (a
priority and a threshold, from PostgreSQL or a token file, cached), routed by the `model` of its
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

Known limitations: no HTTP/2 and no TLS on the client side (the ingress terminates TLS); requests
waiting for a grant when the broker connection drops are answered 503 rather than re-published.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import signal
import ssl
import sys
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
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
                             model_queue)
from common.tasks import cancel_and_wait

log = logging.getLogger("sender")

MAX_HEAD_BYTES = 64 * 1024          # request line + headers; larger gets 431
HEADER_TIMEOUT_S = 30.0             # from the first byte of a request to the end of its head
KEEP_ALIVE_TIMEOUT_S = 75.0         # idle client connection between two requests
BODY_IDLE_TIMEOUT_S = 30.0          # silence while a request body is being received
LINGER_TIMEOUT_S = 2.0              # reading and discarding after an early answer, before closing
UPSTREAM_CONNECT_TIMEOUT_S = 10.0
UPSTREAM_IDLE_MAX_S = 4.0           # vLLM (uvicorn) drops idle keep-alive connections after 5 s
UPSTREAM_POOL_SIZE = 64             # idle connections kept per vLLM server
UPSTREAM_FINISH_TIMEOUT_S = 1.0     # for vLLM's chunked terminator after `data: [DONE]`, once the client left
READ_CHUNK_BYTES = 64 * 1024
QUEUE_LENGTH_REFRESH_S = 0.1
TOKEN_MISS_CACHE_S = 5.0            # unknown tokens are remembered this long (floods stay off the DB)
TOKEN_CACHE_MAX_ENTRIES = 100_000
RETRY_AFTER_QUEUE_FULL_S = 1
RETRY_AFTER_UNAVAILABLE_S = 5
SHUTDOWN_GRACE_S = 25.0
HANGUP_WATCH_DELAY_S = 0.05         # a request still running after this gets a reader that notices a hang-up
RECONNECT_DELAY_MIN_S = 0.5
RECONNECT_DELAY_MAX_S = 10.0
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# Releases wait this long at most, to travel together: under load that is several per message, which
# saves the broker and the consumer a delivery each (bench/RESULTS.md: +6-9 % req/s). A slot comes
# back 2 ms later at worst, less than one vLLM engine step, so vLLM could not have used it sooner.
RELEASE_BATCH_S = 0.002

# RFC 9110 §7.6.1 hop-by-hop headers, plus the framing headers we set anew on each side.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"content-length", b"expect",
})
# Request headers that never reach vLLM: our token, the Host of our side, our own priority
# header, and vLLM's priority header, which vLLM obeys over the body (only a grant sets it).
DROPPED_REQUEST_HEADERS = HOP_BY_HOP | {b"host", b"authorization", b"x-priority", b"x-vllm-priority"}

# The last event of an OpenAI stream: a client may leave as soon as it has it (see relay_response).
SSE_DONE = b"data: [DONE]\n\n"

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
    rpc_reconnect_attempts: int
    log_level: int

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Config:
        database_url = env.get("DATABASE_URL", "").strip() or None
        tokens_file = env.get("TOKENS_FILE", "").strip() or None
        if database_url is None and tokens_file is None:
            raise ConfigError("set DATABASE_URL (postgresql://...) or TOKENS_FILE (a YAML or JSON token list)")
        if database_url is not None and not database_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("DATABASE_URL must start with postgresql://")
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
            rpc_reconnect_attempts=env_int(env, "RPC_RECONNECT_ATTEMPTS", 10, minimum=1),
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

@dataclass(frozen=True, slots=True)
class Metrics:
    requests: prom.Counter
    grant_wait: prom.Histogram
    time_to_first_byte: prom.Histogram
    in_flight: prom.Gauge
    queue_waiting: prom.Gauge

    @classmethod
    def create(cls, registry: prom.CollectorRegistry) -> Metrics:
        return cls(
            requests=prom.Counter("dispatcher_requests", "Requests answered, by model, status and priority.",
                                  ["model", "status", "priority"], registry=registry),
            grant_wait=prom.Histogram(
                "dispatcher_grant_wait_seconds", "Time from queueing to grant.", ["model"], registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)),
            time_to_first_byte=prom.Histogram(
                "dispatcher_upstream_time_to_first_byte_seconds", "Time from sending to vLLM to its response head.",
                ["model"], registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)),
            in_flight=prom.Gauge("dispatcher_requests_in_flight", "Requests holding a grant, by model.",
                                 ["model"], registry=registry),
            queue_waiting=prom.Gauge("dispatcher_queue_waiting", "Requests waiting in the model's queue, "
                                     "as the threshold check sees it (refreshed every 100 ms).", ["model"],
                                     registry=registry),
        )


# ---------------------------------------------------------------------------------------------
# Token store: PostgreSQL or a token file, behind an in-memory cache

@dataclass(frozen=True, slots=True)
class TokenInfo:
    name: str
    priority: int
    threshold: int


class TokenStore:
    """Finds a token's priority and threshold. Lookups are cached; the database is asked on a miss only.

    The cache is keyed by the token's SHA-256 (the only form the database holds). Concurrent
    misses for one token share one query. A database failure is a 503, never a 401.
    """

    def __init__(self, lookup: Callable[[str], Awaitable[TokenInfo | None]],
                 ping: Callable[[], Awaitable[None]], cache_s: float) -> None:
        self._lookup = lookup
        self._ping = ping
        self._cache_s = cache_s
        self._miss_s = min(TOKEN_MISS_CACHE_S, cache_s)
        self._cache: dict[str, tuple[TokenInfo | None, float]] = {}
        self._loading: dict[str, asyncio.Future[TokenInfo | None]] = {}

    @classmethod
    def from_file(cls, path: str, cache_s: float, max_priority: int) -> TokenStore:
        from admin import load_token_entries  # the operator tool owns the token file format

        try:
            entries = load_token_entries(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"TOKENS_FILE: {exc}") from None
        tokens = {}
        for entry in entries:
            if entry["priority"] > max_priority:
                raise ConfigError(f"TOKENS_FILE: token {entry['name']!r} has priority {entry['priority']} "
                                  f"above MAX_PRIORITY={max_priority}")
            tokens[hash_token(entry["token"])] = TokenInfo(entry["name"], entry["priority"], entry["threshold"])

        async def lookup(digest: str) -> TokenInfo | None:
            return tokens.get(digest)

        async def ping() -> None:
            return None

        return cls(lookup, ping, cache_s)

    @classmethod
    def from_pool(cls, pool: Any, cache_s: float) -> TokenStore:
        import asyncpg

        async def lookup(digest: str) -> TokenInfo | None:
            try:
                async with asyncio.timeout(5):
                    row = await pool.fetchrow(
                        "SELECT name, priority, threshold FROM tokens WHERE token_sha256 = $1 AND revoked_at IS NULL",
                        digest)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("credential lookup in PostgreSQL failed: %s", type(exc).__name__)
                raise ApiError(503, "The token store is unreachable; try again shortly.", type="server_error",
                               code="token_store_unavailable", retry_after_s=RETRY_AFTER_UNAVAILABLE_S) from None
            return None if row is None else TokenInfo(row["name"], row["priority"], row["threshold"])

        async def ping() -> None:
            async with asyncio.timeout(2):
                await pool.fetchval("SELECT 1")

        return cls(lookup, ping, cache_s)

    async def authenticate(self, authorization: bytes | None) -> TokenInfo:
        if not authorization or authorization[:7].lower() != b"bearer ":
            raise unauthorized()
        token = authorization[7:].strip()
        if not token:
            raise unauthorized()
        digest = hashlib.sha256(token).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            info = cached[0]
        else:
            info = await self._load(digest)
        if info is None:
            raise unauthorized()
        return info

    async def _load(self, digest: str) -> TokenInfo | None:
        loading = self._loading.get(digest)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[TokenInfo | None] = asyncio.get_running_loop().create_future()
        self._loading[digest] = future
        try:
            info = await self._lookup(digest)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters, if any, get it through shield
            raise
        finally:
            del self._loading[digest]
        future.set_result(info)
        if len(self._cache) >= TOKEN_CACHE_MAX_ENTRIES:
            self._cache.clear()
        self._cache[digest] = (info, time.monotonic() + (self._cache_s if info else self._miss_s))
        return info

    async def is_ready(self) -> bool:
        try:
            await self._ping()
        except Exception:  # any failure means "cannot check tokens now"
            return False
        return True


def fail_with(future: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
    """Fails `future` with the exception `done` ended with, if any (and if `future` still waits)."""
    if not future.done() and not done.cancelled() and done.exception() is not None:
        future.set_exception(done.exception())  # type: ignore[arg-type]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Capacity RPC client: the RabbitMQ side of the sender

@dataclass(slots=True)
class ModelEntry:
    card: dict[str, Any]
    consumers: dict[str, float] = field(default_factory=dict)  # consumer id -> expires (monotonic)

    def is_live(self, now: float) -> bool:
        for consumer, expires in list(self.consumers.items()):
            if expires <= now:
                del self.consumers[consumer]
        return bool(self.consumers)


class CapacityClient:
    """Owns the broker connection: grant RPCs, releases, model announcements and queue lengths.

    - Grant requests go to the model's priority queue with `reply_to` = direct reply-to
      (no reply queue at all); replies are matched to waiting futures by correlation id.
    - Releases go out on a channel without publisher confirms: nothing waits for them, and those
      of RELEASE_BATCH_S are gathered into one message per consumer.
    - Queue lengths (ready messages) are read every 100 ms with a passive queue.declare per
      live model, so the threshold check needs no broker round trip on the request path.
    - aiormq does not reconnect; `maintain` does, with back-off. When the connection drops, every
      waiting request is failed with 503 (its grant, if any comes, went to a dead channel).
    """

    def __init__(self, url: str, max_priority: int, reconnect_attempts: int, queue_waiting: prom.Gauge) -> None:
        self._url = url
        self._queue_waiting = queue_waiting
        self._max_priority = max_priority
        self._reconnect_attempts = reconnect_attempts
        self._rpc: amqp.FastChannel | None = None
        self._release: amqp.FastChannel | None = None
        self._pending: dict[str, asyncio.Future[Grant]] = {}
        self._ids = itertools.count()
        self._id_prefix = os.urandom(4).hex() + "-"
        self._models: dict[str, ModelEntry] = {}
        self._queue_lengths: dict[str, int] = {}
        self._failures = 0
        self._ever_connected = False
        self._releases: dict[str, list[str]] = {}  # release_to -> leases, sent within RELEASE_BATCH_S
        self._release_timer: asyncio.TimerHandle | None = None

    # -- state read by the request path (no I/O) --

    def is_ready(self) -> bool:
        if self._rpc is not None:
            return True
        return self._ever_connected and self._failures < self._reconnect_attempts

    def live_models(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {model: entry.card for model, entry in self._models.items() if entry.is_live(now)}

    def is_live(self, model: str) -> bool:
        entry = self._models.get(model)
        return entry is not None and entry.is_live(time.monotonic())

    def queue_length(self, model: str) -> int:
        return self._queue_lengths.get(model, 0)

    # -- the RPC --

    async def acquire_grant(self, model: str, priority: int, deadline: float) -> Grant:
        channel = self._rpc
        if channel is None:
            raise broker_unavailable()
        correlation_id = f"{self._id_prefix}{next(self._ids)}"
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            expiration_ms = max(1, int((deadline - time.monotonic()) * 1000))
            try:
                # Confirmed and mandatory: a queue that is gone comes back as PublishError at once.
                confirmation = channel.basic_publish(
                    encode(GrantRequest(priority)), routing_key=model_queue(model), mandatory=True,
                    priority=min(priority, self._max_priority), correlation_id=correlation_id,
                    reply_to=DIRECT_REPLY_TO, expiration=str(expiration_ms), message_id=correlation_id,
                    delivery_mode=1)
                assert confirmation is not None  # the RPC channel has publisher confirms
                # Only a failed confirm matters; it is handed to the grant's future, so that this task
                # wakes once per request (for the grant, or for the failure), not also for the confirm.
                confirmation.add_done_callback(lambda done: fail_with(future, done))
                async with asyncio.timeout_at(deadline):
                    return await future
            except TimeoutError:
                raise ApiError(503, f"No capacity for model `{model}` was granted in time; try again later.",
                               type="server_error", code="grant_timeout",
                               retry_after_s=RETRY_AFTER_UNAVAILABLE_S) from None
            except aiormq.exceptions.PublishError:
                # The model's queue is gone: its last consumer left moments ago.
                raise model_not_found(model) from None
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                log.warning("grant request for %s failed: %s", model, type(exc).__name__)
                raise broker_unavailable() from None
        except BaseException:
            # A grant that arrived while we were being cancelled is nobody's: give it back.
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release_soon(future.result())
            raise
        finally:
            self._pending.pop(correlation_id, None)

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
        future = self._pending.pop(message.header.properties.correlation_id or "", None)
        if future is None or future.done():
            self.release_soon(grant)  # nobody waits for it any more
            return
        future.set_result(grant)

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
            return
        if entry is None:
            entry = self._models[announcement.model] = ModelEntry(card=announcement.card)
            log.info("model %s is served", announcement.model)
        entry.card = announcement.card
        entry.consumers[announcement.consumer] = time.monotonic() + announcement.ttl_s

    # -- connection lifecycle --

    async def maintain(self) -> None:
        """Connects, and reconnects with back-off for as long as the process runs.

        This is a supervisor: any failure of a connection attempt or of a live connection (aiormq
        raises several unrelated exception families) leads to the next attempt, never to its end.
        """
        delay = RECONNECT_DELAY_MIN_S
        while True:
            try:
                connection = await amqp.connect(self._url)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                self._failures += 1
                log.warning("RabbitMQ unreachable (%s, attempt %d); retrying in %.1fs",
                            type(exc).__name__, self._failures, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX_S)
                continue
            try:
                await self._serve(connection)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                log.warning("RabbitMQ connection lost: %s", type(exc).__name__)
            finally:
                self._rpc = self._release = None
                self._fail_pending()
                if not connection.aiormq.is_closed:
                    await connection.aiormq.close()
            delay = RECONNECT_DELAY_MIN_S
            await asyncio.sleep(delay)

    async def _serve(self, connection: amqp.Connection) -> None:
        rpc = await connection.channel()
        await rpc.aiormq.basic_consume(DIRECT_REPLY_TO, self.on_reply, no_ack=True)
        release = await connection.channel(publisher_confirms=False)
        await release.aiormq.exchange_declare(ANNOUNCE_EXCHANGE, exchange_type="fanout")
        announcements = await release.aiormq.queue_declare("", exclusive=True, auto_delete=True)
        await release.aiormq.queue_bind(announcements.queue, ANNOUNCE_EXCHANGE)
        await release.aiormq.basic_consume(announcements.queue, self.on_announcement, no_ack=True)
        self._rpc, self._release = rpc, release
        self._failures = 0
        self._ever_connected = True
        log.info("connected to RabbitMQ")
        poller = asyncio.create_task(self._poll_queue_lengths(connection.aiormq))
        try:
            await connection.aiormq.closing
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)

    async def _poll_queue_lengths(self, connection: aiormq.abc.AbstractConnection) -> None:
        """Reads the ready count of each live model's queue every 100 ms, on a channel of its own
        (a passive declare of a missing queue closes its channel with a 404)."""
        probe: aiormq.abc.AbstractChannel | None = None
        while True:
            for model in self.live_models():
                try:
                    if probe is None or probe.is_closed:
                        probe = await connection.channel(publisher_confirms=False)
                    declared = await probe.queue_declare(model_queue(model), passive=True)
                    waiting = declared.message_count or 0
                except aiormq.exceptions.ChannelNotFoundEntity:
                    waiting = 0  # no queue yet, or no more: nobody waits
                except (aiormq.exceptions.AMQPError, RuntimeError) as exc:
                    log.debug("queue length of %s unknown: %s", model, type(exc).__name__)
                    continue  # keep the last count; the connection supervisor handles a dead link
                self._queue_lengths[model] = waiting
                self._queue_waiting.labels(model).set(waiting)
            for model in list(self._queue_lengths):
                if not self.is_live(model):
                    del self._queue_lengths[model]
                    self._queue_waiting.remove(model)
            await asyncio.sleep(QUEUE_LENGTH_REFRESH_S)

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(broker_unavailable())
        self._pending.clear()

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
# Upstream: keep-alive connections to the vLLM servers, h11 client side

class UpstreamError(Exception):
    """vLLM could not be reached or failed; `before_response` says whether a byte had come back."""

    def __init__(self, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"bad vLLM address {url!r}", before_response=True)
        return cls(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))

    @property
    def host_header(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode()


class UpstreamConnection:
    __slots__ = ("origin", "reader", "writer", "h11", "idle_since", "relayed_done")

    def __init__(self, origin: Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.relayed_done = False   # the client has the stream's last event; only vLLM's terminator may be missing

    async def send_request(self, request: h11.Request, body: bytes) -> None:
        # send_with_data_passthrough hands the body back as is: a large upload is not copied again.
        self.writer.writelines([*self.h11.send_with_data_passthrough(request),
                                *self.h11.send_with_data_passthrough(h11.Data(data=body)),
                                *self.h11.send_with_data_passthrough(h11.EndOfMessage())])
        await self.writer.drain()

    async def next_event(self, timeout_s: float) -> Any:
        """The next h11 event of the response; raises UpstreamError on EOF, reset or silence."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(timeout_s):
                data = await self.reader.read(READ_CHUNK_BYTES)
            self.h11.receive_data(data)

    def is_reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def close(self) -> None:
        self.writer.close()


class UpstreamPool:
    """Idle keep-alive connections per vLLM server; no new TCP connection per request."""

    def __init__(self) -> None:
        self._idle: dict[Origin, deque[UpstreamConnection]] = {}
        self._finishing: set[asyncio.Task[None]] = set()
        self._tls = ssl.create_default_context()

    async def acquire(self, origin: Origin) -> tuple[UpstreamConnection, bool]:
        """A connection to `origin`, and whether it was reused (may have been closed by vLLM)."""
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if now - connection.idle_since < UPSTREAM_IDLE_MAX_S and not connection.reader.at_eof():
                return connection, True
            connection.close()
        try:
            async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(
                    origin.host, origin.port, ssl=self._tls if origin.scheme == "https" else None,
                    limit=READ_CHUNK_BYTES)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to vLLM: {type(exc).__name__}", before_response=True) from None
        return UpstreamConnection(origin, reader, writer), False

    def release(self, connection: UpstreamConnection) -> None:
        """Keeps the connection for the next request if the exchange completed, else closes it."""
        if not connection.is_reusable():
            if connection.relayed_done and connection.h11.their_state is h11.SEND_BODY:
                task = asyncio.create_task(self._finish(connection))
                self._finishing.add(task)
                task.add_done_callback(self._finishing.discard)
            else:
                connection.close()
            return
        connection.h11.start_next_cycle()
        connection.idle_since = time.monotonic()
        idle = self._idle.setdefault(connection.origin, deque())
        if len(idle) >= UPSTREAM_POOL_SIZE:
            idle.popleft().close()
        idle.append(connection)

    async def _finish(self, connection: UpstreamConnection) -> None:
        """Reads the end of a stream whose client left after its last event: vLLM often writes the
        chunked terminator a moment after `data: [DONE]`. Anything else, or nothing, closes it."""
        event = None
        try:
            event = await connection.next_event(UPSTREAM_FINISH_TIMEOUT_S)
        except (OSError, TimeoutError, h11.ProtocolError):
            pass
        finally:  # cancelled at shutdown too: the connection is closed then
            if type(event) is h11.EndOfMessage:
                self.release(connection)
            else:
                connection.close()

    def close(self) -> None:
        for task in self._finishing:
            task.cancel()
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


# ---------------------------------------------------------------------------------------------
# The client side: h11 server connection

class ClientGone(Exception):
    """The client closed its connection."""


class ClientConnection:
    """One client socket with its h11 state; the only place client-side h11 events are built."""

    __slots__ = ("reader", "writer", "h11", "idle", "status")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.idle = False  # waiting for the first byte of a request: safe to close at shutdown
        self.status = 0    # of the last response the sender answered itself, for the access log

    async def read_head(self) -> Any:
        """The next request head: the keep-alive timeout runs until its first byte, then the head timeout."""
        self.idle = True
        try:
            async with asyncio.timeout(KEEP_ALIVE_TIMEOUT_S) as deadline:
                while True:
                    event = self.h11.next_event()
                    if event is not h11.NEED_DATA:
                        return event
                    data = await self.reader.read(READ_CHUNK_BYTES)
                    if self.idle:
                        self.idle = False
                        deadline.reschedule(asyncio.get_running_loop().time() + HEADER_TIMEOUT_S)
                    self.h11.receive_data(data)
        finally:
            self.idle = False

    async def next_event(self, timeout_s: float) -> Any:
        """The next event of the request body; each read waits at most `timeout_s`."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.h11.they_are_waiting_for_100_continue:
                await self.send(h11.InformationalResponse(status_code=100, headers=()))
            async with asyncio.timeout(timeout_s):
                data = await self.reader.read(READ_CHUNK_BYTES)
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
        self.status = error.status
        await self.send_whole(*render_error(error))

    async def send_whole(self, response: h11.Response, body: bytes) -> None:
        self.write_all([*self.encode(response), *self.encode(h11.Data(data=body)), *self.encode(h11.EndOfMessage())])
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


def check_threshold(capacity: CapacityClient, model: str, token: TokenInfo) -> None:
    waiting = capacity.queue_length(model)
    if waiting > token.threshold:
        raise ApiError(429, f"{waiting} requests are waiting for model `{model}`, more than this token "
                       f"accepts ({token.threshold}); try again later.", type="rate_limit_error",
                       code="queue_full", retry_after_s=RETRY_AFTER_QUEUE_FULL_S)


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


async def relay_response(client: ClientConnection, connection: UpstreamConnection, head: h11.Response,
                         timeout_s: float) -> None:
    """Streams vLLM's response to the client as it arrives, with back-pressure on a slow client.

    What one read from vLLM brings (often the head, the body and its end; or many SSE chunks) goes
    to the client in one socket write, before the next read; nothing waits for more to arrive.
    Once what went out ends with `data: [DONE]` (only the tail of the last two Data events is
    looked at, once per read), the stream counts as delivered even if the client leaves before
    vLLM's terminator, which often comes in a write of its own.
    """
    out = client.encode(h11.Response(status_code=head.status_code, headers=response_headers(head.headers),
                                     reason=head.reason, _parsed=True))  # headers h11 parsed, as above
    upstream = connection.h11
    reader = connection.reader
    before = last = b""
    connection.relayed_done = False
    while True:
        event = upstream.next_event()
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
            try:
                upstream.receive_data(data)
            except h11.ProtocolError as exc:
                raise UpstreamError(f"vLLM sent a bad response: {exc}", before_response=False) from None
            continue
        if type(event) is h11.Data:
            out += client.encode(event)  # h11 events are immutable: vLLM's chunk is sent on as it came
            before, last = last, event.data
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
    if not is_valid_model_id(model) or not service.capacity.is_live(model):
        raise model_not_found(model)
    # 3. check threshold
    check_threshold(service.capacity, model, token)
    # 4. acquire grant
    queued_at = time.monotonic()
    grant = await service.capacity.acquire_grant(model, priority, queued_at + config.grant_timeout_s)
    granted_at = time.monotonic()
    service.metrics.grant_wait.labels(model).observe(granted_at - queued_at)
    in_flight = service.metrics.in_flight.labels(model)
    in_flight.inc()
    connection = None
    try:
        # 5. acquire upstream connection, send head and original body
        try:
            connection, head = await send_upstream(service, grant, request, body)
        except UpstreamError as exc:
            log.warning("vLLM at %s unreachable: %s", grant.url, exc)
            raise ApiError(502, "The model server could not be reached.", type="server_error",
                           code="upstream_unreachable") from None
        service.metrics.time_to_first_byte.labels(model).observe(time.monotonic() - granted_at)
        outcome["status"] = head.status_code
        # 6. relay response
        await relay_response(client, connection, head, config.upstream_timeout_s)
    finally:
        # 7. release: the connection goes back to the pool only after a complete exchange
        if connection is not None:
            outcome["delivered"] = connection.relayed_done
            service.upstream.release(connection)
        in_flight.dec()
        service.capacity.release_soon(grant)  # not awaited: a hang-up cancelling us cannot lose it


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
        token = await service.tokens.authenticate(header_value(request.headers, b"authorization"))
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
        await service.tokens.authenticate(header_value(request.headers, b"authorization"))
        if path == b"/v1/models":
            await list_models(service, client, None)
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
    the connection, gracefully (`close_gracefully`). Once the body is in, a `HangupWatch` reads
    the socket: if the client hangs up, the handler is cancelled, and its `finally` blocks release
    the grant and close the vLLM connection, which makes vLLM abort the generation.
    """
    this_task = asyncio.current_task()
    assert this_task is not None
    while not service.shutting_down:
        try:
            event = await client.read_head()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            message = "Request header fields too large." if status == 431 else f"Malformed HTTP request: {exc}"
            await client.send_error(ApiError(status, message, code="bad_http_request", close=True))
            await client.close_gracefully()
            return
        except (TimeoutError, ConnectionError):
            return
        if type(event) is not h11.Request:
            return  # the client closed the connection between two requests
        if head_size(event) > MAX_HEAD_BYTES:  # h11 bounds only what is still incomplete after a read
            await client.send_error(ApiError(431, "Request header fields too large.", code="bad_http_request",
                                             close=True))
            await client.close_gracefully()
            return
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
            raise
        finally:
            await hangup.stop()
            outcome["status"] = outcome["status"] or client.status
            log_outcome(service, request, outcome, started)
        if hangup.hung_up:
            return  # the hang-up came after the last await: its cancel is still pending
        if client.h11.our_state is h11.MUST_CLOSE or client.h11.their_state is not h11.DONE:
            return
        client.h11.start_next_cycle()


def mark_client_gone(outcome: dict[str, Any]) -> None:
    """499 (nginx's code for a client that went away), unless it left with the whole stream."""
    if not outcome.get("delivered"):
        outcome["status"] = 499


class HangupWatch:
    """Reads the client socket while its request is being answered, and cancels the handler on EOF.

    Started by the handler once the request body is in (until then the handler reads the
    socket). Pipelined bytes are handed to h11, which keeps them for the next cycle.
    """

    __slots__ = ("client", "handler", "task", "timer", "hung_up")

    def __init__(self, client: ClientConnection, handler: asyncio.Task[Any]) -> None:
        self.client = client
        self.handler = handler
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.hung_up = False

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
    level = logging.DEBUG if path.startswith(b"/health/") else logging.INFO  # probes would drown the rest
    if log.isEnabledFor(level):
        log.log(level, "%s %s model=%s priority=%s status=%s %.1fms", request.method.decode(), path.decode("latin-1"),
                model, outcome["priority"], status, (time.monotonic() - started) * 1000)


# ---------------------------------------------------------------------------------------------
# Start-up and shutdown

async def run(config: Config) -> None:
    async with AsyncExitStack() as stack:
        registry = prom.CollectorRegistry()
        metrics = Metrics.create(registry)
        if config.database_url:
            import asyncpg

            try:
                pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=8, timeout=10)
            except (OSError, asyncpg.PostgresError) as exc:
                raise ConfigError(f"DATABASE_URL: cannot connect to PostgreSQL ({exc})") from None
            stack.push_async_callback(pool.close)
            tokens = TokenStore.from_pool(pool, config.token_cache_s)
        else:
            assert config.tokens_file is not None
            tokens = TokenStore.from_file(config.tokens_file, config.token_cache_s, config.max_priority)
        capacity = CapacityClient(config.rabbitmq_url, config.max_priority, config.rpc_reconnect_attempts,
                                  metrics.queue_waiting)
        upstream = UpstreamPool()
        stack.callback(upstream.close)
        service = Service(config, tokens, capacity, upstream, metrics)

        maintainer = asyncio.create_task(capacity.maintain())
        stack.push_async_callback(cancel_and_wait, maintainer)
        stack.callback(capacity.flush_releases)  # before the broker connection closes (the stack unwinds in reverse)
        if config.metrics_port:
            metrics_server, metrics_thread = prom.start_http_server(config.metrics_port, registry=registry)
            stack.callback(metrics_server.shutdown)

        server = await start_server(service, config.host, config.port)
        log.info("sender listening on %s:%d (credentials from %s)", config.host, server.port,
                 "PostgreSQL" if config.database_url else config.tokens_file)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()

        await server.shut_down()


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
