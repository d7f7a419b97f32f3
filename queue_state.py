"""What the senders know together about each model's queue: who waits, who runs, how fast grants come.

The threshold check, the per-token cap, fair share, `Retry-After` and `GET /v1/queue` all need counts
over every sender, and none may cost a broker round trip on the request path. So each sender keeps
its own counts in memory (`QueueState`: a few dict increments per request), publishes a snapshot of
them every STATE_INTERVAL_S on the fanout exchange STATE_EXCHANGE, and keeps the latest snapshot of
every other sender. A snapshot counts for STATE_TTL_S only: a sender that stops (or restarts, with a
new id) leaves no stale count behind. The lag across senders is one interval plus a delivery.

Counted per model: requests waiting for a grant, by priority and by token name; requests running (a
grant held, the response not finished), by token name; grants received over the last
GRANT_RATE_WINDOW_S, from which the model's grant rate follows. Token names, never tokens.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import orjson

STATE_EXCHANGE = "dispatcher.state"
STATE_INTERVAL_S = 0.25
STATE_TTL_S = 2.0
GRANT_RATE_WINDOW_S = 30.0
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1, 3600


@dataclass(slots=True)
class ModelCounts:
    """One sender's counts for one model."""
    waiting: Counter[tuple[str, int]] = field(default_factory=Counter)  # (token name, priority) -> requests
    running: Counter[str] = field(default_factory=Counter)              # token name -> requests
    grants: deque[float] = field(default_factory=deque)                 # monotonic times, last window

    def grant_count(self, now: float) -> int:
        while self.grants and self.grants[0] <= now - GRANT_RATE_WINDOW_S:
            self.grants.popleft()
        return len(self.grants)

    def is_empty(self, now: float) -> bool:
        return not self.waiting and not self.running and not self.grant_count(now)


@dataclass(slots=True)
class Snapshot:
    """Another sender's counts, as it last published them."""
    expires: float
    window_s: float
    models: dict[str, dict[str, Any]]


class QueueState:
    def __init__(self, sender_id: str, clock: Any = time.monotonic) -> None:
        self.sender_id = sender_id
        self._clock = clock
        self._started = clock()
        self._own: dict[str, ModelCounts] = {}
        self._others: dict[str, Snapshot] = {}

    # -- this sender's requests (the request path) --

    def _counts(self, model: str) -> ModelCounts:
        counts = self._own.get(model)
        if counts is None:
            counts = self._own[model] = ModelCounts()
        return counts

    def add_waiting(self, model: str, token: str, priority: int) -> None:
        self._counts(model).waiting[token, priority] += 1

    def remove_waiting(self, model: str, token: str, priority: int) -> None:
        waiting = self._counts(model).waiting
        waiting[token, priority] -= 1
        if waiting[token, priority] <= 0:
            del waiting[token, priority]

    def add_running(self, model: str, token: str) -> None:
        counts = self._counts(model)
        counts.running[token] += 1
        counts.grants.append(self._clock())

    def remove_running(self, model: str, token: str) -> None:
        running = self._counts(model).running
        running[token] -= 1
        if running[token] <= 0:
            del running[token]

    # -- the counts over every sender (read on the request path: no I/O) --

    def _fresh_others(self) -> list[Snapshot]:
        if not self._others:  # one sender: nothing to look at, several times a request
            return []
        now = self._clock()
        for sender in [sender for sender, snapshot in self._others.items() if snapshot.expires <= now]:
            del self._others[sender]
        return list(self._others.values())

    def waiting(self, model: str, *, at_least: int = 0, token: str | None = None) -> int:
        """Requests waiting for `model` over all senders: all of them, or those of priority
        `at_least` and above, or those of one token."""
        total = 0
        own = self._own.get(model)
        if own is not None:
            total += sum(n for (name, priority), n in own.waiting.items()
                         if priority >= at_least and (token is None or name == token))
        for snapshot in self._fresh_others():
            for priority, by_token in snapshot.models.get(model, {}).get("waiting", {}).items():
                if int(priority) >= at_least:
                    total += by_token.get(token, 0) if token is not None else sum(by_token.values())
        return total

    def running(self, model: str, *, token: str | None = None) -> int:
        total = 0
        own = self._own.get(model)
        if own is not None:
            total += own.running.get(token, 0) if token is not None else sum(own.running.values())
        for snapshot in self._fresh_others():
            running = snapshot.models.get(model, {}).get("running", {})
            total += running.get(token, 0) if token is not None else sum(running.values())
        return total

    def outstanding(self, model: str, token: str) -> int:
        """The token's requests for `model`, waiting or running, over all senders."""
        return self.waiting(model, token=token) + self.running(model, token=token)

    def grant_rate(self, model: str) -> float | None:
        """Grants per second for `model` over the last 30 s, all senders; None before any grant."""
        now = self._clock()
        rate = 0.0
        own = self._own.get(model)
        if own is not None and (count := own.grant_count(now)):
            rate += count / max(1.0, min(GRANT_RATE_WINDOW_S, now - self._started))
        for snapshot in self._fresh_others():
            count = snapshot.models.get(model, {}).get("grants", 0)
            if count:
                rate += count / max(1.0, snapshot.window_s)
        return rate or None

    def estimated_wait_s(self, model: str, ahead: int) -> float | None:
        """How long `ahead` requests take to be granted at the model's measured rate (None: no rate yet)."""
        rate = self.grant_rate(model)
        return None if rate is None else ahead / rate

    # -- snapshots --

    def snapshot(self) -> bytes:
        """This sender's counts, to publish on STATE_EXCHANGE."""
        now = self._clock()
        models: dict[str, Any] = {}
        for model, counts in list(self._own.items()):
            if counts.is_empty(now):
                del self._own[model]
                continue
            waiting: dict[str, dict[str, int]] = {}
            for (token, priority), n in counts.waiting.items():
                waiting.setdefault(str(priority), {})[token] = n
            models[model] = {"waiting": waiting, "running": dict(counts.running),
                             "grants": counts.grant_count(now)}
        return orjson.dumps({"sender": self.sender_id, "ttl_s": STATE_TTL_S,
                             "window_s": min(GRANT_RATE_WINDOW_S, now - self._started), "models": models})

    def on_snapshot(self, body: bytes) -> None:
        """Keeps another sender's snapshot; raises ValueError if it is malformed."""
        try:
            message = orjson.loads(body)
            sender, ttl_s, window_s, models = (message["sender"], float(message["ttl_s"]),
                                               float(message["window_s"]), message["models"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed queue state: {exc}") from None
        if not isinstance(sender, str) or not math.isfinite(ttl_s) or not is_valid_models(models):
            raise ValueError("malformed queue state")
        if sender == self.sender_id:
            return  # our own counts are live in memory
        self._others[sender] = Snapshot(self._clock() + min(ttl_s, STATE_TTL_S), window_s, models)

    def forget(self, sender: str) -> None:
        self._others.pop(sender, None)


def is_valid_models(models: Any) -> bool:
    """The shape `snapshot` writes, checked before it is read on the request path."""
    def is_count_map(value: Any) -> bool:
        return isinstance(value, dict) and all(type(n) is int for n in value.values())

    if not isinstance(models, dict):
        return False
    for counts in models.values():
        if not isinstance(counts, dict) or type(counts.get("grants", 0)) is not int:
            return False
        waiting, running = counts.get("waiting", {}), counts.get("running", {})
        if not is_count_map(running) or not isinstance(waiting, dict):
            return False
        if not all(priority.lstrip("-").isdigit() and is_count_map(by_token) for priority, by_token in waiting.items()):
            return False
    return True


def retry_after_s(estimate_s: float | None, default_s: int) -> int:
    """Whole seconds for a Retry-After header: the estimate rounded up, within 1 s to 1 h."""
    if estimate_s is None:
        return default_s
    return max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, math.ceil(estimate_s)))
