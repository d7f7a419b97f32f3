"""The relay of a chunked body as it came (`upstream.ChunkedBody`): what goes to the client, and
where the body ends, whatever the chunks and wherever vLLM's reads cut them."""

from __future__ import annotations

import hypothesis
import pytest
from hypothesis import strategies as st

from upstream import ChunkedBody


def frame(payloads: list[bytes], extension: bytes = b"", trailers: bytes = b"") -> tuple[bytes, bytes]:
    """(the chunks before the last, the last chunk with its trailers and the empty line)."""
    chunks = b"".join(b"%x%s\r\n%s\r\n" % (len(payload), extension, payload) for payload in payloads)
    return chunks, b"0%s\r\n%s\r\n" % (extension, trailers)


def relay(reads: list[bytes]) -> tuple[bytes, ChunkedBody]:
    body = ChunkedBody()
    relayed = b""
    for data in reads:
        assert not body.ended
        relayed += b"".join(body.feed(data))
    return relayed, body


def cut(whole: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(whole), *(at % (len(whole) + 1) for at in cuts)})
    return [whole[start:end] for start, end in zip(bounds, bounds[1:])]


@hypothesis.settings(max_examples=300, derandomize=True, deadline=None, database=None)
@hypothesis.given(payloads=st.lists(st.binary(min_size=1, max_size=80), max_size=8),
                  cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=10),
                  extension=st.sampled_from([b"", b";name=value", b" ;x"]),
                  trailers=st.sampled_from([b"", b"x-trailer: 1\r\n"]))
def test_every_chunk_but_the_last_goes_out_as_it_came(payloads, cuts, extension, trailers) -> None:
    chunks, last = frame(payloads, extension, trailers)
    relayed, body = relay(cut(chunks + last, cuts))
    assert relayed == chunks
    assert body.ended and not body.extra


def test_a_size_line_cut_by_a_read_is_held_until_known() -> None:
    """`0` at the end of a read may be the last chunk or the start of `0a`: it waits for the rest."""
    body = ChunkedBody()
    assert body.feed(b"3\r\nabc\r\n0") == [b"3\r\nabc\r\n"]
    assert body.feed(b"a\r\n0123456789\r\n") == [b"0", b"a\r\n0123456789\r\n"]
    assert body.feed(b"0") == []
    assert body.feed(b"\r\n\r\n") == [] and body.ended


def test_bytes_after_the_end_are_not_relayed_and_mark_the_connection() -> None:
    chunks, last = frame([b"data: [DONE]\n\n"])
    relayed, body = relay([chunks + last + b"HTTP/1.1 200 OK\r\n"])
    assert relayed == chunks and body.ended and body.extra


@pytest.mark.parametrize("stream", [
    b"x\r\nabc\r\n0\r\n\r\n",              # not a size
    b"-3\r\nabc\r\n0\r\n\r\n",
    b"0x3\r\nabc\r\n0\r\n\r\n",
    b"\r\nabc\r\n0\r\n\r\n",                 # no size at all
    b"3\nabc\r\n0\r\n\r\n",                  # a bare LF
    b"3\r\nabcd\r\n0\r\n\r\n",               # more data than its size
    b"1" * 17 + b"\r\n",                     # a size no server sends
    b"3;" + b"e" * 20000 + b"\r\n",          # an endless extension
], ids=["letter", "negative", "0x", "empty", "bare-lf", "long-data", "huge-size", "long-line"])
def test_a_malformed_body_is_refused(stream) -> None:
    body = ChunkedBody()
    with pytest.raises(ValueError):
        for start in range(0, len(stream), 7):  # in reads, as it would come
            body.feed(stream[start:start + 7])


def test_a_body_cut_short_has_not_ended() -> None:
    chunks, last = frame([b"data: a\n\n", b"data: b\n\n"])
    for end in range(len(chunks + last)):
        relayed, body = relay(cut((chunks + last)[:end], [5, 17, 30]))
        assert not body.ended
        assert chunks.startswith(relayed)  # never more than what came, never the last chunk
