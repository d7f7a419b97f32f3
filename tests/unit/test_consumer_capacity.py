"""The consumer's decisions (no I/O): which server, may I grant now (the speed rule), which slots are
really in use (reconciliation with vLLM's counts); and its configuration."""

from __future__ import annotations

import math

import prometheus_client as prom
import pytest

import consumer
from common.config import ConfigError
from consumer import Capacity, Config, MetricsSample, ServerSpec

LEASE_TIMEOUT_S = 3600.0
GRACE_S = 1.0


def make_capacity(*servers: tuple[str, int], healthy: bool = True, min_speed: float = 0.0,
                  lease_timeout_s: float = LEASE_TIMEOUT_S, rate_window_readings: int = 2,
                  burst: int = consumer.DEFAULT_BURST_GRANTS) -> Capacity:
    """Servers read once at t=0 with nothing running (healthy ones)."""
    capacity = Capacity([ServerSpec(url, None, cap) for url, cap in servers], lease_timeout_s,
                        min_speed=min_speed, lease_grace_s=GRACE_S, rate_window_readings=rate_window_readings,
                        burst=burst)
    for url, _ in servers:
        capacity.set_health(url, healthy, 0.0)
        if healthy:
            capacity.record_sample(url, MetricsSample(0, 0, 0), 0.0)
    return capacity


def server_of(capacity: Capacity, url: str) -> consumer.Server:
    return next(s for s in capacity.servers if s.url == url)


def fill(capacity: Capacity, url: str, count: int, now: float = 0.0) -> list[str]:
    server = server_of(capacity, url)
    return [capacity.grant(server, now) for _ in range(count)]


def read(capacity: Capacity, url: str, at: float, running: float, waiting: float = 0, generated: float = 0,
         prompt: float = 0) -> consumer.SampleOutcome:
    return capacity.record_sample(url, MetricsSample(running, waiting, generated, prompt), at)


def blocked(capacity: Capacity, url: str = "a") -> str | None:
    return server_of(capacity, url).blocked_reason(capacity.min_speed)


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


def test_pick_server_counts_requests_vllm_runs_for_others():
    """Headroom is the cap minus our leases and the requests vLLM runs that none of them explains."""
    capacity = make_capacity(("a", 8), ("b", 8))
    fill(capacity, "b", 2, now=0.5)
    read(capacity, "a", 1.0, running=5)
    read(capacity, "b", 1.0, running=2)
    assert (server_of(capacity, "a").load, server_of(capacity, "b").load) == (5, 2)
    assert capacity.pick_server() is server_of(capacity, "b")


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


def test_no_grant_before_the_first_metrics_reading():
    """Healthy by /health alone is not enough: what already runs on vLLM is not known yet."""
    capacity = Capacity([ServerSpec("a", None, 4)], LEASE_TIMEOUT_S)
    capacity.set_health("a", True, 0.0)
    assert blocked(capacity) == "unhealthy" and not capacity.is_any_healthy()
    read(capacity, "a", 0.1, running=0)
    assert capacity.has_room() and capacity.is_any_healthy()


def test_unhealthy_server_loses_its_figures():
    capacity = make_capacity(("a", 4), min_speed=10)
    read(capacity, "a", 1.0, running=1, generated=50)
    capacity.set_health("a", False, 2.0)
    assert capacity.servers[0].sample is None and capacity.servers[0].generation_rate() is None
    capacity.set_health("a", True, 3.0)
    assert blocked(capacity) == "unhealthy"  # until it is read again


def test_grant_returns_unique_leases_with_prefix():
    capacity = Capacity([ServerSpec("a", None, 3)], LEASE_TIMEOUT_S, lease_prefix="c1.")
    capacity.set_health("a", True, 0.0)
    read(capacity, "a", 0.0, running=0)
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


def test_release_frees_the_slot_before_the_next_reading():
    """vLLM's last reading still shows the request; the release counts at once all the same."""
    capacity = make_capacity(("a", 2))
    first, _ = fill(capacity, "a", 2, now=0.5)
    read(capacity, "a", 1.0, running=2)
    assert blocked(capacity) == "full"
    capacity.release(first)
    assert capacity.servers[0].load == 1 and capacity.has_room()


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


# -- the speed rule -----------------------------------------------------------------------------

# Readings one second apart; the rate is taken between the last two (rate_window_readings=2).
# Each case: (running, waiting, generated[, prompt] tokens) at t=0 and t=1, our leases at t=1 (granted before
# the reading), then grants after it; the expected reason once those grants are made. The burst is 4.
SPEED_RULE_CASES = pytest.mark.parametrize("min_speed, first, second, leases, new, expected", [
    (0, (0, 0, 0), (3, 0, 30), 3, 0, None),                # rule off: 1 token/s each is fine
    (10, (0, 0, 0), (0, 0, 0), 0, 0, None),                # nothing running always qualifies
    (10, (4, 0, 0), (4, 0, 200), 4, 0, None),              # 200 tok/s over 4 running: 50 each
    (10, (4, 0, 0), (4, 0, 200), 4, 3, None),              # 200 / 7 = 28 each, granted since count as running
    (10, (4, 0, 0), (4, 0, 36), 4, 0, "speed"),            # 9 each
    (10, (4, 0, 0), (4, 0, 40), 4, 0, None),               # exactly the floor
    (10, (4, 0, 0), (4, 0, 44), 4, 1, "speed"),            # 11 each, but 44 / 5 < 10 with the new one
    (10, (4, 0, 0), (4, 1, 400), 4, 0, "vllm_waiting"),    # fast, but vLLM queues already
    (0, (4, 0, 0), (4, 1, 400), 4, 0, "vllm_waiting"),     # also with the rule off
    (10, (1, 0, 0), (1, 0, 1000), 1, 4, "burst"),          # fast, but 4 new since the reading
    (10, (8, 0, 0), (8, 0, 8000), 8, 7, None),             # the load may double per reading...
    (10, (8, 0, 0), (8, 0, 8000), 8, 8, "burst"),          # ...not more
    (10, (0, 0, 50), (0, 0, 50), 0, 1, None),              # an idle server takes a burst before any speed is known...
    (10, (0, 0, 50), (0, 0, 50), 0, 3, None),
    (10, (0, 0, 50), (0, 0, 50), 0, 4, "burst"),           # ...of 4, then waits for a reading
    (10, (0, 0, 0), (1, 0, 0), 1, 0, None),                # a fresh server: requests started within the window...
    (10, (0, 0, 0), (2, 0, 4), 2, 1, None),                # ...say nothing about their speed yet
    (10, (0, 0, 0), (2, 0, 4), 2, 2, "speed"),             # beyond the burst, the rate over the load decides
    (10, (2, 0, 0), (2, 0, 10), 2, 0, "speed"),            # 5 each, measured over a whole window: too slow
    (10, (1, 0, 0), (1, 0, 24), 1, 2, None),               # 24 alone: a handful run at about that speed each...
    (10, (1, 0, 0), (1, 0, 24), 1, 3, "speed"),            # ...but beyond the burst, 24 / 4 < 10
    (10, (2, 0, 0, 9), (2, 0, 0, 90), 2, 0, None),         # prompts read, no token ever generated: pooling...
    (10, (2, 0, 0, 9), (2, 0, 0, 90), 2, 2, None),
    (10, (2, 0, 0, 9), (2, 0, 0, 90), 2, 4, "burst"),      # ...still bounded per reading
    (10, (2, 0, 100), (3, 0, 100), 3, 0, "speed"),         # nothing generated in the window
    (0, (0, 0, 0), (5, 0, 0), 5, 0, "full"),               # cap 5
], ids=["off", "idle", "fast", "fast-with-new", "slow", "at-floor", "new-ones-count", "vllm-waiting",
        "vllm-waiting-rule-off", "burst", "doubling", "more-than-double", "idle-then-one", "idle-then-three",
        "idle-then-four", "fresh", "just-started", "just-started-beyond-burst", "slow-below-burst",
        "fast-alone-takes-a-handful", "fast-alone-beyond-burst", "pooling", "pooling-new", "pooling-burst",
        "stalled", "full"])


def speed_rule_case(min_speed, first, second, leases, new, expected) -> Capacity:
    capacity = make_capacity(("a", 5 if expected == "full" else 64), min_speed=min_speed)
    read(capacity, "a", 0.0, *first)
    capacity.min_speed = 0  # the leases already running were granted under other conditions
    fill(capacity, "a", leases, now=0.5)
    capacity.min_speed = min_speed
    read(capacity, "a", 1.0, *second)
    fill(capacity, "a", new, now=1.5)   # each of them allowed by the rule
    return capacity


@SPEED_RULE_CASES
def test_speed_rule(min_speed, first, second, leases, new, expected):
    capacity = speed_rule_case(min_speed, first, second, leases, new, expected)
    assert blocked(capacity) == expected


@SPEED_RULE_CASES
def test_room_is_the_number_of_grants_the_rule_allows_in_a_row(min_speed, first, second, leases, new, expected):
    """`room` (which sizes the prefetch) must agree with the rule itself, grant by grant."""
    capacity = speed_rule_case(min_speed, first, second, leases, new, expected)
    server = capacity.servers[0]
    room = capacity.room()
    granted = 0
    while capacity.can_take(server):
        capacity.grant(server, 1.5)
        granted += 1
        assert capacity.room() == room - granted
    assert granted == room


@pytest.mark.parametrize("burst", [1, 2, 4, 8])
def test_idle_server_takes_a_burst_of_the_configured_size_before_its_next_reading(burst):
    """BURST_GRANTS requests at once on an idle server, then nothing until vLLM's figures show their speed."""
    capacity = make_capacity(("a", 64), min_speed=10, burst=burst)
    server = capacity.servers[0]
    assert capacity.room() == burst
    fill(capacity, "a", burst, now=0.5)
    assert blocked(capacity) == "burst"
    read(capacity, "a", 1.0, running=burst, generated=20 * burst)  # 20 tok/s each, window started idle
    assert server.measured_speed() is None
    read(capacity, "a", 2.0, running=burst, generated=40 * burst)  # a whole window with all of them running
    assert server.measured_speed() == pytest.approx(20.0)
    # 20 * burst tok/s would keep 2 * burst at the floor of 10: as many again, the load at most doubling.
    assert capacity.room() == burst


def test_burst_waits_for_a_release_once_a_reading_shows_the_running_ones_too_slow():
    """Below the burst size, a speed measured over a whole window under the floor still says no; the rate
    shared by fewer requests after a release says yes again."""
    capacity = make_capacity(("a", 64), min_speed=10)
    first, *_ = fill(capacity, "a", 3, now=0.5)
    read(capacity, "a", 1.0, running=3)
    read(capacity, "a", 2.0, running=3, generated=18)      # 6 tok/s each
    assert blocked(capacity) == "speed" and capacity.room() == 0
    capacity.release(first)
    assert blocked(capacity) == "speed"                   # 18 / 2 = 9 each
    capacity.release(next(iter(capacity.servers[0].leases)))
    assert blocked(capacity) is None and capacity.room() == 18 // 10   # 18 / 1, 18 / 2 would be under 10


def test_burst_stays_below_the_load_a_reading_found_too_slow_until_one_finds_it_fast_enough():
    """A server that showed 3 requests below the floor takes at most 2 at once when it is idle again;
    a later reading of 3 at the floor gives it its whole burst back, and so does a restart of vLLM."""
    capacity = make_capacity(("a", 64), min_speed=10)
    server = capacity.servers[0]
    leases = fill(capacity, "a", 3, now=0.5)
    read(capacity, "a", 1.0, running=3, generated=10)
    read(capacity, "a", 2.0, running=3, generated=28)      # 6 tok/s each over a whole window
    assert server.burst_size(10) == 2
    for lease in leases:
        capacity.release(lease)
    read(capacity, "a", 3.0, running=0, generated=40)
    read(capacity, "a", 4.0, running=0, generated=40)
    assert server.measured_speed() is None and capacity.room() == 2
    capacity.min_speed = 0  # three granted anyway, as if the floor had been off
    leases = fill(capacity, "a", 3, now=4.5)
    capacity.min_speed = 10
    read(capacity, "a", 5.0, running=3, generated=50)
    read(capacity, "a", 6.0, running=3, generated=80)      # 10 tok/s each
    assert server.burst_size(10) == 4 and capacity.room() == 1
    read(capacity, "a", 7.0, running=3, generated=10)      # vLLM restarted: its counters went down
    assert server.measured is None and server.burst_size(10) == 4


def test_room_adds_up_over_servers_and_ignores_unhealthy_ones():
    capacity = make_capacity(("a", 10), ("b", 30), ("c", 50))
    fill(capacity, "b", 5)
    capacity.set_health("c", False, 1.0)
    assert capacity.room() == 10 + 25


def test_speed_rule_ramps_up_then_holds_at_the_floor():
    """A fake GPU whose total rate grows as sqrt(running): 40 tok/s alone, so 40/sqrt(n) each.
    Granting whenever allowed settles where each request still gets about the floor, 10 tok/s."""
    capacity = make_capacity(("a", 64), min_speed=10)
    server = capacity.servers[0]
    generated = 0.0
    for second in range(1, 40):
        running = server.load
        generated += 40 * math.sqrt(running)
        read(capacity, "a", float(second), running=running, generated=generated)
        while capacity.can_take(server):
            capacity.grant(server, second + 0.5)
    assert server.load in (16, 17)   # 40/sqrt(16) = 10 tok/s each; the rule grants while it is at least 10
    assert 40 / math.sqrt(server.load) >= 0.9 * 10


def test_speed_uses_the_rate_window():
    capacity = make_capacity(("a", 64), min_speed=10, rate_window_readings=3)
    server = capacity.servers[0]
    for at, total in ((1.0, 100), (2.0, 100), (3.0, 400)):
        read(capacity, "a", at, running=10, generated=total)
    assert server.generation_rate() == pytest.approx(150.0)  # over the last two seconds, not the last one
    assert server.speed_per_request() == pytest.approx(15.0)


def test_counter_reset_starts_the_rate_afresh():
    """vLLM restarted: its counters start from zero; no negative rate, no rate until the next reading."""
    capacity = make_capacity(("a", 64), min_speed=10)
    server = capacity.servers[0]
    read(capacity, "a", 1.0, running=4, generated=1000)
    read(capacity, "a", 2.0, running=4, generated=1100)
    outcome = read(capacity, "a", 3.0, running=4, generated=20)
    assert outcome.counters_reset
    assert server.generation_rate() is None and blocked(capacity) == "speed"
    read(capacity, "a", 4.0, running=4, generated=70)
    assert server.generation_rate() == 50 and blocked(capacity) is None


# -- reconciliation with vLLM's counts ----------------------------------------------------------

def test_lost_release_frees_the_slot_once_vllm_reports_the_request_gone():
    """Gone at two readings in a row: the release was lost (one reading could be a release on its way)."""
    capacity = make_capacity(("a", 2))
    fill(capacity, "a", 2, now=0.0)
    read(capacity, "a", 2.0, running=2)
    assert blocked(capacity) == "full"
    assert read(capacity, "a", 3.0, running=1).freed == []   # one request ended: its release may be coming
    outcome = read(capacity, "a", 4.0, running=1)             # it did not come
    assert len(outcome.freed) == 1 and capacity.servers[0].load == 1
    assert capacity.has_room()
    assert capacity.release(outcome.freed[0]) is None      # a late release of it changes nothing
    assert capacity.servers[0].load == 1


def test_release_on_its_way_is_not_counted_twice():
    """A reading between the end of a request in vLLM and its release: nothing is freed but by the release."""
    capacity = make_capacity(("a", 3))
    _, second, _ = fill(capacity, "a", 3, now=0.0)
    read(capacity, "a", 2.0, running=3)
    assert read(capacity, "a", 3.0, running=2).freed == []
    capacity.release(second)
    assert read(capacity, "a", 4.0, running=2).freed == []
    assert capacity.servers[0].load == 2


def test_young_lease_is_not_freed_before_it_can_reach_vllm():
    capacity = make_capacity(("a", 1))
    [lease] = fill(capacity, "a", 1, now=10.0)
    for at in (10.2, 10.6, 10.0 + GRACE_S - 0.01):           # within the grace period
        assert read(capacity, "a", at, running=0).freed == []
    assert not capacity.has_room()
    assert read(capacity, "a", 10.0 + GRACE_S + 0.01, running=0).freed == []
    assert read(capacity, "a", 10.0 + GRACE_S + 0.2, running=0).freed == [lease]
    assert capacity.has_room()


def test_waiting_requests_count_as_present():
    capacity = make_capacity(("a", 4))
    fill(capacity, "a", 3, now=0.0)
    for at in (5.0, 5.5):
        assert read(capacity, "a", at, running=1, waiting=2).freed == []
    read(capacity, "a", 6.0, running=1, waiting=1)
    assert read(capacity, "a", 6.5, running=1, waiting=1).freed != []
    assert capacity.servers[0].in_flight == 2


def test_restarted_consumer_counts_what_vllm_already_runs():
    capacity = make_capacity(("a", 4))
    read(capacity, "a", 1.0, running=3, waiting=0)
    server = capacity.servers[0]
    assert (server.in_flight, server.foreign, server.headroom) == (0, 3, 1)
    capacity.grant(server, 1.5)
    assert blocked(capacity) == "full"
    read(capacity, "a", 2.0, running=4)                     # ours arrived: still 4 in all
    assert blocked(capacity) == "full"
    read(capacity, "a", 3.0, running=2)                     # two of the old ones ended
    assert (server.foreign, server.headroom) == (1, 2)


def test_lease_not_yet_in_vllm_is_not_counted_twice():
    capacity = make_capacity(("a", 2))
    fill(capacity, "a", 1, now=0.9)
    read(capacity, "a", 1.0, running=0)                     # granted, not arrived yet
    assert capacity.servers[0].load == 1
    read(capacity, "a", 1.2, running=1)                     # arrived
    assert capacity.servers[0].load == 1


def test_stale_gauges_are_taken_as_zero():
    """vLLM keeps its last running/waiting after every request was aborted, until an engine step."""
    capacity = make_capacity(("a", 2))
    fill(capacity, "a", 2, now=0.0)
    read(capacity, "a", 1.0, running=2, generated=10)
    assert read(capacity, "a", 10.0, running=2, generated=10).freed == []
    assert read(capacity, "a", 1.0 + consumer.STALE_GAUGES_S, running=2, waiting=1, generated=10).gauges_stale
    outcome = read(capacity, "a", 2.0 + consumer.STALE_GAUGES_S, running=2, waiting=1, generated=10)
    assert outcome.gauges_stale and len(outcome.freed) == 2
    assert capacity.has_room()
    moved = read(capacity, "a", 3.0 + consumer.STALE_GAUGES_S, running=1, generated=11)
    assert not moved.gauges_stale and capacity.servers[0].load == 1


# -- lease expiry: a safety net for bookkeeping only --------------------------------------------

@pytest.mark.parametrize("now, expired_count", [
    (0.0, 0), (3599.9, 0), (3600.0, 1), (3650.0, 2), (10_000.0, 3),
], ids=["at-grant", "just-before", "at-timeout", "two-old", "all"])
def test_expire_leases_forgets_leases_after_lease_timeout(now, expired_count):
    capacity = make_capacity(("a", 3))
    server = capacity.servers[0]
    leases = [capacity.grant(server, granted_at) for granted_at in (0.0, 50.0, 100.0)]
    expired = capacity.expire_leases(now)
    assert [lease for lease, _ in expired] == leases[:expired_count]
    assert server.in_flight == 3 - expired_count
    for lease in leases[:expired_count]:
        assert capacity.release(lease) is None  # a late release of an expired lease is ignored


def test_expired_lease_still_running_keeps_its_slot():
    """The timer forgets the lease, but vLLM still runs the request: it keeps its slot."""
    capacity = make_capacity(("a", 1), lease_timeout_s=5.0)
    fill(capacity, "a", 1, now=10.0)
    read(capacity, "a", 14.0, running=1)
    capacity.expire_leases(15.0)
    assert capacity.servers[0].in_flight == 0 and not capacity.has_room()
    read(capacity, "a", 15.1, running=1)
    assert not capacity.has_room()
    read(capacity, "a", 16.0, running=0)
    assert capacity.pick_server() is capacity.servers[0]


# -- health and metrics -----------------------------------------------------------------------

def test_set_health_reports_changes_only():
    capacity = make_capacity(("a", 1), healthy=False)
    assert capacity.set_health("a", True, 1.0) is True
    assert capacity.set_health("a", True, 2.0) is False
    assert capacity.servers[0].health_changed_at == 1.0
    assert capacity.set_health("a", False, 3.0) is True
    assert not capacity.is_any_healthy()


def test_record_sample_keeps_last_sample():
    capacity = make_capacity(("a", 1))
    sample = MetricsSample(running=2, waiting=0, generation_tokens_total=100)
    capacity.record_sample("a", sample, 5.0)
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
        "# TYPE vllm:prompt_tokens counter\n"
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 50.0\n'
    )
    assert consumer.parse_vllm_metrics(text) == MetricsSample(5.0, 1.0, 1234.0, 50.0)
    assert consumer.parse_vllm_metrics("# nothing of vLLM\nother_metric 1\n") is None
    assert consumer.parse_vllm_metrics('vllm:generation_tokens_total{engine="0"} 5.0\n') is None


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


def test_metrics_show_why_a_server_takes_nothing():
    """What an operator sees when the GPU is saturated: the speed each user gets, and the reason."""
    registry = prom.CollectorRegistry()
    url = "http://a:1"
    capacity = make_capacity((url, 8), min_speed=10)
    consumer.Metrics.create(registry, capacity)
    capacity.min_speed = 0
    fill(capacity, url, 4, now=0.5)
    capacity.min_speed = 10
    read(capacity, url, 1.0, running=4)
    read(capacity, url, 2.0, running=4, generated=36)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"server": url, **labels})

    assert value("dispatcher_consumer_tokens_per_second_per_request") == pytest.approx(9.0)
    assert value("dispatcher_consumer_generation_tokens_per_second") == pytest.approx(36.0)
    assert (value("dispatcher_consumer_vllm_running"), value("dispatcher_consumer_slots_used")) == (4.0, 4.0)
    assert value("dispatcher_consumer_blocked", reason="speed") == 1.0
    assert value("dispatcher_consumer_blocked", reason="full") == 0.0
    assert value("dispatcher_consumer_slots_cap") == 8.0
    assert registry.get_sample_value("dispatcher_consumer_min_tokens_per_second_per_user") == 10.0
    capacity.set_health(url, False, 3.0)
    assert value("dispatcher_consumer_blocked", reason="unhealthy") == 1.0
    assert math.isnan(value("dispatcher_consumer_tokens_per_second_per_request"))


# -- configuration ------------------------------------------------------------------------------

def test_config_defaults():
    config = Config.from_env({"MODEL": "m"})
    assert config.servers == (ServerSpec("http://localhost:8000", None, consumer.DEFAULT_MAX_PARALLEL_REQUESTS),)
    assert (config.min_tokens_per_second_per_user, config.metrics_refresh_s, config.rpc_queue_expiration_ms,
            config.probe_port, config.max_vllm_connection_attempts, config.forward_priority,
            config.lease_timeout_s, config.rpc_reconnect_attempts, config.max_priority, config.burst_grants) == \
        (10.0, 1.0, 30_000, 8081, 100, False, 3600.0, 10, 10, 4)
    assert Config.from_env({"MODEL": "m", "BURST_GRANTS": "1"}).burst_grants == 1
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
    ({"BURST_GRANTS": "0"}, "BURST_GRANTS"),
    ({"BURST_GRANTS": "2.5"}, "BURST_GRANTS"),
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
