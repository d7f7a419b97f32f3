"""Property-based fuzz of the sender's HTTP surface: whatever bytes a client sends.

One example is one client connection. Its bytes are a few requests drawn from a grammar of
HTTP/1.1 (authenticated or not, JSON or not, framed by Content-Length or chunked, GET and HEAD
on the sender's own routes), each possibly mutated: bad request lines, NULs, bare LF, obs-fold,
duplicate and conflicting headers, Content-Length with Transfer-Encoding, unsupported codings,
bad chunk sizes, bodies longer or shorter than announced, huge headers, garbage, a flood behind a
request that vLLM is still answering. They are sent in random segments, possibly cut short, then
the client half-closes and reads until the sender closes. Checked, for every example:

1. the client receives only well-formed HTTP/1.1 responses; a 5xx is vLLM's own (relayed) or the
   501 of an unsupported Transfer-Encoding; every other error is an OpenAI envelope; nothing
   follows a `Connection: close` answer, and the connection is never reset under the answers;
2. vLLM receives only complete requests that came before the first framing error, each once, in
   order, with the client's body byte for byte and framed by a Content-Length of ours;
3. nothing is logged at ERROR and no traceback; every grant is released, every connection ends;
4. the memory allocated while the connection is served peaks under MEMORY_BOUND_BYTES, however
   many bytes the client sends.

The run is seeded and sized for CI; `--fuzz-examples=N` runs longer, from a new seed each time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import tracemalloc
from dataclasses import dataclass, field, replace

import h11
import uvloop
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.helpers import async_wait_until
from tests.proxy.conftest import MODEL, Proxy, start_sender, stop_sender

INVALID = b"\x01"                  # never part of a request line: what follows a framing error is an error too
MARK = b"@@@@@@@@"                 # in each request's target, replaced by a number unique to the run
MAX_BODY_BYTES = 64 * 1024         # the sender's body limit in this test: bodies stay small, memory too
MEMORY_BOUND_BYTES = 1536 * 1024   # what serving one connection may allocate at its peak (measured: under 900 KiB)
FLOOD_BYTES = (3 * 1024 * 1024, 6 * 1024 * 1024)  # well above the bound: kept, they would break it
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
EXCHANGE_TIMEOUT_S = 15.0          # a deadline for the sender to answer and close, never waited out normally


# ---------------------------------------------------------------------------------------------
# The grammar: a request as parts, mutations of those parts, and the bytes they make

@dataclass(frozen=True)
class Draft:
    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes = b""
    chunks: tuple[bytes, ...] | None = None      # chunked framing (else Content-Length, added by the grammar)
    size_lines: tuple[bytes, ...] | None = None  # the chunk-size lines, when a mutation changes them
    chunk_end: bytes = b"\r\n"
    version: bytes = b"1.1"
    request_line: bytes | None = None
    eol: bytes = b"\r\n"
    tail: bytes = b""

    def render(self) -> tuple[bytes, int]:
        """The bytes, and the length of the head in them (the request proper ends before `tail`)."""
        line = self.request_line if self.request_line is not None else (
            self.method + b" " + self.target + b" HTTP/" + self.version)
        head = line + self.eol + b"".join(name + b": " + value + self.eol for name, value in self.headers) + self.eol
        if self.chunks is None:
            return head + self.body + self.tail, len(head)
        sizes = self.size_lines or tuple(b"%x" % len(chunk) for chunk in self.chunks)
        body = b"".join(size + b"\r\n" + chunk + self.chunk_end for size, chunk in zip(sizes, self.chunks))
        return head + body + b"0\r\n\r\n" + self.tail, len(head)


@dataclass(frozen=True)
class Element:
    """One request (or garbage) of an example, and what the sender may do with it."""
    data: bytes
    head_length: int
    method: bytes          # as the sender sees it; b"" when no request line can be parsed
    body: bytes | None     # what vLLM must receive if forwarded; None: never to be forwarded
    poison: bool = False   # breaks the framing: nothing behind it may be forwarded
    tail: int = 0          # bytes after the request proper (the rest of a broken framing)
    slow: bool = False     # vLLM answers it only once the client has sent everything

    def __repr__(self) -> str:  # a flood would make a failure report megabytes long
        data = self.data if len(self.data) <= 300 else self.data[:300] + b"... (%d bytes)" % len(self.data)
        return (f"Element({data!r}, head_length={self.head_length}, method={self.method!r}, body={self.body!r}, "
                f"poison={self.poison}, tail={self.tail}, slow={self.slow})")


@dataclass(frozen=True)
class FuzzInput:
    elements: tuple[Element, ...]
    cut: int | None        # the input ends after this many bytes
    splits: tuple[int, ...]
    read_late: bool = False  # the client reads only once it has sent everything, as many do


def header_values(draft: Draft, name: bytes) -> tuple[bytes, ...]:
    return tuple(value for key, value in draft.headers if key.lower() == name)


def with_headers(draft: Draft, *added: tuple[bytes, bytes], dropping: bytes | None = None) -> Draft:
    kept = tuple(h for h in draft.headers if dropping is None or h[0].lower() != dropping)
    return replace(draft, headers=kept + added)


tokens = st.sampled_from([b"Bearer sk-high", b"Bearer sk-high", b"Bearer sk-high", b"Bearer sk-low",
                          b"Bearer sk-unknown", b"Basic abc", b""])
json_bodies = st.one_of(
    st.builds(lambda text, extra: json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}],
                                             **extra}).encode(),
              st.text(max_size=40),
              st.dictionaries(st.sampled_from(["stream", "max_tokens", "n"]), st.integers(-2, 3), max_size=2)),
    st.sampled_from([b'{"model": "unknown-model"}', b'{"messages": []}', b'{"model": 3}', b"[]", b"{not json",
                     b"", b'{"model": "' + MODEL.encode() + b'"}']),
    st.binary(max_size=64),
)
optional_headers = st.lists(st.sampled_from([
    (b"x-priority", b"1"), (b"x-priority", b"-1"), (b"x-priority", b"high"), (b"expect", b"100-continue"),
    (b"connection", b"close"), (b"connection", b"keep-alive, x-custom"), (b"x-custom", b"kept"),
    (b"x-vllm-priority", b"0"), (b"content-type", b"application/json"), (b"accept", b"*/*"),
]), max_size=3)


@st.composite
def posts(draw: st.DrawFn) -> Draft:
    body = draw(json_bodies)
    query = draw(st.sampled_from([b"", b"&status=503", b"&slow=1"]))
    headers = [(b"host", b"sender")]
    token = draw(tokens)
    if token:
        headers.append((b"authorization", token))
    headers += draw(optional_headers)
    target = draw(st.sampled_from([b"/v1/chat/completions", b"/v1/completions", b"/unknown/route"]))
    draft = Draft(b"POST", target + b"?fuzz=" + MARK + query, tuple(headers), body)
    if draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        chunks = tuple(c for c in (body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])) if c)
        return with_headers(replace(draft, chunks=chunks), (b"transfer-encoding", b"chunked"))
    return with_headers(draft, (b"content-length", b"%d" % len(body)))


@st.composite
def gets(draw: st.DrawFn) -> Draft:
    target = draw(st.sampled_from([b"/health/liveness", b"/health/readiness", b"/v1/models",
                                   b"/v1/models/" + MODEL.encode(), b"/v1/models/other", b"/v1/usage", b"/"]))
    headers = [(b"host", b"sender")]
    token = draw(tokens)
    if token:
        headers.append((b"authorization", token))
    method = draw(st.sampled_from([b"GET", b"GET", b"HEAD", b"HEAD", b"DELETE", b"OPTIONS"]))
    return Draft(method, target + b"?fuzz=" + MARK, tuple(headers + draw(optional_headers)))


# Mutations: (name, which requests it applies to, what it breaks, how). It breaks "itself" (the request
# is refused, and nothing behind it may be forwarded), "after" (the request is whole, but nothing behind it
# may be forwarded), or nothing (the request may be refused or not, the framing holds).
def cl_and_te(draw: st.DrawFn, draft: Draft) -> Draft:
    if draft.chunks is not None:
        value = draw(st.sampled_from([b"%d" % len(draft.render()[0]), b"%d" % len(draft.body), b"0"]))
        added = (b"content-length", value)
    else:
        added = (b"transfer-encoding", draw(st.sampled_from([b"chunked", b"Chunked", b"identity"])))
    headers = list(draft.headers)
    headers.insert(draw(st.integers(0, len(headers))), added)
    return replace(draft, headers=tuple(headers))


def bad_chunk_size(draw: st.DrawFn, draft: Draft) -> Draft:
    assert draft.chunks
    sizes = [b"%x" % len(chunk) for chunk in draft.chunks]
    index = draw(st.integers(0, len(sizes) - 1))
    sizes[index] = draw(st.sampled_from([b"zz", b"-1", b"", b"0x5", b"f" * 20, b"%x" % (len(draft.chunks[index]) + 1),
                                         b"1" * 40]))
    return replace(draft, size_lines=tuple(sizes))


def wrong_length(draw: st.DrawFn, draft: Draft) -> Draft:
    """A Content-Length a few bytes off. What the sender then reads as the next request starts with the
    end of this body (of a JSON object or array: a `}` or `]`) or with the bytes of INVALID that follow,
    so it can only be an error, never a request of its own."""
    shorter = draft.body[-1:] in (b"}", b"]") and draw(st.booleans())
    value = len(draft.body) - draw(st.integers(1, 3)) if shorter else len(draft.body) + draw(st.integers(1, 7))
    return replace(with_headers(draft, (b"content-length", b"%d" % max(0, value)), dropping=b"content-length"),
                   tail=INVALID * 8)


bad_request_lines = st.one_of(
    st.sampled_from([b"", b"GET", b"GET /", b"GET / HTTP/1.1 extra", b"GET  / HTTP/1.1", b" GET / HTTP/1.1",
                     b"GET /\x7f HTTP/1.1", b"GET / http/1.1", b"GET / HTTP/1.1\x00", b"G\x00T / HTTP/1.1"]),
    st.binary(max_size=40).map(lambda line: INVALID + line.replace(b"\n", b"")))


def obs_fold(draw: st.DrawFn, draft: Draft) -> Draft:
    return with_headers(draft, (b"x-folded", b"first" + draft.eol + b" second"))


MUTATIONS = [
    ("cl-and-te", "post", "itself", cl_and_te),
    ("te-in-http-1.0", "chunked", "itself", lambda draw, d: replace(d, version=b"1.0")),
    ("unsupported-te", "chunked", "itself", lambda draw, d: with_headers(d, (b"transfer-encoding", draw(st.sampled_from(
        [b"gzip", b"chunked, gzip", b"gzip, chunked", b"identity", b"chunked;q=1", b"chunked, chunked"]))),
        dropping=b"transfer-encoding")),
    ("bad-chunk-size", "chunked-nonempty", "itself", bad_chunk_size),
    ("bad-chunk-end", "chunked-nonempty", "itself", lambda draw, d: replace(d, chunk_end=draw(st.sampled_from(
        [b"XX", b"\n", b"\r", b""])))),
    ("conflicting-length", "length", "itself", lambda draw, d: with_headers(d, (b"content-length", b"%d" % (len(d.body) + 1)))),
    ("bad-length", "length", "itself", lambda draw, d: with_headers(d, (b"content-length", draw(st.sampled_from(
        [b"-1", b"+%d" % len(d.body), b"0x10", b"%d %d" % (len(d.body), len(d.body)), b"abc", b"9" * 30]))),
        dropping=b"content-length")),
    ("wrong-length", "length", "itself", wrong_length),
    ("excess-body", "length", "after", lambda draw, d: replace(d, tail=INVALID + draw(st.binary(max_size=30)))),
    ("bad-request-line", "any", "itself", lambda draw, d: replace(d, request_line=draw(bad_request_lines))),
    ("bad-version", "any", "itself", lambda draw, d: replace(d, version=draw(st.sampled_from([b"1.2.3", b"x", b"", b"11"])))),
    ("nul-in-target", "any", "itself", lambda draw, d: replace(d, target=d.target + b"\x00")),
    ("nul-in-header", "any", "itself", lambda draw, d: with_headers(d, (b"x-custom", b"a\x00b"))),
    ("bad-header-name", "any", "itself", lambda draw, d: with_headers(d, (draw(st.sampled_from(
        [b"bad name", b"bad\x01", b"", b"\x7f"])), b"v"))),
    ("huge-header", "not-head", "itself", lambda draw, d: with_headers(d, (b"x-big", b"a" * draw(st.integers(66_000, 140_000))))),
    ("bare-lf", "any", None, lambda draw, d: replace(d, eol=b"\n")),
    ("obs-fold", "any", None, obs_fold),
    ("duplicate-header", "any", None, lambda draw, d: with_headers(d, (b"x-custom", b"1"), (b"X-Custom", b"2"))),
    ("same-length-twice", "length", None, lambda draw, d: with_headers(d, *[h for h in d.headers if h[0] == b"content-length"])),
    ("header-case", "any", None, lambda draw, d: replace(d, headers=tuple((k.upper(), v) for k, v in d.headers))),
    ("lowercase-method", "any", None, lambda draw, d: replace(d, method=d.method.lower())),
    ("http-1.0", "length", None, lambda draw, d: replace(d, version=b"1.0")),
]


def applies(kind: str, draft: Draft) -> bool:
    post = draft.method == b"POST"
    return {"post": post, "chunked": post and draft.chunks is not None,
            "chunked-nonempty": post and bool(draft.chunks), "length": post and draft.chunks is None,
            "any": True, "not-head": draft.method != b"HEAD"}[kind]


@st.composite
def elements(draw: st.DrawFn) -> Element:
    kind = draw(st.sampled_from(["post", "post", "post", "get", "garbage"]))
    if kind == "garbage":
        return Element(INVALID + draw(st.binary(max_size=64)), 0, b"", None, poison=True)
    draft = draw(posts() if kind == "post" else gets())
    broken = set()
    mutations = draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=2, unique_by=lambda m: m[0])
                     if draw(st.booleans()) else st.just([]))
    # Those that break come last: a harmless one (say, HTTP/1.0) must not undo one that breaks (a bad version).
    for name, target, breaks, mutate in sorted(mutations, key=lambda mutation: mutation[2] is not None):
        if applies(target, draft):
            draft = mutate(draw, draft)
            broken.add(breaks)
    data, head_length = draft.render()
    forwardable = draft.method == b"POST" and "itself" not in broken
    seen_method = b"" if "itself" in broken else draft.method  # an error may come before h11 has a method
    return Element(data, head_length, seen_method, draft.body if forwardable else None,
                   poison=bool(broken - {None}), tail=len(draft.tail), slow=b"slow=1" in draft.target)


def flood(size: int, before: Element | None = None) -> list[Element]:
    """`size` bytes of garbage behind `before`, by default a request that vLLM answers only once the
    client has sent them all."""
    if before is None:
        slow_post = Draft(b"POST", b"/v1/chat/completions?fuzz=" + MARK + b"&slow=1", (
            (b"host", b"sender"), (b"authorization", b"Bearer sk-high"), (b"content-length", b"%d" % len(CHAT))),
            CHAT)
        data, head_length = slow_post.render()
        before = Element(data, head_length, b"POST", CHAT, slow=True)
    return [before, Element(b"x" * size, 0, b"", None, poison=True)]


@st.composite
def fuzz_inputs(draw: st.DrawFn) -> FuzzInput:
    drawn = draw(st.lists(elements(), min_size=1, max_size=5))
    if all(draw(st.booleans()) for _ in range(3)):  # now and then, a flood
        drawn = flood(draw(st.integers(*FLOOD_BYTES)), draw(st.sampled_from([None, drawn[0]])))
    total = sum(len(e.data) for e in drawn)
    cut = draw(st.one_of(st.none(), st.none(), st.integers(0, max(0, total - 1))))
    splits = tuple(sorted(draw(st.lists(st.integers(1, max(1, total - 1)), max_size=4))))
    return FuzzInput(tuple(drawn), cut, splits, draw(st.booleans()))


# ---------------------------------------------------------------------------------------------
# What vLLM receives: an upstream that parses each request strictly and answers with its marker

@dataclass
class Forwarded:
    marker: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


class RecordingUpstream:
    def __init__(self) -> None:
        self.forwarded: list[Forwarded] = []
        self.violations: list[str] = []
        self.client_done = asyncio.Event()  # the client of the current example has sent everything
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER)
        request, body = None, bytearray()
        closed = False
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    closed = not data
                    connection.receive_data(data)
                elif type(event) is h11.Request:
                    request, body = event, bytearray()
                elif type(event) is h11.Data:
                    body += event.data
                elif type(event) is h11.EndOfMessage:
                    assert request is not None
                    await self._answer(connection, writer, request, bytes(body))
                    connection.start_next_cycle()
                else:
                    return
        except h11.RemoteProtocolError as exc:
            if not closed:  # a close in the middle of a request is the sender giving up on it (a hang-up)
                self.violations.append(f"the sender sent vLLM malformed HTTP: {exc}")
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, connection: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request,
                      body: bytes) -> None:
        found = re.search(rb"fuzz=(\d+)", request.target)
        marker = found.group(1) if found else b"?"
        self.forwarded.append(Forwarded(marker, list(request.headers), body))
        if b"slow=1" in request.target:
            try:
                await asyncio.wait_for(self.client_done.wait(), EXCHANGE_TIMEOUT_S)
            except TimeoutError:
                self.violations.append("the client could not send its input while a response was held")
        status = 503 if b"status=503" in request.target else 200
        answer = b'{"upstream":"%s"}' % marker
        writer.write(connection.send(h11.Response(status_code=status, headers=[
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]))
            + connection.send(h11.Data(data=answer)) + connection.send(h11.EndOfMessage()))
        await writer.drain()


# ---------------------------------------------------------------------------------------------
# What the client receives: a strict parser of the response stream

STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\x20-\x7e]*")
HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ?([\x20-\x7e]*)")


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    to_head: bool = False


def parse_answers(data: bytes, methods: list[bytes]) -> list[Answer]:
    """The responses in `data`, in order; `methods[i]` is the method of the i-th request (for HEAD)."""
    answers: list[Answer] = []
    position = 0
    while position < len(data):
        end = data.find(b"\r\n\r\n", position)
        assert end != -1, f"a truncated response head: {data[position:position + 200]!r}"
        status_line, *lines = data[position:end].split(b"\r\n")
        matched = STATUS_LINE.fullmatch(status_line)
        assert matched, f"a malformed status line: {status_line!r}"
        headers: dict[bytes, bytes] = {}
        for line in lines:
            header = HEADER_LINE.fullmatch(line)
            assert header, f"a malformed header line: {line!r}"
            assert header.group(1).lower() not in headers, f"a repeated header: {line!r}"
            headers[header.group(1).lower()] = header.group(2)
        status = int(matched.group(1))
        position = end + 4
        if status < 200:
            assert status == 100 and not headers, f"an unexpected interim response: {status_line!r}"
            continue
        to_head = len(answers) < len(methods) and methods[len(answers)] == b"HEAD"
        if to_head:
            body = b""
        elif headers.get(b"transfer-encoding") == b"chunked":
            body, position = parse_chunked(data, position)
        else:
            assert b"content-length" in headers, f"a response without framing: {headers!r}"
            length = int(headers[b"content-length"])
            body = data[position:position + length]
            assert len(body) == length, "a truncated response body"
            position += length
        answers.append(Answer(status, headers, body, to_head))
    return answers


def parse_chunked(data: bytes, position: int) -> tuple[bytes, int]:
    body = bytearray()
    while True:
        end = data.find(b"\r\n", position)
        assert end != -1, "a truncated chunk size"
        size = int(data[position:end], 16)
        chunk = data[end + 2:end + 2 + size]
        assert len(chunk) == size and data[end + 2 + size:end + 4 + size] == b"\r\n", "a truncated chunk"
        position = end + 4 + size
        if size == 0:
            return bytes(body), position
        body += chunk


# ---------------------------------------------------------------------------------------------
# One example: send, read, check

class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Harness:
    proxy: Proxy
    upstream: RecordingUpstream
    errors: ErrorLog
    markers: itertools.count = field(default_factory=lambda: itertools.count(10_000_000))
    allowed: dict[bytes, bytes | None] = field(default_factory=dict)  # every marker sent: the body vLLM may get
    seen: dict[str, int] = field(default_factory=dict)                 # statuses and outcomes, for the summary

    @classmethod
    async def start(cls) -> Harness:
        upstream = RecordingUpstream()
        url = await upstream.start()
        errors = ErrorLog()
        logging.getLogger().addHandler(errors)
        proxy = await start_sender(url, max_body_bytes=MAX_BODY_BYTES)
        return cls(proxy, upstream, errors)

    async def stop(self) -> None:
        logging.getLogger().removeHandler(self.errors)
        await stop_sender(self.proxy)
        assert self.upstream.server is not None
        self.upstream.server.close()

    def materialize(self, fuzz: FuzzInput) -> tuple[bytes, list[bytes], list[bytes]]:
        """The bytes to send, the markers vLLM may receive (in order), and the requests' methods as the
        sender will see them (up to the first one after which the framing is unknown)."""
        data = bytearray()
        may_forward: list[bytes] = []
        methods: list[bytes] = []
        framing_known = True
        for element in fuzz.elements:
            marker = b"%d" % next(self.markers)
            start = len(data)
            data += element.data.replace(MARK, marker)
            complete = fuzz.cut is None or fuzz.cut >= len(data) - element.tail
            if framing_known:
                cut_in_head = fuzz.cut is not None and fuzz.cut < start + element.head_length
                methods.append(b"" if cut_in_head else element.method)
            body = element.body if framing_known and complete else None
            framing_known = framing_known and not element.poison
            self.allowed[marker] = body
            if body is not None:
                may_forward.append(marker)
        return bytes(data if fuzz.cut is None else data[:fuzz.cut]), may_forward, methods

    async def converse(self, data: bytes, splits: tuple[int, ...], read_late: bool) -> tuple[bytes, bool]:
        """Sends `data` in pieces, half-closes, and reads (meanwhile, or only then) until the sender
        closes: what it answered, and whether the connection was reset."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.port)
        reading = None if read_late else asyncio.create_task(read_until_closed(reader))
        try:
            for start, end in itertools.pairwise((0, *[s for s in splits if s < len(data)], len(data))):
                for offset in range(start, end, 64 * 1024):  # the client's own buffer stays small too
                    writer.write(data[offset:min(end, offset + 64 * 1024)])
                    await asyncio.wait_for(writer.drain(), EXCHANGE_TIMEOUT_S)
            writer.write_eof()
        except (ConnectionError, RuntimeError):  # uvloop: RuntimeError once the transport closed on a reset
            pass  # the sender closed early (an error answer, or a reset): what it said is read below
        finally:
            self.upstream.client_done.set()
        try:
            return await asyncio.wait_for(reading or read_until_closed(reader), EXCHANGE_TIMEOUT_S)
        finally:
            writer.close()

    async def exchange(self, fuzz: FuzzInput) -> None:
        data, may_forward, methods = self.materialize(fuzz)
        forwarded_before = len(self.upstream.forwarded)
        self.upstream.client_done.clear()
        tracemalloc.start()  # only while the connection is served: it would slow down the generation tenfold
        try:
            received, reset = await self.converse(data, fuzz.splits, fuzz.read_late)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        await async_wait_until(lambda: not self.proxy.server.connections, timeout_s=EXCHANGE_TIMEOUT_S,
                               what="the sender to end the connection")

        # 1. well-formed answers only, no 5xx of the sender's own, envelopes, close means close
        assert not reset, f"the connection was reset under the answers (received {received[:300]!r})"
        answers = parse_answers(received, methods)
        for index, answer in enumerate(answers):
            self.seen[str(answer.status)] = self.seen.get(str(answer.status), 0) + 1
            relayed = re.fullmatch(rb'\{"upstream":"(\d+)"\}', answer.body)
            if relayed:
                assert relayed.group(1) in may_forward, f"an answer for a request vLLM should not have had: {answer}"
            elif answer.status >= 500:
                assert answer.status == 501, f"a {answer.status} of the sender's own: {answer}"
            if answer.status >= 400 and not relayed and not answer.to_head:
                error = json.loads(answer.body)["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"], answer
                assert answer.headers[b"content-type"] == b"application/json"
                assert answer.status != 501 or error["code"] == "unsupported_transfer_encoding", answer
            if answer.headers.get(b"connection") == b"close":
                assert index == len(answers) - 1, "an answer after Connection: close"

        # 2. vLLM got only what it may have, once each, in order, byte for byte, framed by us
        forwarded = self.upstream.forwarded[forwarded_before:]
        assert not self.upstream.violations, self.upstream.violations
        for request in forwarded:
            assert request.marker in self.allowed, f"vLLM got a request nobody sent: {request}"
            assert self.allowed[request.marker] is not None, f"vLLM got a request it must not: {request}"
            assert request.body == self.allowed[request.marker], f"the body changed on the way: {request}"
            names = [name for name, _ in request.headers]
            assert b"transfer-encoding" not in names and names.count(b"content-length") == 1, request.headers
            assert (b"content-length", b"%d" % len(request.body)) in request.headers
            assert b"authorization" not in names and b"x-priority" not in names, request.headers
        ours = [r.marker for r in forwarded if r.marker in may_forward]
        assert ours == sorted(set(ours), key=may_forward.index), f"forwarded out of order or twice: {ours}"
        self.seen["forwarded"] = self.seen.get("forwarded", 0) + len(forwarded)

        # 3. no error logged, every grant released
        assert not self.errors.records, [self.errors.format(record) for record in self.errors.records]
        capacity = self.proxy.capacity
        assert len(capacity.released) == len(capacity.granted), "a grant was not released"

        # 4. bounded memory
        assert peak < MEMORY_BOUND_BYTES, f"serving the connection peaked at {peak} bytes"


async def read_until_closed(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    received = bytearray()
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionResetError:
        return bytes(received), True
    return bytes(received), False


def test_http_surface_answers_any_input_safely(fuzz_settings: settings) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        harness = runner.run(Harness.start())
        try:
            @fuzz_settings
            @given(fuzz_inputs())
            @example(FuzzInput(tuple(flood(FLOOD_BYTES[1])), None, ()))  # the memory bound, in every run
            def answers_safely(fuzz: FuzzInput) -> None:
                runner.run(harness.exchange(fuzz))

            answers_safely()
        finally:
            tracemalloc.stop()  # if an example failed while tracing
            runner.run(harness.stop())
    # The grammar reaches both sides of the surface: requests served through vLLM, and refused ones.
    assert harness.seen.get("forwarded", 0) > 0 and harness.seen.get("200", 0) > 0, harness.seen
    assert harness.seen.get("400", 0) > 0 and harness.seen.get("401", 0) > 0, harness.seen
