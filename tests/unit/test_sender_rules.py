"""The sender's pure rules: header filtering, error rendering, reading the model, priority."""

from __future__ import annotations

import orjson
import pytest

import sender
from common.messages import Grant

TOKEN = sender.TokenInfo("t", priority=5, threshold=3)
GRANT = Grant(lease="l", url="http://vllm:8000", api_key=None, release_to="q", vllm_priority=None)


def test_error_envelope_has_openai_shape_and_retry_after() -> None:
    response, body = sender.render_error(sender.ApiError(429, "busy", type="rate_limit_error", code="queue_full",
                                                         retry_after_s=2))
    assert response.status_code == 429
    assert (b"retry-after", b"2") in list(response.headers)
    assert (b"content-type", b"application/json") in list(response.headers)
    assert orjson.loads(body) == {"error": {"message": "busy", "type": "rate_limit_error", "param": None,
                                            "code": "queue_full"}}


@pytest.mark.parametrize(("headers", "body", "model"), [
    pytest.param([], b'{"model": "m1", "messages": []}', "m1", id="json"),
    pytest.param([(b"content-type", b"application/json; charset=utf-8")], b' {"x": [1], "model":"m2"}', "m2",
                 id="json-with-charset"),
    pytest.param([(b"content-type", b'multipart/form-data; boundary="b0"')],
                 b'--b0\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--b0--\r\n', "whisper",
                 id="multipart-quoted-boundary"),
    pytest.param([(b"content-type", b"multipart/form-data; boundary=b1")],
                 b'--b1\r\ncontent-disposition: form-data; name="file"; filename="x"\r\n\r\n\x00\xff--b1x\r\n'
                 b'--b1\r\ncontent-disposition: form-data; name="model"\r\n\r\nw2\r\n--b1--\r\n', "w2",
                 id="multipart-model-after-binary"),
])
def test_read_model(headers, body, model) -> None:
    assert sender.read_model(headers, body) == model


@pytest.mark.parametrize(("body", "code"), [
    pytest.param(b"", "invalid_json", id="empty"),
    pytest.param(b"{", "invalid_json", id="truncated"),
    pytest.param(b'{"model": ""}', "invalid_model", id="empty-model"),
    pytest.param(b'{"model": null}', "missing_model", id="null-model"),
    pytest.param(b'"text"', "missing_model", id="json-string"),
])
def test_read_model_refuses_with_400(body, code) -> None:
    with pytest.raises(sender.ApiError) as caught:
        sender.read_model([], body)
    assert caught.value.status == 400 and caught.value.code == code


@pytest.mark.parametrize(("header", "priority"), [
    pytest.param(None, 5, id="token-priority"),
    pytest.param(b"2", 2, id="lowered"),
    pytest.param(b"9", 5, id="cannot-raise"),
    pytest.param(b"0", 0, id="zero"),
])
def test_effective_priority(header, priority) -> None:
    headers = [] if header is None else [(b"x-priority", header)]
    assert sender.effective_priority(TOKEN, headers) == priority


@pytest.mark.parametrize("value", [b"-1", b"high", b"1.5"])
def test_effective_priority_rejects_bad_header(value) -> None:
    with pytest.raises(sender.ApiError) as caught:
        sender.effective_priority(TOKEN, [(b"x-priority", value)])
    assert caught.value.status == 400


def test_upstream_request_drops_hop_by_hop_and_credentials() -> None:
    request = sender.Request(b"POST", b"/v1/chat/completions?a=b", [
        (b"host", b"dispatcher.example"), (b"authorization", b"Bearer sk-user"), (b"connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"), (b"transfer-encoding", b"chunked"), (b"te", b"trailers"),
        (b"x-priority", b"1"), (b"x-vllm-priority", b"0"), (b"expect", b"100-continue"),
        (b"content-type", b"application/json"), (b"user-agent", b"OpenAI/Python"), (b"x-request-id", b"abc"),
    ], b"1.1")
    grant = Grant(lease="l", url="http://vllm:8000", api_key="secret", release_to="q", vllm_priority=7)
    out = sender.upstream_request(request, b"{}", sender.Origin.parse(grant.url), grant)
    headers = dict(out.headers)
    assert out.target == b"/v1/chat/completions?a=b"
    assert headers[b"host"] == b"vllm:8000"
    assert headers[b"authorization"] == b"Bearer secret"
    assert headers[b"x-vllm-priority"] == b"7"
    assert headers[b"content-length"] == b"2"
    assert headers[b"x-request-id"] == b"abc"  # the client's own, passed on; the sender adds none
    for dropped in (b"connection", b"keep-alive", b"transfer-encoding", b"te", b"x-priority", b"expect"):
        assert dropped not in headers
    assert [v for k, v in out.headers if k == b"x-vllm-priority"] == [b"7"]


def test_upstream_request_without_server_key_sends_no_authorization() -> None:
    request = sender.Request(b"POST", b"/v1/completions", [(b"authorization", b"Bearer sk-user")], b"1.1")
    out = sender.upstream_request(request, b"", sender.Origin.parse(GRANT.url), GRANT)
    assert b"authorization" not in dict(out.headers)


def test_response_headers_keep_length_and_drop_hop_by_hop() -> None:
    kept = sender.response_headers([(b"content-length", b"10"), (b"connection", b"close"),
                                    (b"transfer-encoding", b"chunked"), (b"content-type", b"text/event-stream"),
                                    (b"date", b"x"), (b"server", b"uvicorn")])
    assert kept == [(b"content-length", b"10"), (b"content-type", b"text/event-stream"), (b"date", b"x"),
                    (b"server", b"uvicorn")]


@pytest.mark.parametrize(("url", "host_header"), [
    ("http://vllm:8000", b"vllm:8000"), ("http://vllm", b"vllm"), ("https://vllm.example", b"vllm.example"),
    ("http://[::1]:8000", b"[::1]:8000"),
])
def test_origin_host_header(url, host_header) -> None:
    assert sender.Origin.parse(url).host_header == host_header


@pytest.mark.parametrize(("env", "variable"), [
    pytest.param({}, "DATABASE_URL", id="no-token-source"),
    pytest.param({"DATABASE_URL": "ftp://x"}, "DATABASE_URL", id="unknown-database"),
    pytest.param({"DATABASE_URL": "mysql://u@db:3306"}, "DATABASE_URL", id="mysql-without-database"),
    pytest.param({"TOKENS_FILE": "t.yaml", "SENDER_PORT": "http"}, "SENDER_PORT", id="port"),
    pytest.param({"TOKENS_FILE": "t.yaml", "GRANT_TIMEOUT": "0"}, "GRANT_TIMEOUT", id="grant-timeout"),
    pytest.param({"TOKENS_FILE": "t.yaml", "MAX_BODY_BYTES": "-1"}, "MAX_BODY_BYTES", id="body-limit"),
    pytest.param({"TOKENS_FILE": "t.yaml", "MAX_PRIORITY": "300"}, "MAX_PRIORITY", id="max-priority"),
])
def test_config_errors_name_the_variable(env, variable) -> None:
    with pytest.raises(sender.ConfigError, match=variable):
        sender.Config.from_env(env)


@pytest.mark.parametrize("url", ["postgresql://u:p@db:5432/dispatcher", "mysql://u:p@db:3306/dispatcher"])
def test_config_takes_either_database(url) -> None:
    assert sender.Config.from_env({"DATABASE_URL": url}).database_url == url


def test_config_defaults_follow_the_design() -> None:
    config = sender.Config.from_env({"TOKENS_FILE": "t.yaml"})
    assert (config.port, config.token_cache_s, config.grant_timeout_s, config.upstream_timeout_s,
            config.max_body_bytes, config.max_priority, config.rpc_reconnect_attempts) == (
        8080, 30.0, 570.0, 600.0, 32 * 1024 * 1024, 10, 10)


def test_headers_named_in_connection_are_dropped_both_ways() -> None:
    request = sender.Request(b"POST", b"/v1/completions", [(b"connection", b"keep-alive, X-Trace-Hop"),
                                                          (b"x-trace-hop", b"1"), (b"x-kept", b"1")], b"1.1")
    out = dict(sender.upstream_request(request, b"", sender.Origin.parse(GRANT.url), GRANT).headers)
    assert b"x-trace-hop" not in out and out[b"x-kept"] == b"1"
    assert sender.response_headers([(b"connection", b"x-up"), (b"x-up", b"1"), (b"x-kept", b"2")]) == [
        (b"x-kept", b"2")]


async def test_releases_of_one_batch_go_out_as_one_message_per_consumer(monkeypatch) -> None:
    import asyncio

    import prometheus_client as prom

    capacity = sender.CapacityClient("amqp://unused", 10, 3, sender.QueueState("test"),
                                      sender.Metrics.create(prom.CollectorRegistry()).queue_waiting)
    published: list[tuple[str, list[str]]] = []

    def publish_releases(release_to: str, leases: list[str]) -> None:
        published.append((release_to, leases))

    monkeypatch.setattr(capacity, "publish_releases", publish_releases)
    for lease, release_to in (("a", "consumer-1"), ("b", "consumer-2"), ("c", "consumer-1")):
        capacity.release_soon(Grant(lease=lease, url="http://v", api_key=None, release_to=release_to,
                                    vllm_priority=None))
    await asyncio.sleep(0)
    assert published == []  # nothing is sent before the batch ends
    await asyncio.sleep(sender.RELEASE_BATCH_S * 2)  # the batch's timer fires before this sleep's
    assert sorted(published) == [("consumer-1", ["a", "c"]), ("consumer-2", ["b"])]


async def test_flush_sends_gathered_releases_at_once_and_only_once(monkeypatch) -> None:
    """At shutdown the releases still in their batch go out before the broker connection closes."""
    import asyncio

    import prometheus_client as prom

    capacity = sender.CapacityClient("amqp://unused", 10, 3, sender.QueueState("test"),
                                      sender.Metrics.create(prom.CollectorRegistry()).queue_waiting)
    published: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(capacity, "publish_releases", lambda release_to, leases: published.append((release_to, leases)))
    capacity.release_soon(Grant(lease="a", url="http://v", api_key=None, release_to="consumer-1", vllm_priority=None))
    capacity.flush_releases()
    assert published == [("consumer-1", ["a"])]
    await asyncio.sleep(sender.RELEASE_BATCH_S * 2)
    assert published == [("consumer-1", ["a"])]


@pytest.mark.parametrize(("priority", "age", "aging_s", "expected"), [
    pytest.param(1, 0, 0.0, (1, None), id="aging-off"),
    pytest.param(1, 0, 10.0, (1, 110.0), id="first-step-after-one-period"),
    pytest.param(1, 3, 10.0, (4, 140.0), id="three-steps-up"),
    pytest.param(8, 2, 10.0, (10, None), id="reaches-max-priority-and-stops"),
    pytest.param(8, 5, 10.0, (10, None), id="never-above-max-priority"),
    pytest.param(1, 0, 200.0, (1, None), id="next-step-after-the-deadline"),
])
def test_aging_raises_priority_one_level_per_period_up_to_the_max(priority, age, aging_s, expected) -> None:
    """Queued at 100 with a deadline at 250 and MAX_PRIORITY 10."""
    assert sender.aging_plan(priority, age, 100.0, 250.0, aging_s, 10) == expected


@pytest.mark.parametrize(("outstanding", "bucket", "queue_priority"), [
    pytest.param(1, 0, 23, id="first-request-highest-sub-level"),
    pytest.param(2, 1, 22, id="second"),
    pytest.param(3, 1, 22, id="third-same-class-as-second"),
    pytest.param(4, 2, 21, id="fourth-to-seventh"),
    pytest.param(8, 3, 20, id="eighth"),
    pytest.param(1000, 9, 20, id="many-stay-in-the-lowest-sub-level"),
])
def test_fair_share_sub_levels_stay_inside_their_priority(outstanding, bucket, queue_priority) -> None:
    """Priority 5 with 4 sub-levels owns queue priorities 20-23: a token's first outstanding request gets the
    highest, and no request of priority 5 reaches priority 6's range (24-27) or falls into priority 4's."""
    from common.messages import queue_priority as encode_priority, share_bucket

    assert share_bucket(outstanding) == bucket
    assert encode_priority(5, bucket, 4) == queue_priority
    assert encode_priority(4, 0, 4) < encode_priority(5, 99, 4) <= encode_priority(5, 0, 4) < encode_priority(6, 99, 4)
