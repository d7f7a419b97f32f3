"""The consumer: grants slots on the vLLM servers of one model, by priority, through RabbitMQ.

It runs beside the vLLM server(s) of one model. Senders put one tiny grant request per client
request on the model's priority queue; the consumer takes a request off the queue only when one of
its servers can take it at once, answers with a grant naming that server, and counts the slot as
used until the sender's release, or until vLLM reports the request gone.

    delivery -> decode -> pick server -> record lease -> publish grant to reply_to
      -> cancel the queue consumer if that was the last free slot -> ack

A server takes a new request when (`Server.blocked_reason`, read every METRICS_REFRESH_SECONDS from
vLLM's /health and /metrics): it is healthy, below MAX_PARALLEL_REQUESTS, vLLM has nothing waiting
(`vllm:num_requests_waiting`), and the speed each running request gets, the rate of
`vllm:generation_tokens_total` over the last second (or refresh) divided by the requests running
now, is at least MIN_TOKENS_PER_SECOND_PER_USER. Requests granted since the last reading count as
running, and at most max(BURST_GRANTS, load) are granted per reading, so a stale good reading cannot
flood a server. Below BURST_GRANTS running the speed rule waits for figures that say something: a
GPU decodes a handful of sequences at almost the speed of one, so a burst on an idle or lightly
loaded server is granted at once, unless the last reading taken over a window in which requests ran
all along found n of them below the floor (then the burst stops below n). A server with nothing
running always qualifies.

Invariants:
- No priority inversion. The model queue is consumed only while some server can take a request,
  and the consumer is cancelled *before* acking the request that took the last slot. While no
  server can take one (full, or too slow), nothing is held unacked, so a high-priority request that
  arrives later is the next one the broker delivers (RabbitMQ never reorders messages already
  delivered); the rule is checked again at every reading and release. The prefetch is 1, or
  PREFETCH_ROOMY while the servers have room for many more (`Capacity.room`): the broker then sends
  a few requests at once, each granted as it arrives, which keeps the queue's order and spares a
  broker round trip per grant. Near the limits it drops back to 1 before the room runs out.
- Every decision (which server, may I grant now, which slots are really in use) is made by
  `Capacity`, which does no I/O and takes the time as an argument. The AMQP handlers only decode,
  decide, reply and ack, one at a time under one lock (aiormq runs each delivery in its own task).
- Slots are exact. A slot counts from its grant to its release, and every reading reconciles the
  leases with vLLM's own count (running + waiting): a lease old enough to have reached vLLM that
  vLLM no longer has frees its slot (a lost release: sender killed, network cut); requests vLLM has
  that no lease explains (a consumer restarted, another consumer) count against the cap. Leases
  survive broker reconnects: the requests still run on vLLM.
- A server whose /health or /metrics fails gets no grant; with none healthy the queue is not consumed
  and readiness is red: requests wait in the queue (or time out with 503), they never fail with 502.

Known limitations: the rule reads vLLM's figures once per refresh, so it reacts within a refresh
or two. Several consumers granting on one server each see the others' requests only at the next
reading, and may overshoot the cap by a few grants in between. vLLM's gauges are refreshed by its
engine steps, so after every running request was aborted they may stay stale until the next request
(vLLM issue #22545): when no token moved for STALE_GAUGES_S the gauges are taken as zero.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import re
import signal
import socket
import ssl
import sys
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aiormq
import aiormq.exceptions
import h11
import orjson
import prometheus_client as prom
import uvloop
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec
from prometheus_client.parser import text_string_to_metric_families

from common import amqp
from common.config import (ConfigError, env_bool, env_float, env_int, env_str, log_level, rabbitmq_url,
                           setup_logging)
from common.messages import (ANNOUNCE_EXCHANGE, ANNOUNCE_INTERVAL_S, ANNOUNCE_TTL_S, Announcement, Grant,
                             MessageError, decode_grant_request, decode_release, encode, is_valid_model_id,
                             max_queue_priority, model_queue)
from common.tasks import cancel_and_wait

log = logging.getLogger("consumer")

DEFAULT_MAX_PARALLEL_REQUESTS = 64           # a backstop: below it, the speed rule and vLLM's queue decide
DEFAULT_MIN_TOKENS_PER_SECOND_PER_USER = 10.0  # a little faster than anyone reads (about 7 words a second)
# Fair share within a priority: a token's requests are ranked by how many it has outstanding, in
# this many classes (1st; 2nd-3rd; 4th-7th; 8th and more). 1 turns fair share off (FIFO per priority).
DEFAULT_FAIR_SHARE_LEVELS = 4
DEFAULT_LEASE_TIMEOUT_S = 3600.0    # bookkeeping only: vLLM's counts free lost slots, in seconds
DEFAULT_BURST_GRANTS = 4            # granted at once below this load; new grants per reading: max(this, load then)
PREFETCH_ROOMY = 8                  # grant requests in flight to us at once while there is room for many more:
PREFETCH_ROOMY_FROM = 4 * PREFETCH_ROOMY   # taken up when this many grants would fit,
PREFETCH_ROOMY_UNTIL = 2 * PREFETCH_ROOMY  # and back to 1 below this (a switch costs three broker round trips)
LEASE_GRACE_MIN_S = 1.0             # a younger lease may not have reached vLLM's counts yet...
LEASE_GRACE_REFRESHES = 3           # ...nor one granted within this many metrics refreshes
RATE_WINDOW_S = 1.0                 # the generation rate is taken over at least this long (and one refresh)
STALE_GAUGES_S = 30.0               # running > 0 with no token counted this long: vLLM's gauges are stale
VLLM_HTTP_TIMEOUT_S = 5.0           # one GET to vLLM; with a 1 s refresh, readiness is red within 10 s
VLLM_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
VLLM_STARTUP_RETRY_S = 1.0          # between /health attempts at start-up
READ_CHUNK_BYTES = 64 * 1024
PROBE_IDLE_TIMEOUT_S = 30.0         # a probe connection silent this long is closed
PROBE_MAX_REQUEST_BYTES = 64 * 1024
RELEASE_QUEUE_PREFIX = "dispatcher.release."
# The release queue outlives a broker reconnect this long, so releases sent meanwhile still arrive.
RELEASE_QUEUE_EXPIRES_MS = 60_000
SHUTDOWN_TIMEOUT_S = 5.0

# Summed over the `engine` label (one per data-parallel rank); reference A.8.
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_GENERATION_TOKENS = "vllm:generation_tokens_total"
VLLM_PROMPT_TOKENS = "vllm:prompt_tokens_total"

JSON_CONTENT_TYPE = b"application/json"
_CONSUMER_ID_UNSAFE = re.compile(r"[^a-zA-Z0-9\-_.]")


# ---------------------------------------------------------------------------------------------
# Configuration

@dataclass(frozen=True, slots=True)
class ServerSpec:
    url: str                   # "http://host:port", no path, no trailing slash
    api_key: str | None
    max_parallel: int


@dataclass(frozen=True, slots=True)
class Config:
    model: str
    servers: tuple[ServerSpec, ...]
    min_tokens_per_second_per_user: float
    burst_grants: int
    metrics_refresh_s: float
    rpc_queue_expiration_ms: int
    probe_port: int
    max_vllm_connection_attempts: int
    forward_priority: bool
    lease_timeout_s: float
    rabbitmq_url: str
    rpc_reconnect_attempts: int
    max_priority: int
    fair_share_levels: int
    log_level: int

    @property
    def model_queue(self) -> str:
        return model_queue(self.model, self.max_queue_priority)

    @property
    def max_queue_priority(self) -> int:
        return max_queue_priority(self.max_priority, self.fair_share_levels)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        model = env.get("MODEL", "").strip()
        if not model:
            raise ConfigError("MODEL is required: the model id clients send (vLLM's served model name)")
        if not is_valid_model_id(model):
            raise ConfigError(f"MODEL={model!r} cannot name a RabbitMQ queue "
                              "(letters, digits and -_.:@#,/+ only, at most 255 bytes with the prefix)")
        max_parallel = env_int(env, "MAX_PARALLEL_REQUESTS", DEFAULT_MAX_PARALLEL_REQUESTS, minimum=1)
        max_priority = env_int(env, "MAX_PRIORITY", 10, minimum=1, maximum=255)
        # RabbitMQ priorities go up to 255: each priority level gets `levels` of them.
        most_levels = 256 // (max_priority + 1)
        levels = env_int(env, "FAIR_SHARE_LEVELS", min(DEFAULT_FAIR_SHARE_LEVELS, most_levels), minimum=1,
                         maximum=most_levels)
        return cls(
            model=model,
            servers=read_servers(env, max_parallel),
            min_tokens_per_second_per_user=env_float(env, "MIN_TOKENS_PER_SECOND_PER_USER",
                                                     DEFAULT_MIN_TOKENS_PER_SECOND_PER_USER, minimum=0),
            burst_grants=env_int(env, "BURST_GRANTS", DEFAULT_BURST_GRANTS, minimum=1),
            metrics_refresh_s=env_float(env, "METRICS_REFRESH_SECONDS", 1.0, minimum=0.01),
            rpc_queue_expiration_ms=env_int(env, "RPC_QUEUE_EXPIRATION", 30_000, minimum=1000),
            probe_port=env_int(env, "PROBE_PORT", 8081, minimum=0, maximum=65535),
            max_vllm_connection_attempts=env_int(env, "MAX_VLLM_CONNECTION_ATTEMPTS", 100, minimum=1),
            forward_priority=env_bool(env, "FORWARD_PRIORITY", False),
            lease_timeout_s=env_float(env, "LEASE_TIMEOUT_SECONDS", DEFAULT_LEASE_TIMEOUT_S, minimum=0.001),
            rabbitmq_url=rabbitmq_url(env),
            rpc_reconnect_attempts=env_int(env, "RPC_RECONNECT_ATTEMPTS", 10, minimum=1),
            max_priority=max_priority,
            fair_share_levels=levels,
            log_level=log_level(env),
        )


def read_servers(env: Mapping[str, str], max_parallel: int) -> tuple[ServerSpec, ...]:
    """VLLM_SERVERS (a JSON list) when set, else the one server of VLLM_URL and VLLM_API_KEY."""
    raw = env.get("VLLM_SERVERS", "").strip()
    if not raw:
        url = check_base_url("VLLM_URL", env_str(env, "VLLM_URL", "http://localhost:8000"))
        return (ServerSpec(url, env.get("VLLM_API_KEY", "").strip() or None, max_parallel),)
    shape = 'a JSON list of {"url", "api_key", "max_parallel_requests"}'
    try:
        entries = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ConfigError(f"VLLM_SERVERS is not valid JSON (expected {shape})") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"VLLM_SERVERS must be a non-empty list ({shape})")
    servers: list[ServerSpec] = []
    for index, entry in enumerate(entries):
        where = f"VLLM_SERVERS[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not an object ({shape})")
        unknown = set(entry) - {"url", "api_key", "max_parallel_requests"}
        if unknown:
            raise ConfigError(f"{where} has unknown keys {sorted(unknown)} ({shape})")
        url = entry.get("url")
        if not isinstance(url, str):
            raise ConfigError(f"{where}.url is missing or not a string")
        api_key = entry.get("api_key")
        if api_key is not None and not isinstance(api_key, str):
            raise ConfigError(f"{where}.api_key must be a string or null")
        parallel = entry.get("max_parallel_requests", max_parallel)
        if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
            raise ConfigError(f"{where}.max_parallel_requests must be an integer of at least 1")
        servers.append(ServerSpec(check_base_url(f"{where}.url", url), api_key or None, parallel))
    urls = [server.url for server in servers]
    for url in urls:
        if urls.count(url) > 1:
            raise ConfigError(f"VLLM_SERVERS lists {url} more than once")
    return tuple(servers)


def check_base_url(name: str, url: str) -> str:
    """A vLLM base URL is scheme://host[:port]: the sender keeps only that part of a grant's url."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{name}={url!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}={url!r} must look like http://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{name}={url!r} must have no path (vLLM's routes start at /v1)")
    return f"{parts.scheme}://{parts.netloc}"


def new_consumer_id() -> str:
    """Unique per process; it also names the release queue, so only queue-name characters."""
    host = _CONSUMER_ID_UNSAFE.sub("-", socket.gethostname())[:64] or "consumer"
    return f"{host}.{os.urandom(4).hex()}"


# ---------------------------------------------------------------------------------------------
# Decisions: which server, may I grant now, which slots are really in use. No I/O; time is an argument.

@dataclass(frozen=True, slots=True)
class MetricsSample:
    """What vLLM's /metrics said, summed over engines: the speed rule's and the slot count's input."""
    running: float
    waiting: float
    generation_tokens_total: float
    prompt_tokens_total: float = 0.0


@dataclass(frozen=True, slots=True)
class SampleOutcome:
    """What `Capacity.record_sample` found, for the caller to log and count."""
    freed: list[str]           # leases whose request vLLM no longer has (their release was lost)
    counters_reset: bool       # the token counters went down: vLLM restarted
    gauges_stale: bool         # running/waiting frozen while no token moves (vLLM issue #22545)


@dataclass(slots=True)
class Server:
    """One vLLM server: its health, its last reading, and the slots granted on it.

    `load` is what counts against the cap: our leases, plus the requests vLLM had at the last
    reading that none of our leases explains (granted by another consumer, or by this one before a
    restart). A release frees its slot at once; vLLM's own counts correct the rest at each reading.
    """
    url: str
    api_key: str | None
    max_parallel: int
    counters: deque[tuple[float, float, float]]  # (read at, generation total, prompt total), the rate window
    burst: int = DEFAULT_BURST_GRANTS
    healthy: bool = False
    health_changed_at: float = 0.0
    leases: dict[str, float] = field(default_factory=dict)  # lease id -> granted at (monotonic), oldest first
    sample: MetricsSample | None = None
    sampled_at: float = 0.0           # when the reading of `sample` was sent
    foreign: int = 0                  # requests in vLLM at that reading that hold none of our leases
    load_at_reading: int = 0
    counters_moved_at: float = 0.0
    missing: int = 0                  # settled leases vLLM did not have at the last reading
    busy_since: float | None = None   # the first of the readings in a row that showed requests running
    measured: tuple[float, float] | None = None  # (running, speed each) at the last reading `measured_speed` had

    @property
    def in_flight(self) -> int:
        return len(self.leases)

    @property
    def load(self) -> int:
        return len(self.leases) + self.foreign

    @property
    def headroom(self) -> int:
        return self.max_parallel - self.load

    def pending(self) -> int:
        """Leases granted since the last reading was sent: vLLM's figures do not show them yet."""
        return sum(1 for granted_at in self.leases.values() if granted_at >= self.sampled_at)

    def generation_rate(self) -> float | None:
        """Generated tokens per second over the rate window; None before two readings."""
        if len(self.counters) < 2:
            return None
        (first_at, first_total, _), (last_at, last_total, _) = self.counters[0], self.counters[-1]
        return (last_total - first_total) / (last_at - first_at) if last_at > first_at else None

    def speed_per_request(self) -> float | None:
        """What vLLM gives each running request now: the rate over the window / running at the reading."""
        rate = self.generation_rate()
        if rate is None or self.sample is None or self.sample.running <= 0:
            return None
        return rate / self.sample.running

    def measured_speed(self) -> float | None:
        """`speed_per_request`, when requests ran from the start of the rate window to its end; None when
        the window says nothing about their speed (idle, or they started within it: the rate then
        takes in their prefill and a part of the window in which nothing ran)."""
        if self.busy_since is None or not self.counters or self.counters[0][0] < self.busy_since:
            return None
        return self.speed_per_request()

    def burst_size(self, min_speed: float) -> int:
        """Below this load the speed rule waits for figures: `burst`, or fewer than the requests the
        last measured reading found below the floor (kept while idle: the server is not faster then)."""
        if self.measured is not None and self.measured[1] < min_speed:
            return min(self.burst, round(self.measured[0]) - 1)
        return self.burst

    def room(self, min_speed: float) -> int:
        """How many requests this server may take one after another before its next reading: the
        number of grants `blocked_reason` would allow in a row (0 when it says no now)."""
        if self.blocked_reason(min_speed) is not None:
            return 0
        room = self.max_parallel - self.load
        if min_speed <= 0:
            return room
        room = min(room, max(self.burst, self.load_at_reading) - self.pending())
        sample = self.sample
        assert sample is not None  # not blocked, so it has a reading
        if sample.generation_tokens_total == 0 and sample.prompt_tokens_total > 0:
            return room  # a pooling model: the speed rule does not apply
        # Grant k (from 0) is allowed while the load it finds is 0 or `is_fast_enough`; each of these
        # holds for the first so many k, so the grants in a row are the longest of those runs.
        allowed = 1 if self.load == 0 else 0
        rate = self.generation_rate()
        if rate is not None:
            allowed = max(allowed, math.floor(rate / min_speed) - self.load + 1)
        allowed = max(allowed, self.burst_size(min_speed) - self.load)
        return min(room, max(0, allowed))

    def is_fast_enough(self, min_speed: float) -> bool:
        """The speed rule for one more request on top of the load (> 0)."""
        rate = self.generation_rate()
        # The rate divided among the requests running now, those granted since the reading included:
        # as if the total rate did not grow with them, which errs on the slow side...
        if rate is not None and rate / self.load >= min_speed:
            return True
        # ...except below the burst size: a handful of sequences decode at almost the speed of one, so
        # only a speed measured while requests ran through a whole window can say no.
        return self.load < self.burst_size(min_speed)

    def blocked_reason(self, min_speed: float) -> str | None:
        """Why this server may not take a request now; None when it may. The whole rule, in order."""
        sample = self.sample
        if not self.healthy or sample is None:
            return "unhealthy"
        if self.load >= self.max_parallel:
            return "full"
        if sample.waiting > 0:
            return "vllm_waiting"  # vLLM queues already: another request would only wait there, unordered
        if min_speed <= 0:
            return None
        # A stale good reading must not let a flood through: the load at most doubles per reading.
        if self.pending() >= max(self.burst, self.load_at_reading):
            return "burst"
        # Nothing running always qualifies; so does a server that has read prompts but never generated
        # a token (a pooling model: embeddings, scores), to which the speed rule cannot apply.
        if self.load == 0 or (sample.generation_tokens_total == 0 and sample.prompt_tokens_total > 0):
            return None
        return None if self.is_fast_enough(min_speed) else "speed"


class Capacity:
    """The servers of one model, the slots granted on them, and the rule that grants a new one."""

    def __init__(self, servers: Iterable[ServerSpec], lease_timeout_s: float, lease_prefix: str = "", *,
                 min_speed: float = 0.0, lease_grace_s: float = LEASE_GRACE_MIN_S,
                 rate_window_readings: int = 2, burst: int = DEFAULT_BURST_GRANTS) -> None:
        self.servers = [Server(spec.url, spec.api_key, spec.max_parallel, deque(maxlen=max(2, rate_window_readings)),
                               burst) for spec in servers]
        self.min_speed = min_speed
        self._by_url = {server.url: server for server in self.servers}
        self._lease_server: dict[str, Server] = {}
        self._lease_timeout_s = lease_timeout_s
        self._lease_grace_s = lease_grace_s
        self._lease_prefix = lease_prefix
        self._lease_ids = itertools.count(1)

    def can_take(self, server: Server) -> bool:
        return server.blocked_reason(self.min_speed) is None

    def has_room(self) -> bool:
        return any(self.can_take(server) for server in self.servers)

    def room(self) -> int:
        """Grants the servers would take one after another before the next reading."""
        return sum(server.room(self.min_speed) for server in self.servers)

    def is_any_healthy(self) -> bool:
        """A server answers /health and /metrics: the consumer can grant once it has room."""
        return any(server.healthy and server.sample is not None for server in self.servers)

    def pick_server(self) -> Server | None:
        """The server that can take a request now with the most free slots (the first listed on a tie)."""
        best: Server | None = None
        for server in self.servers:
            if self.can_take(server) and (best is None or server.headroom > best.headroom):
                best = server
        return best

    def grant(self, server: Server, now: float) -> str:
        if not self.can_take(server):
            raise ValueError(f"{server.url} cannot take a request now")
        lease = f"{self._lease_prefix}{next(self._lease_ids)}"
        server.leases[lease] = now
        self._lease_server[lease] = server
        return lease

    def release(self, lease: str) -> Server | None:
        """Frees the slot of `lease`; None when unknown (already released, reconciled or expired)."""
        server = self._lease_server.pop(lease, None)
        if server is not None:
            del server.leases[lease]
        return server

    def _forget(self, server: Server, leases: Iterable[str]) -> None:
        for lease in leases:
            del server.leases[lease]
            del self._lease_server[lease]

    def expire_leases(self, now: float) -> list[tuple[str, Server]]:
        """The safety net: forgets leases granted more than the lease timeout ago. Slots do not depend
        on it: a forgotten lease counts as a request of vLLM's own until a reading says it has ended."""
        expired = [(lease, server) for server in self.servers for lease, granted_at in server.leases.items()
                   if now - granted_at >= self._lease_timeout_s]
        for lease, server in expired:
            self._forget(server, [lease])
            server.foreign += 1
        return expired

    def set_health(self, url: str, ok: bool, now: float) -> bool:
        """Records a health check; True when the server's health changed. An unhealthy server's
        figures are dropped: it is read afresh when it comes back."""
        server = self._by_url[url]
        if not ok:
            server.sample = None
            server.counters.clear()
            server.missing = 0
            server.busy_since = None
            server.measured = None
        if server.healthy == ok:
            return False
        server.healthy = ok
        server.health_changed_at = now
        return True

    def record_sample(self, url: str, sample: MetricsSample, read_at: float) -> SampleOutcome:
        """Takes a reading of vLLM's /metrics sent at `read_at`, and reconciles the slots with it.

        Our leases granted more than the grace period before the reading have reached vLLM by now,
        unless their request has ended: when there are more of them than vLLM has requests at two
        readings in a row, the oldest of the excess are freed (their release was lost: a sender killed,
        a network cut). One reading is not enough: a request that has just ended has its release on the
        way, and freeing a slot for it too would free one twice. Younger leases are left alone, since
        their request may not have reached vLLM yet. Requests vLLM has beyond our leases are counted as
        `foreign`, so a restarted consumer does not grant beyond the cap.
        """
        server = self._by_url[url]
        counters = server.counters
        last = counters[-1] if counters else None
        reset = last is not None and (sample.generation_tokens_total < last[1] or sample.prompt_tokens_total < last[2])
        if reset:
            counters.clear()
            server.measured = None  # vLLM restarted, perhaps with other settings
        if last is None or reset or (sample.generation_tokens_total, sample.prompt_tokens_total) != last[1:]:
            server.counters_moved_at = read_at
        counters.append((read_at, sample.generation_tokens_total, sample.prompt_tokens_total))
        # vLLM does not refresh its gauges while its engine is idle: after every running request was
        # aborted at once they keep their last value until the next request (vLLM issue #22545).
        stale = sample.running + sample.waiting > 0 and read_at - server.counters_moved_at >= STALE_GAUGES_S
        if stale:
            sample = MetricsSample(0.0, 0.0, sample.generation_tokens_total, sample.prompt_tokens_total)
        if sample.running <= 0:
            server.busy_since = None
        elif server.busy_since is None:
            server.busy_since = read_at
        in_vllm = round(sample.running + sample.waiting)
        settled = [lease for lease, granted_at in server.leases.items() if granted_at < read_at - self._lease_grace_s]
        missing = max(0, len(settled) - in_vllm)
        freed = settled[:min(missing, server.missing)]
        self._forget(server, freed)
        server.missing = missing - len(freed)
        granted_before = sum(1 for granted_at in server.leases.values() if granted_at < read_at)
        server.foreign = max(0, in_vllm - granted_before)
        server.sample = sample
        server.sampled_at = read_at
        server.load_at_reading = server.load
        speed = server.measured_speed()
        if speed is not None:
            server.measured = (sample.running, speed)
        return SampleOutcome(freed, reset, stale)


def vllm_priority(priority: int, max_priority: int, forward: bool) -> int | None:
    """vLLM's `priority` runs the other way (lower is served earlier), and only matters with
    `--scheduling-policy priority`, hence FORWARD_PRIORITY."""
    if not forward:
        return None
    return max_priority - min(max(priority, 0), max_priority)


def parse_vllm_metrics(text: str) -> MetricsSample | None:
    """Running, waiting, generated and prompt token totals from vLLM's Prometheus text, summed over
    engines; None without the running gauge (not vLLM, or not its metrics)."""
    totals = {VLLM_RUNNING: 0.0, VLLM_WAITING: 0.0, VLLM_GENERATION_TOKENS: 0.0, VLLM_PROMPT_TOKENS: 0.0}
    seen = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
                seen = seen or sample.name == VLLM_RUNNING
    if not seen:
        return None
    return MetricsSample(totals[VLLM_RUNNING], totals[VLLM_WAITING], totals[VLLM_GENERATION_TOKENS],
                         totals[VLLM_PROMPT_TOKENS])


# ---------------------------------------------------------------------------------------------
# Metrics of the consumer itself (PROBE_PORT /metrics)

BLOCKED_REASONS = ("unhealthy", "full", "vllm_waiting", "burst", "speed")
NAN = float("nan")


@dataclass(frozen=True, slots=True)
class Metrics:
    grants: prom.Counter
    releases: prom.Counter
    lost_releases: prom.Counter
    lease_expiries: prom.Counter

    @classmethod
    def create(cls, registry: prom.CollectorRegistry, capacity: Capacity) -> Metrics:
        def counter(name: str, help_text: str) -> prom.Counter:
            return prom.Counter(name, help_text, ["server"], registry=registry)

        def gauge(name: str, help_text: str, read: Callable[[Server], float]) -> None:
            # Read from the decisions at scrape time, so no code path can forget to update them.
            family = prom.Gauge(name, help_text, ["server"], registry=registry)
            for server in capacity.servers:
                family.labels(server.url).set_function(lambda s=server: read(s))

        metrics = cls(
            grants=counter("dispatcher_consumer_grants", "Slots granted, by vLLM server."),
            releases=counter("dispatcher_consumer_releases", "Slots released by a sender, by vLLM server."),
            lost_releases=counter("dispatcher_consumer_lost_releases",
                                  "Slots freed because vLLM no longer had their request (release lost)."),
            lease_expiries=counter("dispatcher_consumer_lease_expiries",
                                   "Leases forgotten after LEASE_TIMEOUT_SECONDS (bookkeeping only)."),
        )
        gauge("dispatcher_consumer_in_flight", "Slots granted by this consumer and not yet released.",
              lambda s: s.in_flight)
        gauge("dispatcher_consumer_slots_used", "Slots counted against MAX_PARALLEL_REQUESTS: ours, plus requests "
              "vLLM runs that no lease of ours explains.", lambda s: s.load)
        gauge("dispatcher_consumer_server_healthy", "1 when the server's /health and /metrics answer.",
              lambda s: 1.0 if s.healthy and s.sample is not None else 0.0)
        gauge("dispatcher_consumer_vllm_running", "vllm:num_requests_running at the last reading.",
              lambda s: s.sample.running if s.sample is not None else NAN)
        gauge("dispatcher_consumer_vllm_waiting", "vllm:num_requests_waiting at the last reading.",
              lambda s: s.sample.waiting if s.sample is not None else NAN)
        gauge("dispatcher_consumer_generation_tokens_per_second", "vLLM's generation rate over the rate window.",
              lambda s: value_or_nan(s.generation_rate()))
        gauge("dispatcher_consumer_tokens_per_second_per_request",
              "Generation rate / running requests: the speed each user gets, compared with "
              "MIN_TOKENS_PER_SECOND_PER_USER.", lambda s: value_or_nan(s.speed_per_request()))
        gauge("dispatcher_consumer_slots_cap", "MAX_PARALLEL_REQUESTS of the server: slots_used never exceeds it.",
              lambda s: s.max_parallel)
        prom.Gauge("dispatcher_consumer_min_tokens_per_second_per_user", "The speed floor "
                   "(MIN_TOKENS_PER_SECOND_PER_USER) that tokens_per_second_per_request is held to; 0: off.",
                   registry=registry).set_function(lambda: capacity.min_speed)
        blocked = prom.Gauge("dispatcher_consumer_blocked", "1 for the reason why the server takes no request now "
                             "(unhealthy, full, vllm_waiting, burst, speed); all 0 when it can take one.",
                             ["server", "reason"], registry=registry)
        for server in capacity.servers:
            for reason in BLOCKED_REASONS:
                blocked.labels(server.url, reason).set_function(
                    lambda s=server, r=reason: 1.0 if s.blocked_reason(capacity.min_speed) == r else 0.0)
            for family in (metrics.grants, metrics.releases, metrics.lost_releases, metrics.lease_expiries):
                family.labels(server.url)
        return metrics


def value_or_nan(value: float | None) -> float:
    return NAN if value is None else value


# ---------------------------------------------------------------------------------------------
# vLLM: a tiny HTTP/1.1 GET client (h11), one fresh connection per request

class VllmError(Exception):
    """vLLM could not be reached, or its answer could not be read."""


@dataclass(frozen=True, slots=True)
class ServerReading:
    healthy: bool                   # GET /health answered 200
    sample: MetricsSample | None    # None: /metrics unreachable, or without vLLM's figures
    read_at: float                  # monotonic time the requests were sent


class VllmClient:
    """Reads /health, /metrics and /v1/models; every failure becomes VllmError or a negative answer."""

    def __init__(self, timeout_s: float = VLLM_HTTP_TIMEOUT_S) -> None:
        self._timeout_s = timeout_s
        self._tls = ssl.create_default_context()
        self._warned_no_card: set[str] = set()  # retried every few seconds: warn once per server

    async def is_healthy(self, server: Server) -> bool:
        try:
            status, _ = await self.get(server, "/health")
        except VllmError as exc:
            log.debug("GET %s/health failed: %s", server.url, exc)
            return False
        return status == 200

    async def read(self, server: Server) -> ServerReading:
        """Health and load, in parallel, so one slow server is seen within one HTTP timeout."""
        read_at = time.monotonic()
        healthy, sample = await asyncio.gather(self.is_healthy(server), self.read_metrics(server))
        return ServerReading(healthy, sample, read_at)

    async def read_metrics(self, server: Server) -> MetricsSample | None:
        try:
            status, body = await self.get(server, "/metrics")
            if status != 200:
                raise VllmError(f"status {status}")
            return parse_vllm_metrics(body.decode())
        except (VllmError, ValueError) as exc:  # UnicodeDecodeError and the parser's errors are ValueErrors
            log.debug("GET %s/metrics failed: %s", server.url, exc)
            return None

    async def read_model_card(self, server: Server, model: str) -> dict[str, Any] | None:
        """The entry for `model` in the server's /v1/models, as vLLM gives it."""
        try:
            status, body = await self.get(server, "/v1/models")
            if status != 200:
                raise VllmError(f"status {status}")
            listing = orjson.loads(body)
        except (VllmError, orjson.JSONDecodeError) as exc:
            log.warning("GET %s/v1/models failed: %s", server.url, exc)
            return None
        data = listing.get("data") if isinstance(listing, dict) else None
        cards = [card for card in data if isinstance(card, dict)] if isinstance(data, list) else []
        for card in cards:
            if card.get("id") == model:
                return card
        if server.url not in self._warned_no_card:
            self._warned_no_card.add(server.url)
            log.warning("%s does not serve a model named %r (it serves %s); check MODEL", server.url, model,
                        [card.get("id") for card in cards])
        return None

    async def get(self, server: Server, path: str) -> tuple[int, bytes]:
        parts = urllib.parse.urlsplit(server.url)
        assert parts.hostname is not None
        tls = parts.scheme == "https"
        host = parts.netloc.rpartition("@")[2]  # no userinfo in Host (RFC 9110 §7.2)
        headers = [(b"host", host.encode()), (b"accept", b"*/*"), (b"connection", b"close")]
        if server.api_key:
            headers.append((b"authorization", b"Bearer " + server.api_key.encode()))
        connection = h11.Connection(h11.CLIENT)
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await asyncio.open_connection(
                    parts.hostname, parts.port or (443 if tls else 80), ssl=self._tls if tls else None,
                    limit=READ_CHUNK_BYTES)
                try:
                    writer.write(connection.send(h11.Request(method="GET", target=path, headers=headers))
                                 + connection.send(h11.EndOfMessage()))
                    await writer.drain()
                    return await read_response(connection, reader)
                finally:
                    writer.close()
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            raise VllmError(f"{type(exc).__name__}: {exc}") from None


async def read_response(connection: h11.Connection, reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = 0
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(READ_CHUNK_BYTES))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > VLLM_MAX_RESPONSE_BYTES:
                raise VllmError(f"response larger than {VLLM_MAX_RESPONSE_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise VllmError("connection closed before a complete response")


async def wait_for_vllm(vllm: VllmClient, capacity: Capacity, attempts: int) -> bool:
    """Polls every server's /health, 1 s apart, until one answers 200; False after `attempts` rounds.
    vLLM serves no HTTP at all until its model is loaded (reference A.9): refused means loading."""
    for attempt in range(1, attempts + 1):
        results = await asyncio.gather(*(vllm.is_healthy(server) for server in capacity.servers))
        now = time.monotonic()
        for server, ok in zip(capacity.servers, results):
            capacity.set_health(server.url, ok, now)
        if any(results):
            return True
        if attempt == 1 or attempt % 10 == 0:
            log.info("waiting for vLLM /health (attempt %d of %d)", attempt, attempts)
        if attempt < attempts:
            await asyncio.sleep(VLLM_STARTUP_RETRY_S)
    return False


async def fetch_model_card(vllm: VllmClient, capacity: Capacity, model: str) -> dict[str, Any] | None:
    for server in capacity.servers:
        if server.healthy:
            card = await vllm.read_model_card(server, model)
            if card is not None:
                return card
    return None


# ---------------------------------------------------------------------------------------------
# The broker side: the model queue's consumer, grants, releases, announcements, reconnects

class Dispatcher:
    """Owns the RabbitMQ connection and turns deliveries into grants, one decision at a time.

    - The model queue is consumed only while `capacity.has_room()`: `_maybe_consume` and
      `_maybe_pause` are called after every change of capacity, under the lock. The prefetch is 1,
      or PREFETCH_ROOMY while `capacity.room()` is large; RabbitMQ applies a new prefetch to new
      consumers only, so a change is a cancel, a basic.qos and a new consume.
    - Releases arrive on this consumer's own queue `dispatcher.release.<id>` (no-ack). It is not
      exclusive but expires a minute after its last consumer, so it outlives a reconnect.
    - The model queue is redeclared every tick, since x-expires would delete it while we are full.
    - aiormq does not reconnect; `maintain` does, with back-off, and redeclares everything.
      Unacked requests go back to the queue when a connection dies; leases are kept.
    """

    def __init__(self, config: Config, consumer_id: str, capacity: Capacity, metrics: Metrics,
                 fetch_card: Callable[[], Awaitable[dict[str, Any] | None]]) -> None:
        self._config = config
        self._consumer_id = consumer_id
        self._capacity = capacity
        self._metrics = metrics
        self._fetch_card = fetch_card
        self.card: dict[str, Any] | None = None
        self._model_queue = config.model_queue
        self.release_queue = RELEASE_QUEUE_PREFIX + consumer_id
        self._lock = asyncio.Lock()
        self._fast: amqp.FastChannel | None = None  # the channel; the grant and its ack go through it
        self._consumer_tag: str | None = None
        self._prefetch = 1
        self._stopping = False
        self._failures = 0
        self._ever_connected = False
        self._stale_gauges: set[str] = set()  # servers whose gauges are taken as stale (logged once)

    @property
    def _channel(self) -> AbstractChannel | None:
        return self._fast.aiormq if self._fast is not None else None

    def is_ready(self) -> bool:
        if self._stopping:
            return False
        if self._channel is not None:
            return True
        return self._ever_connected and self._failures < self._config.rpc_reconnect_attempts

    # -- broker callbacks: decode, decide, reply, ack --

    async def on_request(self, message: DeliveredMessage) -> None:
        try:
            async with self._lock:
                await self._handle_request(message)
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError) as exc:
            # The channel died under us: the broker requeues the request, `maintain` reconnects.
            log.debug("grant request not answered: %s", type(exc).__name__)

    async def _handle_request(self, message: DeliveredMessage) -> None:
        channel = message.channel
        if channel is not self._channel:
            return  # delivered on a channel since closed: the broker has requeued it
        delivery_tag = message.delivery.delivery_tag
        properties = message.header.properties
        try:
            request = decode_grant_request(message.body)
            reply_to = properties.reply_to or ""
            if not reply_to or len(reply_to.encode()) > 255:
                raise MessageError("no usable reply_to")
        except MessageError as exc:
            log.warning("rejected a malformed grant request: %s", exc)
            await channel.basic_reject(delivery_tag, requeue=False)
            return
        server = None if self._stopping else self._capacity.pick_server()
        if server is None:
            # Sent before the broker saw our cancel (or the last server turned unhealthy): cancel first,
            # so the requeued message is not pushed straight back to us.
            await self._maybe_pause()
            await channel.basic_nack(delivery_tag, requeue=True)
            return
        lease = self._capacity.grant(server, time.monotonic())
        grant = Grant(lease=lease, url=server.url, api_key=server.api_key, release_to=self.release_queue,
                      vllm_priority=vllm_priority(request.priority, self._config.max_priority,
                                                  self._config.forward_priority))
        fast = self._fast
        assert fast is not None  # `channel is self._channel` above
        try:
            # Written in this loop turn, before the ack below (both below aiormq: common/amqp.py).
            fast.basic_publish(encode(grant), routing_key=reply_to, correlation_id=properties.correlation_id,
                               delivery_mode=1, message_id=lease)
        except BaseException:
            self._capacity.release(lease)
            raise
        self._metrics.grants.labels(server.url).inc()
        log.debug("granted %s on %s (priority %d)", lease, server.url, request.priority)
        # Before the ack: once acked, a prefetch-1 consumer would be sent the next request at once.
        await self._maybe_pause()
        await self._maybe_consume()  # resumes at once when the pause was only to change the prefetch
        fast.basic_ack(delivery_tag)

    async def on_release(self, message: DeliveredMessage) -> None:
        try:
            release = decode_release(message.body)
        except MessageError as exc:
            log.warning("ignored a malformed release: %s", exc)
            return
        async with self._lock:
            freed = False
            for lease in release.leases:
                server = self._capacity.release(lease)
                if server is None:
                    log.debug("release of unknown lease %s ignored (expired or released twice)", lease)
                    continue
                self._metrics.releases.labels(server.url).inc()
                freed = True
            if freed:
                await self._maybe_consume_safely()

    async def update_servers(self, readings: Mapping[str, ServerReading]) -> None:
        """Applies a round of readings (health, speed, reconciliation of slots), forgets leases past the
        safety net, then consumes or pauses: a speed rule that said no is checked again here."""
        async with self._lock:
            now = time.monotonic()
            changed = False
            for url, reading in readings.items():
                ok = reading.healthy and reading.sample is not None
                if self._capacity.set_health(url, ok, now):
                    changed = True
                    if ok:
                        log.info("vLLM %s is healthy again", url)
                    else:
                        log.warning("vLLM %s is unhealthy (%s): no grants to it", url,
                                    "/metrics unreachable or without vLLM's metrics" if reading.healthy
                                    else "/health failed")
                if ok and reading.sample is not None:
                    self._apply_sample(url, reading.sample, reading.read_at)
            if changed and not self._capacity.is_any_healthy():
                log.warning("no healthy vLLM server: not granting; requests wait in the queue")
            for lease, server in self._capacity.expire_leases(now):
                self._metrics.lease_expiries.labels(server.url).inc()
                log.warning("lease %s on %s forgotten after %.0fs without a release", lease, server.url,
                            self._config.lease_timeout_s)
            await self._maybe_consume_safely()

    def _apply_sample(self, url: str, sample: MetricsSample, read_at: float) -> None:
        outcome = self._capacity.record_sample(url, sample, read_at)
        if outcome.counters_reset:
            log.warning("vLLM %s generation counters went down: it restarted; speed measured afresh", url)
        if outcome.gauges_stale != (url in self._stale_gauges):
            if outcome.gauges_stale:
                self._stale_gauges.add(url)
                log.warning("vLLM %s reports %g running, %g waiting, but no output moved for %.0fs: taking its "
                            "gauges as stale (vLLM issue #22545)", url, sample.running, sample.waiting,
                            STALE_GAUGES_S)
            else:
                self._stale_gauges.discard(url)
        if outcome.freed:
            self._metrics.lost_releases.labels(url).inc(len(outcome.freed))
            log.info("freed %d slot(s) on %s: vLLM no longer has their request (release lost)",
                     len(outcome.freed), url)

    # -- gating the model queue's consumer (always under the lock) --

    async def _maybe_consume_safely(self) -> None:
        try:
            await self._maybe_pause()
            await self._maybe_consume()
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError) as exc:
            log.debug("consumer not switched: %s", type(exc).__name__)  # `maintain` sees the loss

    async def _maybe_consume(self) -> None:
        channel = self._channel
        if channel is None or self._consumer_tag is not None or self._stopping or not self._capacity.has_room():
            return
        prefetch = self._wanted_prefetch()
        if prefetch != self._prefetch:
            await channel.basic_qos(prefetch_count=prefetch)
            self._prefetch = prefetch
            log.debug("prefetch %d", prefetch)
        consume_ok = await channel.basic_consume(self._model_queue, self.on_request)
        self._consumer_tag = consume_ok.consumer_tag

    async def _maybe_pause(self) -> None:
        """Cancels the consumer when no server has room, or to change the prefetch."""
        channel = self._channel
        if channel is None or self._consumer_tag is None:
            return
        if self._capacity.has_room() and not self._stopping and self._wanted_prefetch() == self._prefetch:
            return
        consumer_tag, self._consumer_tag = self._consumer_tag, None
        await channel.basic_cancel(consumer_tag)

    def _wanted_prefetch(self) -> int:
        """Several requests in flight to us only while far more would be granted: each one that arrives
        is granted at once, as with prefetch 1, and no broker round trip separates two grants."""
        room = self._capacity.room()
        if room >= PREFETCH_ROOMY_FROM or (self._prefetch > 1 and room >= PREFETCH_ROOMY_UNTIL):
            return PREFETCH_ROOMY
        return 1

    # -- connection lifecycle --

    async def maintain(self) -> None:
        """Connects, and reconnects with back-off (`amqp.reconnect_delay`) for as long as the process runs."""
        while not self._stopping:
            try:
                connection = await amqp.connect(self._config.rabbitmq_url)
            except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
                self._failures += 1
                delay = amqp.reconnect_delay(self._failures)
                log.warning("RabbitMQ unreachable (%s, attempt %d); retrying in %.1fs",
                            type(exc).__name__, self._failures, delay)
                await asyncio.sleep(delay)
                continue
            try:
                await self._serve(connection)
            except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError) as exc:
                log.warning("RabbitMQ connection lost or refused: %s", exc or type(exc).__name__)
            finally:
                served = self._channel is not None
                self._fast = None
                self._consumer_tag = None
                if not connection.aiormq.is_closed:
                    await connection.aiormq.close()
            if not served:  # e.g. a declare refused (406: another consumer declared the queue with other arguments)
                self._failures += 1
            await asyncio.sleep(amqp.reconnect_delay(self._failures))

    async def _serve(self, connection: amqp.Connection) -> None:
        # No publisher confirms: a grant goes through direct reply-to, which is at-most-once, so a
        # broker confirm would not say that the sender got it (the sender's time-out and the
        # reconciliation with vLLM cover a lost grant); waiting for one would only slow every grant.
        fast = await connection.channel(publisher_confirms=False)
        channel = fast.aiormq
        await channel.basic_qos(prefetch_count=1)
        self._prefetch = 1
        await channel.exchange_declare(ANNOUNCE_EXCHANGE, exchange_type="fanout")
        await self._declare_model_queue(channel)
        await channel.queue_declare(self.release_queue, arguments={"x-expires": RELEASE_QUEUE_EXPIRES_MS})
        await channel.basic_consume(self.release_queue, self.on_release, no_ack=True)
        async with self._lock:
            self._fast = fast
            self._consumer_tag = None
            await self._maybe_consume()
        self._failures = 0
        self._ever_connected = True
        log.info("connected to RabbitMQ: serving %s, releases on %s", self._model_queue, self.release_queue)
        ticker = asyncio.create_task(self._tick_while_connected(channel))
        try:
            await amqp.wait_closed(connection.aiormq, channel)
        finally:
            await cancel_and_wait(ticker)

    async def _declare_model_queue(self, channel: AbstractChannel) -> None:
        await channel.queue_declare(self._model_queue, arguments={
            "x-max-priority": self._config.max_queue_priority, "x-expires": self._config.rpc_queue_expiration_ms})

    async def _tick_while_connected(self, channel: AbstractChannel) -> None:
        """Every ANNOUNCE_INTERVAL_S (or a third of the queue's expiration, if shorter): redeclare the
        model queue, and announce the model. x-expires deletes a queue without consumers, with the
        requests in it, and while every slot is in use we have no consumer on it by design; a redeclare
        renews its lease (RabbitMQ docs, ttl.md "Queue TTL"). So the queue lives while a consumer
        process does, and expires RPC_QUEUE_EXPIRATION after the last one has gone."""
        interval_s = min(ANNOUNCE_INTERVAL_S, self._config.rpc_queue_expiration_ms / 1000 / 3)
        while True:
            try:
                await self._declare_model_queue(channel)
                if self.card is None:
                    self.card = await self._fetch_card()
                if self.card is not None:
                    await self._announce(channel, alive=True)
            except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError,
                    ConnectionError) as exc:
                log.debug("tick not sent: %s", type(exc).__name__)
                return  # the channel is closing; `maintain` takes over
            await asyncio.sleep(interval_s)

    async def _announce(self, channel: AbstractChannel, *, alive: bool) -> None:
        slots = sum(server.max_parallel for server in self._capacity.servers if server.healthy)
        announcement = Announcement(model=self._config.model, consumer=self._consumer_id, card=self.card or {},
                                    alive=alive, slots=slots, queue=self._model_queue,
                                    levels=self._config.fair_share_levels)
        # An announcement older than its TTL is worthless: let the broker drop it rather than deliver it late.
        await channel.basic_publish(encode(announcement), exchange=ANNOUNCE_EXCHANGE, properties=spec.Basic.Properties(
            delivery_mode=1, expiration=str(int(ANNOUNCE_TTL_S * 1000))))

    async def shut_down(self) -> None:
        """Stops consuming, says goodbye, deletes the release queue; then `maintain` may be cancelled,
        and closing the connection returns any unacked request to the queue."""
        async with self._lock:
            self._stopping = True
            channel = self._channel
            if channel is None:
                return
            try:
                async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                    await self._maybe_pause()
                    if self.card is not None:
                        await self._announce(channel, alive=False)
                    await channel.queue_delete(self.release_queue)
            except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError,
                    TimeoutError) as exc:
                log.warning("shutdown: could not say goodbye to RabbitMQ: %s", type(exc).__name__)


async def watch_servers(vllm: VllmClient, capacity: Capacity, dispatcher: Dispatcher, interval_s: float) -> None:
    """Every METRICS_REFRESH_SECONDS: each server's health and load, in parallel; then the decisions."""
    while True:
        started = time.monotonic()
        readings = await asyncio.gather(*(vllm.read(server) for server in capacity.servers))
        await dispatcher.update_servers({server.url: reading for server, reading in zip(capacity.servers, readings)})
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))


# ---------------------------------------------------------------------------------------------
# Probes: /health, /ready, /metrics on PROBE_PORT (h11 server side)

def probe_response(method: bytes, target: bytes, is_ready: Callable[[], bool],
                   registry: prom.CollectorRegistry) -> tuple[int, bytes, bytes]:
    """The whole probe surface: (status, content type, body) for one request."""
    path = target.split(b"?", 1)[0]
    if path not in (b"/health", b"/ready", b"/metrics"):
        return 404, JSON_CONTENT_TYPE, b'{"error":"not found"}'
    if method != b"GET":
        return 405, JSON_CONTENT_TYPE, b'{"error":"method not allowed"}'
    if path == b"/health":
        return 200, JSON_CONTENT_TYPE, b'{"status":"ok"}'
    if path == b"/ready":
        if is_ready():
            return 200, JSON_CONTENT_TYPE, b'{"status":"ready"}'
        return 503, JSON_CONTENT_TYPE, b'{"status":"not ready"}'
    return 200, prom.CONTENT_TYPE_LATEST.encode(), prom.generate_latest(registry)


async def serve_probe_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                 is_ready: Callable[[], bool], registry: prom.CollectorRegistry) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=PROBE_MAX_REQUEST_BYTES)
    request: h11.Request | None = None
    try:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(PROBE_IDLE_TIMEOUT_S):
                    connection.receive_data(await reader.read(READ_CHUNK_BYTES))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                status, content_type, body = probe_response(request.method, request.target, is_ready, registry)
                headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
                writer.write(connection.send(h11.Response(status_code=status, headers=headers))
                             + connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage()))
                await writer.drain()
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
                request = None
            elif isinstance(event, h11.ConnectionClosed):
                return
            # h11.Data: a probe request has no body worth reading; it is dropped as it comes.
    except h11.RemoteProtocolError as exc:
        if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            writer.write(connection.send(h11.Response(status_code=exc.error_status_hint,
                                                      headers=[(b"content-length", b"0"), (b"connection", b"close")])))
    except (OSError, TimeoutError, h11.LocalProtocolError):
        pass
    finally:
        writer.close()


async def start_probe_server(port: int, is_ready: Callable[[], bool],
                             registry: prom.CollectorRegistry) -> asyncio.Server:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_probe_connection(reader, writer, is_ready, registry)

    return await asyncio.start_server(on_connect, "0.0.0.0", port, limit=READ_CHUNK_BYTES)


# ---------------------------------------------------------------------------------------------
# Start-up and shutdown

class StartupError(Exception):
    """The consumer cannot start (no vLLM server ever came up); exit status 1."""


async def run(config: Config) -> None:
    consumer_id = new_consumer_id()
    registry = prom.CollectorRegistry()
    capacity = Capacity(
        config.servers, config.lease_timeout_s, lease_prefix=f"{consumer_id}.",
        min_speed=config.min_tokens_per_second_per_user, burst=config.burst_grants,
        lease_grace_s=max(LEASE_GRACE_MIN_S, LEASE_GRACE_REFRESHES * config.metrics_refresh_s),
        rate_window_readings=1 + math.ceil(RATE_WINDOW_S / config.metrics_refresh_s - 1e-9))
    metrics = Metrics.create(registry, capacity)
    vllm = VllmClient()
    dispatcher = Dispatcher(config, consumer_id, capacity, metrics,
                            fetch_card=lambda: fetch_model_card(vllm, capacity, config.model))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async with AsyncExitStack() as stack:
        probe = await start_probe_server(
            config.probe_port, lambda: dispatcher.is_ready() and capacity.is_any_healthy(), registry)
        # Not `wait_closed`: since Python 3.12 it also waits for idle keep-alive scrapers to leave.
        stack.callback(probe.close)
        log.info("consumer %s for model %s: probes on port %d, %d vLLM server(s)", consumer_id, config.model,
                 probe.sockets[0].getsockname()[1], len(capacity.servers))

        waiting = asyncio.create_task(wait_for_vllm(vllm, capacity, config.max_vllm_connection_attempts))
        stack.push_async_callback(cancel_and_wait, waiting)
        stopping = asyncio.create_task(stop.wait())
        stack.push_async_callback(cancel_and_wait, stopping)
        await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            return
        if not waiting.result():
            raise StartupError(f"no vLLM server answered GET /health with 200 after "
                               f"{config.max_vllm_connection_attempts} attempts: "
                               f"{', '.join(server.url for server in capacity.servers)}")
        dispatcher.card = await fetch_model_card(vllm, capacity, config.model)

        maintainer = asyncio.create_task(dispatcher.maintain())
        stack.push_async_callback(cancel_and_wait, maintainer)
        watcher = asyncio.create_task(watch_servers(vllm, capacity, dispatcher, config.metrics_refresh_s))
        stack.push_async_callback(cancel_and_wait, watcher)

        done, _ = await asyncio.wait([stopping, maintainer, watcher], return_when=asyncio.FIRST_COMPLETED)
        log.info("shutting down with %d slot(s) in use", sum(server.in_flight for server in capacity.servers))
        await dispatcher.shut_down()
        for task in done - {stopping}:
            task.result()  # a background task that ended on its own has crashed: surface it


def main() -> None:
    try:
        config = Config.from_env(os.environ)
    except ConfigError as exc:
        print(f"consumer: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    setup_logging(config.log_level)
    try:
        uvloop.run(run(config))
    except StartupError as exc:
        print(f"consumer: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
