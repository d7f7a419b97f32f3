"""queue_state.py: the counts senders share, the estimates drawn from them, and what a snapshot may hold."""

from __future__ import annotations

import orjson
import pytest

from queue_state import GRANT_RATE_WINDOW_S, STATE_TTL_S, QueueState, retry_after_s
from tests.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_counts_add_up_own_and_other_senders(clock: FakeClock) -> None:
    a, b = QueueState("a", clock), QueueState("b", clock)
    a.add_waiting("m", "alice", 5)
    a.add_waiting("m", "bob", 1)
    b.add_waiting("m", "alice", 9)
    b.add_running("m", "alice")
    a.on_snapshot(b.snapshot())
    assert a.waiting("m") == 3
    assert a.waiting("m", at_least=5) == 2
    assert a.waiting("m", token="alice") == 2
    assert a.running("m") == 1
    assert a.outstanding("m", "alice") == 3
    assert a.outstanding("m", "bob") == 1
    assert a.waiting("other-model") == 0


def test_requests_that_leave_stop_counting(clock: FakeClock) -> None:
    state = QueueState("a", clock)
    state.add_waiting("m", "alice", 5)
    state.remove_waiting("m", "alice", 5)
    state.add_running("m", "alice")
    state.remove_running("m", "alice")
    assert state.outstanding("m", "alice") == 0
    assert orjson.loads(state.snapshot())["models"] == {"m": {"waiting": {}, "running": {}, "grants": 1}}


def test_a_silent_sender_stops_counting_after_its_ttl(clock: FakeClock) -> None:
    """A sender that stops or restarts (with a new id) leaves no stale count behind."""
    a, b = QueueState("a", clock), QueueState("b", clock)
    b.add_waiting("m", "alice", 5)
    a.on_snapshot(b.snapshot())
    clock.now += STATE_TTL_S - 0.01
    assert a.waiting("m") == 1
    clock.now += 0.02
    assert a.waiting("m") == 0


def test_own_snapshot_is_not_counted_twice(clock: FakeClock) -> None:
    a = QueueState("a", clock)
    a.add_waiting("m", "alice", 5)
    a.on_snapshot(a.snapshot())
    assert a.waiting("m") == 1


def test_grant_rate_is_grants_over_the_window_of_all_senders(clock: FakeClock) -> None:
    a, b = QueueState("a", clock), QueueState("b", clock)
    assert a.grant_rate("m") is None and a.estimated_wait_s("m", 10) is None
    clock.now += GRANT_RATE_WINDOW_S  # both have run for a whole window
    for _ in range(30):
        a.add_running("m", "alice")
        b.add_running("m", "bob")
    a.on_snapshot(b.snapshot())
    assert a.grant_rate("m") == pytest.approx(2.0)
    assert a.estimated_wait_s("m", 10) == pytest.approx(5.0)
    clock.now += GRANT_RATE_WINDOW_S + 0.1
    a.on_snapshot(b.snapshot())
    assert a.grant_rate("m") is None  # old grants leave the window


def test_young_sender_measures_its_rate_over_its_life(clock: FakeClock) -> None:
    state = QueueState("a", clock)
    clock.now += 5
    for _ in range(10):
        state.add_running("m", "alice")
    assert state.grant_rate("m") == pytest.approx(2.0)


@pytest.mark.parametrize("body", [
    pytest.param(b"not json", id="not-json"),
    pytest.param(b"[]", id="not-object"),
    pytest.param(b'{"sender": "b", "ttl_s": 2, "window_s": 1}', id="no-models"),
    pytest.param(b'{"sender": "b", "ttl_s": 2, "window_s": 1, "models": {"m": {"waiting": {"x": {}}}}}',
                 id="priority-not-a-number"),
    pytest.param(b'{"sender": "b", "ttl_s": 2, "window_s": 1, "models": {"m": {"running": {"t": "1"}}}}',
                 id="count-not-an-integer"),
    pytest.param(b'{"sender": "b", "ttl_s": 2, "window_s": 1, "models": {"m": {"grants": 1.5}}}',
                 id="grants-not-an-integer"),
    pytest.param(b'{"sender": 5, "ttl_s": 2, "window_s": 1, "models": {}}', id="sender-not-a-string"),
])
def test_malformed_snapshot_is_refused_and_changes_nothing(clock: FakeClock, body: bytes) -> None:
    state = QueueState("a", clock)
    with pytest.raises(ValueError):
        state.on_snapshot(body)
    assert state.waiting("m") == 0


@pytest.mark.parametrize(("estimate", "default", "expected"), [
    pytest.param(None, 5, 5, id="no-rate-yet"),
    pytest.param(0.0, 5, 1, id="at-least-one-second"),
    pytest.param(2.1, 5, 3, id="rounded-up"),
    pytest.param(1e9, 5, 3600, id="at-most-an-hour"),
])
def test_retry_after_is_whole_seconds_within_bounds(estimate: float | None, default: int, expected: int) -> None:
    assert retry_after_s(estimate, default) == expected
