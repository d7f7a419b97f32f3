"""The consumer's decisions (no I/O): which server, may I grant now, lease expiry; and its configuration."""

from __future__ import annotations

import prometheus_client as prom
import pytest

import consumer
from common.config import ConfigError
from consumer import Capacity, Config, MetricsSample, ServerSpec

LEASE_TIMEOUT_S = 900.0


def make_capacity(*servers: tuple[str, int], healthy: bool = True, lease_timeout_s: float = LEASE_TIMEOUT_S
                  ) -> Capacity:
    capacity = Capacity([ServerSpec(url, None, cap) for url, cap in servers], lease_timeout_s)
    for url, _ in servers:
        capacity.set_health(url, healthy, 0.0)
    return capacity


def fill(capacity: Capacity, url: str, count: int, now: float = 0.0) -> list[str]:
    server = next(s for s in capacity.servers if s.url == url)
    return [capacity.grant(server, now) for _ in range(count)]


# -- pick_server ----------------------------------------------------------------------------

@pytest.mark.parametrize("caps, used, unhealthy, expected", [
    ({"a": 4}, {}, set(), "a"),
    ({"a": 4, "b": 4}, {"a": 1}, set(), "b"),
    ({"a": 4, "b": 8}, {}, set(), "b"),
    ({"a": 8, "b": 4}, {"a": 5}, set(), "b"),              # headroom 3 vs 4
    ({"a": 4, "b": 4}, {}, set(), "a"),                    # a tie goes to the first listed
    ({"a": 4, "b": 4}, {}, {"a"}, "b"),
    ({"a": 4, "b": 2}, {"b": 1}, {"a"}, "b"),              # less headroom, but the only healthy one
    ({"a": 2, "b": 2}, {"a": 2}, set(), "b"),
    ({"a": 2, "b": 2}, {"a": 2, "b": 2}, set(), None),     # all at cap
    ({"a": 2, "b": 2}, {"a": 2}, {"b"}, None),             # room only on an unhealthy server
    ({"a": 2}, {}, {"a"}, None),
], ids=["one", "less-used", "bigger-cap", "most-headroom", "tie", "skips-unhealthy", "only-healthy",
        "other-full", "all-full", "room-only-unhealthy", "none-healthy"])
def test_pick_server_chooses_healthy_server_with_most_headroom(caps, used, unhealthy, expected):
    capacity = make_capacity(*caps.items())
    for url, count in used.items():
        fill(capacity, url, count)
    for url in unhealthy:
        capacity.set_health(url, False, 1.0)
    picked = capacity.pick_server()
    assert (picked.url if picked else None) == expected
    assert capacity.has_room() is (expected is not None)


def test_grant_at_cap_is_refused():
    capacity = make_capacity(("a", 2))
    fill(capacity, "a", 2)
    assert capacity.pick_server() is None
    with pytest.raises(ValueError):
        capacity.grant(capacity.servers[0], 0.0)


def test_grant_to_unhealthy_server_is_refused():
    capacity = make_capacity(("a", 2), healthy=False)
    assert not capacity.has_room()
    with pytest.raises(ValueError):
        capacity.grant(capacity.servers[0], 0.0)


def test_grant_returns_unique_leases_with_prefix():
    capacity = Capacity([ServerSpec("a", None, 3)], LEASE_TIMEOUT_S, lease_prefix="c1.")
    capacity.set_health("a", True, 0.0)
    leases = fill(capacity, "a", 3)
    assert len(set(leases)) == 3
    assert all(lease.startswith("c1.") for lease in leases)
    assert capacity.servers[0].in_flight == 3


# -- release ----------------------------------------------------------------------------------

def test_release_frees_the_slot():
    capacity = make_capacity(("a", 1))
    [lease] = fill(capacity, "a", 1)
    assert not capacity.has_room()
    assert capacity.release(lease) is capacity.servers[0]
    assert capacity.has_room()
    assert capacity.servers[0].in_flight == 0


@pytest.mark.parametrize("lease", ["no-such-lease", ""], ids=["unknown", "empty"])
def test_release_of_unknown_lease_is_ignored(lease):
    capacity = make_capacity(("a", 1))
    fill(capacity, "a", 1)
    assert capacity.release(lease) is None
    assert capacity.servers[0].in_flight == 1


def test_release_twice_frees_once():
    capacity = make_capacity(("a", 2))
    first, second = fill(capacity, "a", 2)
    assert capacity.release(first) is not None
    assert capacity.release(first) is None
    assert capacity.servers[0].leases == {second: 0.0}


def test_release_on_unhealthy_server_frees_but_grants_nothing():
    capacity = make_capacity(("a", 1))
    [lease] = fill(capacity, "a", 1)
    capacity.set_health("a", False, 1.0)
    assert capacity.release(lease) is not None
    assert not capacity.has_room()


# -- lease expiry -----------------------------------------------------------------------------

@pytest.mark.parametrize("now, expired_count", [
    (0.0, 0), (899.9, 0), (900.0, 1), (950.0, 2), (10_000.0, 3),
], ids=["at-grant", "just-before", "at-timeout", "two-old", "all"])
def test_expire_leases_frees_slots_after_lease_timeout(now, expired_count):
    capacity = make_capacity(("a", 3))
    server = capacity.servers[0]
    leases = [capacity.grant(server, granted_at) for granted_at in (0.0, 50.0, 100.0)]
    expired = capacity.expire_leases(now)
    assert [lease for lease, _ in expired] == leases[:expired_count]
    assert server.in_flight == 3 - expired_count
    for lease in leases[:expired_count]:
        assert capacity.release(lease) is None  # a late release of an expired lease is ignored


def test_expired_lease_makes_room():
    capacity = make_capacity(("a", 1), lease_timeout_s=5.0)
    fill(capacity, "a", 1, now=10.0)
    assert not capacity.has_room()
    capacity.expire_leases(14.0)
    assert not capacity.has_room()
    capacity.expire_leases(15.0)
    assert capacity.pick_server() is capacity.servers[0]


# -- health and metrics -----------------------------------------------------------------------

def test_set_health_reports_changes_only():
    capacity = make_capacity(("a", 1), healthy=False)
    assert capacity.set_health("a", True, 1.0) is True
    assert capacity.set_health("a", True, 2.0) is False
    assert capacity.servers[0].health_changed_at == 1.0
    assert capacity.set_health("a", False, 3.0) is True
    assert not capacity.is_any_healthy()


def test_update_metrics_keeps_last_sample():
    capacity = make_capacity(("a", 1))
    sample = MetricsSample(running=2, waiting=0, generation_tokens_total=100)
    capacity.update_metrics("a", sample, 5.0)
    capacity.update_metrics("a", None, 6.0)  # a failed read keeps the previous sample
    assert capacity.servers[0].sample == sample
    assert capacity.servers[0].sampled_at == 5.0


def test_parse_vllm_metrics_sums_over_engines():
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 2.0\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
        "# TYPE vllm:generation_tokens counter\n"
        'vllm:generation_tokens_total{engine="0",model_name="m"} 1000.0\n'
        'vllm:generation_tokens_total{engine="1",model_name="m"} 234.0\n'
        'vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9\n'
    )
    assert consumer.parse_vllm_metrics(text) == MetricsSample(5.0, 1.0, 1234.0)
    assert consumer.parse_vllm_metrics("# nothing of vLLM\nother_metric 1\n") is None


# -- vllm_priority ----------------------------------------------------------------------------

@pytest.mark.parametrize("priority, max_priority, forward, expected", [
    (10, 10, True, 0),
    (0, 10, True, 10),
    (3, 10, True, 7),
    (20, 10, True, 0),        # above the queue's maximum counts as the maximum (RabbitMQ does the same)
    (-1, 10, True, 10),
    (4, 5, True, 1),
    (3, 10, False, None),
    (10, 10, False, None),
], ids=["top", "bottom", "middle", "above-max", "negative", "other-max", "off", "off-top"])
def test_vllm_priority_mapping(priority, max_priority, forward, expected):
    assert consumer.vllm_priority(priority, max_priority, forward) == expected


# -- probes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, target, ready, status", [
    (b"GET", b"/health", False, 200),
    (b"GET", b"/ready", True, 200),
    (b"GET", b"/ready", False, 503),
    (b"GET", b"/ready?verbose=1", True, 200),
    (b"GET", b"/metrics", False, 200),
    (b"GET", b"/nope", True, 404),
    (b"POST", b"/health", True, 405),
], ids=["health", "ready", "not-ready", "query", "metrics", "unknown", "post"])
def test_probe_response(method, target, ready, status):
    registry = prom.CollectorRegistry()
    capacity = make_capacity(("http://a:1", 2))
    metrics = consumer.Metrics.create(registry, capacity)
    fill(capacity, "http://a:1", 1)
    metrics.grants.labels("http://a:1").inc()
    got, _, body = consumer.probe_response(method, target, lambda: ready, registry)
    assert got == status
    if target == b"/metrics":
        assert b'dispatcher_consumer_in_flight{server="http://a:1"} 1.0' in body
        assert b'dispatcher_consumer_server_healthy{server="http://a:1"} 1.0' in body
        assert b'dispatcher_consumer_grants_total{server="http://a:1"} 1.0' in body


# -- configuration ------------------------------------------------------------------------------

def test_config_defaults():
    config = Config.from_env({"MODEL": "m"})
    assert config.servers == (ServerSpec("http://localhost:8000", None, consumer.DEFAULT_MAX_PARALLEL_REQUESTS),)
    assert (config.min_tokens_per_second_per_user, config.metrics_refresh_s, config.rpc_queue_expiration_ms,
            config.probe_port, config.max_vllm_connection_attempts, config.forward_priority,
            config.lease_timeout_s, config.rpc_reconnect_attempts, config.max_priority) == \
        (0.0, 1.0, 30_000, 8081, 100, False, 900.0, 10, 10)
    assert config.rabbitmq_url == "amqp://guest:guest@localhost:5672/"


def test_config_single_server():
    config = Config.from_env({"MODEL": "m", "VLLM_URL": "http://gpu:8000/", "VLLM_API_KEY": "k",
                              "MAX_PARALLEL_REQUESTS": "4", "FORWARD_PRIORITY": "1"})
    assert config.servers == (ServerSpec("http://gpu:8000", "k", 4),)
    assert config.forward_priority is True


def test_config_server_list():
    config = Config.from_env({
        "MODEL": "m", "MAX_PARALLEL_REQUESTS": "3", "VLLM_URL": "http://ignored:1",
        "VLLM_SERVERS": '[{"url": "http://a:8000", "api_key": "ka", "max_parallel_requests": 8},'
                        ' {"url": "https://b", "api_key": null}]'})
    assert config.servers == (ServerSpec("http://a:8000", "ka", 8), ServerSpec("https://b", None, 3))


@pytest.mark.parametrize("env, variable", [
    ({"MODEL": ""}, "MODEL"),
    ({"MODEL": "bad model!"}, "MODEL"),
    ({"MAX_PARALLEL_REQUESTS": "0"}, "MAX_PARALLEL_REQUESTS"),
    ({"MAX_PARALLEL_REQUESTS": "many"}, "MAX_PARALLEL_REQUESTS"),
    ({"MIN_TOKENS_PER_SECOND_PER_USER": "-1"}, "MIN_TOKENS_PER_SECOND_PER_USER"),
    ({"METRICS_REFRESH_SECONDS": "0"}, "METRICS_REFRESH_SECONDS"),
    ({"RPC_QUEUE_EXPIRATION": "1.5"}, "RPC_QUEUE_EXPIRATION"),
    ({"RPC_QUEUE_EXPIRATION": "999"}, "RPC_QUEUE_EXPIRATION"),
    ({"PROBE_PORT": "70000"}, "PROBE_PORT"),
    ({"MAX_VLLM_CONNECTION_ATTEMPTS": "0"}, "MAX_VLLM_CONNECTION_ATTEMPTS"),
    ({"FORWARD_PRIORITY": "maybe"}, "FORWARD_PRIORITY"),
    ({"LEASE_TIMEOUT_SECONDS": "0"}, "LEASE_TIMEOUT_SECONDS"),
    ({"RPC_RECONNECT_ATTEMPTS": "0"}, "RPC_RECONNECT_ATTEMPTS"),
    ({"MAX_PRIORITY": "256"}, "MAX_PRIORITY"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"RABBITMQ_URL": "http://broker"}, "RABBITMQ_URL"),
    ({"VLLM_URL": "gpu:8000"}, "VLLM_URL"),
    ({"VLLM_URL": "http://gpu:8000/v1"}, "VLLM_URL"),
    ({"VLLM_URL": "http://gpu:port"}, "VLLM_URL"),
    ({"VLLM_SERVERS": "not json"}, "VLLM_SERVERS"),
    ({"VLLM_SERVERS": "[]"}, "VLLM_SERVERS"),
    ({"VLLM_SERVERS": '{"url": "http://a"}'}, "VLLM_SERVERS"),
    ({"VLLM_SERVERS": '["http://a"]'}, "VLLM_SERVERS[0]"),
    ({"VLLM_SERVERS": '[{"api_key": "k"}]'}, "VLLM_SERVERS[0].url"),
    ({"VLLM_SERVERS": '[{"url": "http://a", "maxParallel": 2}]'}, "VLLM_SERVERS[0]"),
    ({"VLLM_SERVERS": '[{"url": "http://a", "api_key": 5}]'}, "VLLM_SERVERS[0].api_key"),
    ({"VLLM_SERVERS": '[{"url": "http://a"}, {"url": "http://b", "max_parallel_requests": 0}]'},
     "VLLM_SERVERS[1].max_parallel_requests"),
    ({"VLLM_SERVERS": '[{"url": "http://a", "max_parallel_requests": true}]'},
     "VLLM_SERVERS[0].max_parallel_requests"),
    ({"VLLM_SERVERS": '[{"url": "ftp://a"}]'}, "VLLM_SERVERS[0].url"),
    ({"VLLM_SERVERS": '[{"url": "http://a"}, {"url": "http://a/"}]'}, "VLLM_SERVERS"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_config_error_names_the_variable(env, variable):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"MODEL": "m", **env})
    assert str(caught.value).startswith(variable), str(caught.value)
