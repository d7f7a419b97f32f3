"""Usage accounting without I/O: what a relayed response is charged, and the totals kept until written."""

from __future__ import annotations

from datetime import datetime, timezone

import hypothesis
import orjson
import pytest
from hypothesis import strategies as st

from usage import Totals, UsageMeter, UsageRecorder, UsageWriter, daily_rows, parse_usage

SSE = [(b"content-type", b"text/event-stream")]
JSON = [(b"content-type", b"application/json")]
HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
USAGE = {"prompt_tokens": 7, "total_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": None}


def event(payload: dict | str) -> bytes:
    return b"data: " + (payload.encode() if isinstance(payload, str) else orjson.dumps(payload)) + b"\n\n"


def delta(content: str | None, **extra: object) -> bytes:
    body = {"role": "assistant", "content": ""} if content is None else {"content": content}
    return event({**HEAD, "choices": [{"index": 0, "delta": body, "finish_reason": None}], **extra})


DONE = b"data: [DONE]\n\n"
STREAM = [delta(None), delta("Hel"), delta("lo"), delta("!")]


def meter_of(headers: list[tuple[bytes, bytes]], events: list[bytes]) -> UsageMeter:
    meter = UsageMeter()
    meter.start(headers)
    for data in events:
        meter.feed(data)
    return meter


@pytest.mark.parametrize(("headers", "events", "expected"), [
    (JSON, [orjson.dumps({"id": "x", "choices": [{"message": {"content": "hi"}}], "usage": USAGE})], (7, 3, True)),
    (JSON, [b'{"id": "x", "usage": {"prompt_tokens": 5, "completion_tokens": 2}, "prompt_logprobs": null}'],
     (5, 2, True)),
    (JSON, [orjson.dumps({"tokens": [1, 2, 3], "count": 3})], (0, 0, True)),
    (JSON, [orjson.dumps({"error": {"message": "bad", "type": "BadRequestError", "code": 400}})], (0, 0, True)),
    (JSON, [orjson.dumps({"object": "list", "data": [], "usage": {"prompt_tokens": 4, "total_tokens": 4}})],
     (4, 0, True)),
    (SSE, [*STREAM, DONE], (0, 3, False)),
    (SSE, [*STREAM, event({**HEAD, "choices": [], "usage": USAGE}), DONE], (7, 3, True)),
    (SSE, [delta("a", usage={**USAGE, "completion_tokens": 1}), delta("b", usage={**USAGE, "completion_tokens": 2}),
           event({**HEAD, "choices": [], "usage": {**USAGE, "completion_tokens": 2}}), DONE], (7, 2, True)),
    (SSE, [delta(None) + delta("one") + delta("two") + delta("") + DONE], (0, 2, False)),
    (SSE, [delta("several tokens merged in one delta by vLLM"), DONE], (0, 1, False)),
    (SSE, [delta("a"), delta("b", usage=None), DONE], (0, 2, False)),
    (SSE, [event({"id": "cmpl-1", "choices": [{"index": 0, "text": "x"}]}),
           event({"id": "cmpl-1", "choices": [{"index": 0, "text": ""}]}), DONE], (0, 1, False)),
    (SSE, [delta('He wrote "usage":{"prompt_tokens":99} in the content'), DONE], (0, 1, False)),
], ids=["non-streamed", "non-streamed-spaces", "tokenize", "error", "embeddings", "stream-without-usage",
        "stream-include-usage", "stream-forced-usage-last-counts", "several-events-one-read",
        "merged-tokens-count-one", "usage-null", "completions-text", "usage-inside-content"])
def test_meter_charges(headers, events, expected) -> None:
    assert meter_of(headers, events).counts() == expected


def test_meter_finds_a_usage_split_over_two_events() -> None:
    """A read of vLLM's output can end inside the usage chunk: the object is completed from the next event."""
    whole = event({**HEAD, "choices": [], "usage": USAGE})
    cut = whole.index(b'"completion_tokens"')
    assert meter_of(SSE, [*STREAM, whole[:cut], whole[cut:], DONE]).counts() == (7, 3, True)


@pytest.mark.parametrize("marker", [b'"usage":', b'"content":"', b'"content":""'])
def test_meter_counts_a_marker_cut_by_a_read(marker) -> None:
    """A read can end inside `"usage":` or a content delta's key: the count is the same as unsplit."""
    whole = b"".join([*STREAM, delta(""), event({**HEAD, "choices": [], "usage": USAGE}), DONE])
    at = whole.index(marker)
    for cut in range(at + 1, at + len(marker)):
        meter = meter_of(SSE, [whole[:cut], whole[cut:]])
        assert (meter.counts(), meter.deltas) == ((7, 3, True), 3), cut
    if marker != b'"usage":':  # without a usage, the estimate counts the same
        stream = b"".join([*STREAM, delta(""), DONE])
        at = stream.index(marker)
        for cut in range(at + 1, at + len(marker)):
            assert meter_of(SSE, [stream[:cut], stream[cut:]]).counts() == (0, 3, False), cut


@hypothesis.settings(max_examples=200, derandomize=True, deadline=None, database=None)
@hypothesis.given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12), forced=st.booleans())
def test_meter_counts_the_same_however_the_reads_fall(cuts, forced) -> None:
    """What a stream is charged does not depend on where vLLM's bytes were split into reads."""
    usage = {"usage": {**USAGE, "completion_tokens": 1}} if forced else {}
    parts = [delta(None), *(delta(text, **usage) for text in ("a", "", "b", "c")),
             event({**HEAD, "choices": [], "usage": USAGE}) if forced else b"", DONE]
    whole = b"".join(parts)
    bounds = sorted({0, len(whole), *(cut % (len(whole) + 1) for cut in cuts)})
    reads = [whole[start:end] for start, end in zip(bounds, bounds[1:])]
    assert meter_of(SSE, reads).counts() == meter_of(SSE, [whole]).counts() == ((7, 3, True) if forced else (0, 3, False))


def test_meter_charges_a_departed_client_what_was_relayed() -> None:
    meter = meter_of(SSE, [delta(None), delta("a", usage={**USAGE, "completion_tokens": 1}),
                           delta("b", usage={**USAGE, "completion_tokens": 2})])
    assert meter.counts() == (7, 2, True)
    assert meter_of(SSE, STREAM[:2]).counts() == (0, 1, False)


@pytest.mark.parametrize(("text", "expected"), [
    (b'{"prompt_tokens":1,"completion_tokens":2}}\n\n', (1, 2)),
    (b' {"prompt_tokens":1,"total_tokens":1,"prompt_tokens_details":{"cached_tokens":0}}', (1, 0)),
    (b"null,", None),
    (b'{"prompt_tokens":1,"completion_tok', None),
    (b'{"prompt_tokens":"1","completion_tokens":2}', None),
    (b'{"prompt_tokens":-1,"completion_tokens":2}', None),
    (b'{"completion_tokens":2}', None),
    (b"{]}", None),
], ids=["compact", "nested-details", "null", "cut-off", "string", "negative", "no-prompt", "not-json"])
def test_parse_usage(text, expected) -> None:
    assert parse_usage(text) == expected


AT = datetime(2026, 3, 1, 10, 30, tzinfo=timezone.utc).timestamp()


def test_recorder_adds_per_token_model_and_hour() -> None:
    counted: list[tuple[str, str, int, int]] = []
    recorder = UsageRecorder(keep_memory=False, on_tokens=lambda *args: counted.append(args))
    recorder.record("alice", "m", 5, 3, True, now=AT)
    recorder.record("alice", "m", 1, 2, False, now=AT + 60)
    recorder.record("alice", "m", 1, 1, True, now=AT + 3600)
    recorder.record("bob", "m", 2, 2, True, now=AT)
    hour = datetime(2026, 3, 1, 10, tzinfo=timezone.utc)
    assert recorder.take() == {("alice", "m", hour): Totals(2, 6, 5, 1),
                               ("alice", "m", hour.replace(hour=11)): Totals(1, 1, 1, 0),
                               ("bob", "m", hour): Totals(1, 2, 2, 0)}
    assert recorder.pending == {}
    assert counted[0] == ("alice", "m", 5, 3)


def test_recorder_drops_beyond_its_bound_and_logs_once(caplog) -> None:
    dropped: list[int] = []
    recorder = UsageRecorder(keep_memory=False, max_pending=2, on_dropped=dropped.append)
    recorder.record("alice", "m", 1, 1, True, now=AT)
    recorder.record("bob", "m", 1, 1, True, now=AT)
    recorder.record("carol", "m", 1, 1, True, now=AT)       # a third entry: no room
    recorder.record("carol", "m", 1, 1, True, now=AT)
    recorder.record("alice", "m", 1, 1, True, now=AT)       # an entry that is there takes more
    assert sorted((key[0], totals.requests) for key, totals in recorder.pending.items()) == [("alice", 2), ("bob", 1)]
    assert dropped == [1, 1]
    assert len([record for record in caplog.records if "usage buffer full" in record.getMessage()]) == 1


def test_memory_rows_are_the_callers_per_day() -> None:
    recorder = UsageRecorder(keep_memory=True)
    recorder.record("alice", "m", 5, 3, True, now=AT)
    recorder.record("alice", "m", 1, 1, False, now=AT + 3600)
    recorder.record("alice", "m", 1, 1, True, now=AT + 86400)
    recorder.record("bob", "m", 9, 9, True, now=AT)
    rows = [row.as_dict(with_token=False) for row in recorder.memory_rows("alice", datetime(2026, 3, 1, tzinfo=timezone.utc))]
    assert rows == [{"model": "m", "date": "2026-03-01", "requests": 2, "prompt_tokens": 6, "completion_tokens": 4,
                     "estimated_requests": 1},
                    {"model": "m", "date": "2026-03-02", "requests": 1, "prompt_tokens": 1, "completion_tokens": 1,
                     "estimated_requests": 0}]
    assert recorder.memory_rows("alice", datetime(2026, 3, 2, tzinfo=timezone.utc))[0].requests == 1
    assert recorder.pending == {}


def test_daily_rows_order_by_day_token_model() -> None:
    hour = datetime(2026, 3, 1, 23, tzinfo=timezone.utc)
    rows = daily_rows([(("b", "m", hour), Totals(1)), (("a", "m", hour.replace(day=2, hour=0)), Totals(1)),
                       (("a", "m", hour), Totals(1)), (("a", "m", hour.replace(hour=0)), Totals(2))])
    assert [(row.token, row.date.day, row.requests) for row in rows] == [("a", 1, 3), ("b", 1, 1), ("a", 2, 1)]


class FlakyDatabase:
    """Adds each batch id once, as the real ones do; `up`, and whether the answer to a commit is lost."""

    def __init__(self) -> None:
        self.up = False
        self.answer_lost = False
        self.written: dict[str, dict] = {}

    async def add_usage(self, batch_id, batch) -> bool:
        if not self.up:
            raise ConnectionError("down")
        added = batch_id not in self.written
        self.written.setdefault(batch_id, dict(batch))
        if self.answer_lost:
            self.answer_lost = False
            raise ConnectionError("connection lost during COMMIT")
        return added

    def requests(self) -> list[int]:
        return [totals.requests for batch in self.written.values() for totals in batch.values()]


def writer_of(database: FlakyDatabase) -> tuple[UsageRecorder, UsageWriter]:
    recorder = UsageRecorder(keep_memory=False)
    return recorder, UsageWriter(recorder, lambda: database, 10, is_failure=lambda exc: isinstance(exc, ConnectionError))


async def test_writer_retries_until_the_database_takes_the_batch() -> None:
    database = FlakyDatabase()
    recorder, writer = writer_of(database)
    recorder.record("alice", "m", 1, 1, True, now=AT)
    assert await writer.flush() is False
    recorder.record("alice", "m", 1, 1, True, now=AT)      # a batch of its own: the failed one is kept as it was
    database.up = True
    await writer.close()
    assert database.requests() == [1, 1]
    assert recorder.pending == {}


async def test_writer_writes_a_batch_again_under_its_id(caplog) -> None:
    """The commit went through but its answer was lost: the same batch, the same id, added once."""
    database = FlakyDatabase()
    database.up = database.answer_lost = True
    recorder, writer = writer_of(database)
    recorder.record("alice", "m", 1, 1, True, now=AT)
    assert await writer.flush() is False
    recorder.record("alice", "m", 1, 1, True, now=AT)
    assert await writer.flush() is True
    assert database.requests() == [1, 1] and len(database.written) == 2
    assert "had been written already" in caplog.text


async def test_writer_waits_for_a_first_connection() -> None:
    recorder = UsageRecorder(keep_memory=False)
    writer = UsageWriter(recorder, lambda: None, 10, is_failure=lambda exc: False)
    recorder.record("alice", "m", 1, 1, True, now=AT)
    assert await writer.flush() is False
    assert len(recorder.pending) == 1
