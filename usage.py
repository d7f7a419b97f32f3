"""Usage accounting: what each token used, per model and hour (UTC), counted in memory and written in batches.

The sender feeds each response it relays from vLLM through a `UsageMeter` (cheap byte searches per
read, a stream's chunk framing included: no JSON parse per chunk, no copy of the body) and, when
the request has ended, hands the meter's counts to `UsageRecorder.record`, which only adds to
dicts. `UsageWriter` flushes the totals to the database every USAGE_FLUSH_SECONDS and at
shutdown; nothing on the request path waits for the database.

Counting (DESIGN.md, "Usage accounting"):
- vLLM's `usage` object when the response carries one: a non-streamed body, or in a stream the
  last one relayed (with `stream_options.include_usage`, or `--enable-force-include-usage`, where
  every chunk carries the cumulative usage: the last counts, never a sum). Exact.
- Otherwise, in a stream, one completion token per non-empty content delta, prompt 0: estimated.
  vLLM may merge several tokens into one delta (a slow client, `--stream-interval`), so the
  estimate is a lower bound.
- Anything else (e.g. `/tokenize`, an error): a request with 0 tokens.

A database outage delays the writes: the batch whose write failed is kept as it was (it is written
again under its id, and the database adds each id once), and what came since is kept, merged, up
to `max_pending` (token, model, hour) entries; a request that would need a new entry beyond that
is dropped, counted in `dispatcher_usage_dropped_total` and logged once per outage.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Protocol

import orjson

log = logging.getLogger("usage")

USAGE_KEY = b'"usage":'
USAGE_TEXT_MAX_BYTES = 1024         # a usage object is ~150 bytes; what follows it is kept up to this
CONTENT_DELTA = (b'"content":"', b'"text":"')   # chat and completions deltas; the empty ones are not tokens
EMPTY_DELTA = (b'"content":""', b'"text":""')
CHUNK_FRAMING = re.compile(rb"\r\n[0-9A-Fa-f]{1,16}(?:;[^\r\n]*)?\r\n")  # the end of one chunk, the start of the next
TAIL_BYTES = max(map(len, (USAGE_KEY, *EMPTY_DELTA))) - 1   # what of a piece a marker cut by a read may hold
MAX_PENDING_ENTRIES = 100_000       # (token, model, hour) totals kept while the database is away
MEMORY_DAYS = 366                   # without a database, totals older than this are forgotten
WRITE_TIMEOUT_S = 10.0              # one batch; a database that does not answer is an outage
FINAL_FLUSH_TIMEOUT_S = 5.0
SECONDS_PER_HOUR = 3600


# ---------------------------------------------------------------------------------------------
# One response: what it used

class UsageMeter:
    """Watches one relayed response for its usage, fed the bytes as relayed, in any pieces.

    Per piece: a few `bytes.count` calls (streams only) and one `rfind`, plus the same on the few
    bytes around the cut from the piece before, so that a marker cut by a read still counts once;
    the usage object found last is remembered by reference (no copy) and parsed once, in `counts()`.
    """

    __slots__ = ("streamed", "deltas", "_usage_event", "_usage_at", "_usage_rest", "_tail")

    def __init__(self) -> None:
        self.streamed = False
        self.deltas = 0                     # non-empty content deltas relayed (streams)
        self._usage_event: bytes = b""      # the last piece holding (the value of) `"usage":`
        self._usage_at = -1                 # where the value starts in it
        self._usage_rest = b""              # what followed it, for an object split over two pieces
        self._tail = b""                    # the end of the piece before: markers across the cut

    def start(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """The response head: a `text/event-stream` is a stream."""
        for name, value in headers:
            if name == b"content-type":
                self.streamed = value[:17].lower() == b"text/event-stream"

    def feed(self, data: bytes) -> None:
        tail = self._tail
        if self.streamed:
            for marker, empty in zip(CONTENT_DELTA, EMPTY_DELTA):
                found = data.count(marker)
                if found:
                    self.deltas += found - data.count(empty)
                if tail:  # only an occurrence that straddles the cut fits in these joins
                    self.deltas += ((tail[-len(marker) + 1:] + data[:len(marker) - 1]).count(marker)
                                    - (tail[-len(empty) + 1:] + data[:len(empty) - 1]).count(empty))
        # Inside a JSON string a quote is escaped, so `"usage":` is always a key, never content.
        at = data.rfind(USAGE_KEY)
        if at != -1:
            self._usage_event, self._usage_at, self._usage_rest = data, at + len(USAGE_KEY), b""
        elif tail and (across := (tail[-len(USAGE_KEY) + 1:] + data[:len(USAGE_KEY) - 1]).find(USAGE_KEY)) != -1:
            self._usage_event, self._usage_at, self._usage_rest = data, across + 1, b""
        elif self._usage_at != -1 and len(self._usage_rest) < USAGE_TEXT_MAX_BYTES:
            self._usage_rest += data[:USAGE_TEXT_MAX_BYTES]
        self._tail = data[-TAIL_BYTES:] if len(data) >= TAIL_BYTES else (tail + data)[-TAIL_BYTES:]

    def usage(self) -> tuple[int, int] | None:
        """(prompt_tokens, completion_tokens) of the last usage object relayed, if there was one."""
        if self._usage_at == -1:
            return None
        text = bytes(self._usage_event[self._usage_at:self._usage_at + USAGE_TEXT_MAX_BYTES]) + self._usage_rest
        if b"\r\n" in text:  # JSON holds no raw CRLF: an HTTP chunk's framing cut the object (vLLM never does)
            text = CHUNK_FRAMING.sub(b"", text)
        return parse_usage(text)

    def counts(self) -> tuple[int, int, bool]:
        """(prompt_tokens, completion_tokens, exact) to charge for what was relayed."""
        usage = self.usage()
        if usage is not None:
            return usage[0], usage[1], True
        if self.streamed:
            return 0, max(self.deltas, 0), False
        return 0, 0, True


def parse_usage(text: bytes) -> tuple[int, int] | None:
    """The counts of the JSON object at the start of `text` (after `"usage":`); None for `null`,
    a cut-off object or anything that is not a usage."""
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] != b"{":
        return None
    depth, at = 0, start  # a usage holds numbers, null and flat objects: no braces in strings
    while True:
        end = text.find(b"}", at)
        if end == -1:
            return None
        depth += text.count(b"{", at, end) - 1
        if depth == 0:
            break
        at = end + 1
    try:
        usage = orjson.loads(text[start:end + 1])
    except orjson.JSONDecodeError:
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens") or 0
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        return None
    return prompt, completion


# ---------------------------------------------------------------------------------------------
# Totals in memory

@dataclass(slots=True)
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_requests: int = 0

    def add(self, other: Totals) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.estimated_requests += other.estimated_requests


UsageKey = tuple[str, str, datetime]   # token name, model, hour (UTC)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """A token's totals for one model and UTC day, as `/v1/usage` and `admin.py usage` show them."""
    token: str
    model: str
    date: date
    requests: int
    prompt_tokens: int
    completion_tokens: int
    estimated_requests: int

    def as_dict(self, with_token: bool = True) -> dict[str, Any]:
        row = {"token": self.token} if with_token else {}
        return {**row, "model": self.model, "date": self.date.isoformat(), "requests": self.requests,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "estimated_requests": self.estimated_requests}


def hour_of(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp - timestamp % SECONDS_PER_HOUR, timezone.utc)


def first_day(days: int, now: float | None = None) -> datetime:
    """Midnight UTC of the first of the last `days` days, today included."""
    today = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc).date()
    return datetime.combine(today - timedelta(days=days - 1), datetime.min.time(), timezone.utc)


def daily_rows(totals: Iterable[tuple[UsageKey, Totals]]) -> list[UsageRow]:
    """Hourly totals summed per token, model and UTC day, in order of day, token, model."""
    days: dict[tuple[str, str, date], Totals] = {}
    for (token, model, hour), counts in totals:
        days.setdefault((token, model, hour.date()), Totals()).add(counts)
    return [UsageRow(token, model, day, t.requests, t.prompt_tokens, t.completion_tokens, t.estimated_requests)
            for (token, model, day), t in sorted(days.items(), key=lambda item: (item[0][2], item[0][0], item[0][1]))]


class UsageRecorder:
    """The totals of this sender, per (token, model, hour): `pending` until written, and, without a
    database, `memory` (everything since start, the last MEMORY_DAYS)."""

    def __init__(self, *, keep_memory: bool, max_pending: int = MAX_PENDING_ENTRIES,
                 on_tokens: Callable[[str, str, int, int], None] = lambda token, model, prompt, completion: None,
                 on_dropped: Callable[[int], None] = lambda requests: None) -> None:
        self.pending: dict[UsageKey, Totals] = {}
        self.memory: dict[UsageKey, Totals] | None = {} if keep_memory else None
        self.max_pending = max_pending
        self._on_tokens = on_tokens
        self._on_dropped = on_dropped
        self._dropping = False  # logged once per episode of a full buffer
        self._hour = (-float(SECONDS_PER_HOUR), hour_of(0))  # (start, as a datetime) of the hour last recorded in

    def record(self, token: str, model: str, prompt_tokens: int, completion_tokens: int, exact: bool,
               now: float | None = None) -> None:
        """One request's counts: dict additions only (the request path calls this)."""
        counts = Totals(1, prompt_tokens, completion_tokens, 0 if exact else 1)
        now = time.time() if now is None else now
        if not 0 <= now - self._hour[0] < SECONDS_PER_HOUR:  # a datetime once an hour, not once a request
            self._hour = (now - now % SECONDS_PER_HOUR, hour_of(now))
        key = (token, model, self._hour[1])
        self._on_tokens(token, model, prompt_tokens, completion_tokens)
        if self.memory is not None:
            self.memory.setdefault(key, Totals()).add(counts)
            return
        self._merge({key: counts})

    def take(self) -> dict[UsageKey, Totals]:
        """The totals not yet written; they are this caller's now."""
        batch, self.pending = self.pending, {}
        return batch

    def _merge(self, batch: dict[UsageKey, Totals]) -> None:
        dropped = 0
        for key, counts in batch.items():
            totals = self.pending.get(key)
            if totals is None:
                if len(self.pending) >= self.max_pending:
                    dropped += counts.requests
                    continue
                totals = self.pending[key] = Totals()
            totals.add(counts)
        if dropped:
            self.count_dropped(dropped)
            if not self._dropping:
                log.error("usage buffer full (%d entries, the database is not taking writes): usage of %d "
                          "requests dropped; dispatcher_usage_dropped_total counts all that follow", self.max_pending,
                          dropped)
            self._dropping = True
        elif len(self.pending) < self.max_pending:
            self._dropping = False

    def count_dropped(self, requests: int) -> None:
        self._on_dropped(requests)

    def memory_rows(self, token: str, since: datetime) -> list[UsageRow]:
        """Without a database: this sender's totals of `token` since `since`, per model and day."""
        memory = self.memory or {}
        oldest = since - timedelta(days=MEMORY_DAYS)
        for key in [key for key in memory if key[2] < oldest]:  # forgotten as the sender asks, not per request
            del memory[key]
        return daily_rows((key, totals) for key, totals in memory.items() if key[0] == token and key[2] >= since)


# ---------------------------------------------------------------------------------------------
# The writer: totals to the database, in batches

class UsageDatabase(Protocol):
    async def add_usage(self, batch_id: str, batch: dict[UsageKey, Totals]) -> bool: ...


class UsageWriter:
    """Flushes the recorder's totals every `interval_s`, and a last time at `close()`.

    `database()` is the database now, or None while it is not connected yet. Each batch has an id
    of its own; the database adds a batch once, whatever number of times it is written. A batch
    whose write failed is kept as it is and written again, under its id, before anything newer:
    the failure may have come after the database committed it (the answer to the commit lost),
    and then the retry must not add it a second time.
    """

    def __init__(self, recorder: UsageRecorder, database: Callable[[], UsageDatabase | None], interval_s: float,
                 is_failure: Callable[[BaseException], bool]) -> None:
        self.recorder = recorder
        self.database = database
        self.interval_s = interval_s
        self.is_failure = is_failure
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._batch_ids = (f"{uuid.uuid4().hex}-{number}" for number in itertools.count(1))
        self._unanswered: tuple[str, dict[UsageKey, Totals]] | None = None  # a batch whose write failed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> bool:
        """Writes the batch whose write failed, if any, then what is pending; False when a write failed
        (what it held is kept for the next)."""
        database = self.database()
        if self._unanswered is None and not self.recorder.pending:
            return True
        if database is None:
            self._report_failure("not connected")
            return False
        for _ in range(2):  # the batch written again, then the new one
            if self._unanswered is None:
                if not self.recorder.pending:
                    break
                self._unanswered = (next(self._batch_ids), self.recorder.take())
            batch_id, batch = self._unanswered
            try:
                async with asyncio.timeout(WRITE_TIMEOUT_S):
                    added = await database.add_usage(batch_id, batch)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError) or not self.is_failure(exc):
                    raise
                self._report_failure(str(exc) or type(exc).__name__)
                return False
            self._unanswered = None
            if not added:
                log.warning("usage batch %s had been written already (the answer to its commit was lost): "
                            "not added again", batch_id)
        if self._failing:
            log.info("usage totals written again")
            self._failing = False
        return True

    def _report_failure(self, reason: str) -> None:
        if not self._failing:
            log.warning("usage totals not written (%s): kept in memory (up to %d entries) and retried every %g s",
                        reason, self.recorder.max_pending, self.interval_s)
        self._failing = True

    async def close(self) -> None:
        """Stops the timer and writes what is left, for FINAL_FLUSH_TIMEOUT_S at most."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        written = True
        try:
            async with asyncio.timeout(FINAL_FLUSH_TIMEOUT_S):
                while written and (self._unanswered or self.recorder.pending):
                    written = await self.flush()
        except TimeoutError:
            written = False
        if not written and (self.recorder.pending or self._unanswered):
            lost = sum(totals.requests for batch in (self.recorder.pending, (self._unanswered or ("", {}))[1])
                       for totals in batch.values())
            log.error("usage of %d requests could not be written at shutdown and is lost", lost)
            self.recorder.count_dropped(lost)
