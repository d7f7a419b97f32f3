"""The token cache (tokenstore.TokenStore) against a scripted source, and the database URLs.

The source is a stand-in with a gate, so that the tests decide when a query answers: these are
the cache's rules. tests/integration/test_token_store.py checks the same rules end to end on the
real PostgreSQL and MariaDB.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

import tokenstore
from common.config import ConfigError
from tokenstore import (DatabaseError, MySQLDatabase, PostgresDatabase, TokenInfo, TokenStore, TokenStoreUnavailable,
                        database_class, hash_token)
from tests.helpers import FakeClock

ALICE = TokenInfo("alice", 5, 10)


class ScriptedSource:
    """Answers from `tokens`; holds every query while `gate` is closed; fails while `failing`."""

    def __init__(self) -> None:
        self.tokens = {hash_token("sk-alice"): ALICE}
        self.queries = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.failing = False

    async def find_token(self, digest: str) -> TokenInfo | None:
        self.queries += 1
        await self.gate.wait()
        if self.failing:
            raise DatabaseError("Lost connection to the server")
        return self.tokens.get(digest)

    async def ping(self) -> None:
        if self.failing:
            raise DatabaseError("Lost connection to the server")

    async def close(self) -> None:
        return None


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(tokenstore, "monotonic", clock)
    return clock


async def test_a_known_token_is_cached_for_the_cache_time(clock: FakeClock) -> None:
    source = ScriptedSource()
    store = TokenStore(30, source)
    assert await store.lookup(b"sk-alice") == ALICE
    clock.now += 29
    assert await store.lookup(b"sk-alice") == ALICE
    assert source.queries == 1
    clock.now += 2
    assert await store.lookup(b"sk-alice") == ALICE
    assert source.queries == 2


async def test_an_unknown_token_is_remembered_for_a_few_seconds_only(clock: FakeClock) -> None:
    source = ScriptedSource()
    store = TokenStore(30, source)
    assert await store.lookup(b"sk-nobody") is None
    assert await store.lookup(b"sk-nobody") is None
    assert source.queries == 1
    clock.now += tokenstore.TOKEN_MISS_CACHE_S + 0.1  # a token created meanwhile works soon
    assert await store.lookup(b"sk-nobody") is None
    assert source.queries == 2


async def test_concurrent_misses_of_one_token_share_one_query() -> None:
    source = ScriptedSource()
    source.gate.clear()
    store = TokenStore(30, source)
    waiting = [asyncio.create_task(store.lookup(b"sk-alice")) for _ in range(10)]
    await asyncio.sleep(0)
    source.gate.set()
    assert await asyncio.gather(*waiting) == [ALICE] * 10
    assert source.queries == 1


async def test_a_cancelled_request_does_not_cancel_the_query_others_wait_for() -> None:
    source = ScriptedSource()
    source.gate.clear()
    store = TokenStore(30, source)
    leaving, staying = (asyncio.create_task(store.lookup(b"sk-alice")) for _ in range(2))
    await asyncio.sleep(0)
    leaving.cancel()
    source.gate.set()
    assert await staying == ALICE
    assert leaving.cancelled() and source.queries == 1


async def test_a_failure_is_unavailable_for_every_waiter_and_not_cached(caplog: pytest.LogCaptureFixture) -> None:
    source = ScriptedSource()
    source.failing = True
    source.gate.clear()
    store = TokenStore(30, source)
    waiting = [asyncio.create_task(store.lookup(b"sk-alice")) for _ in range(3)]
    await asyncio.sleep(0)
    source.gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(result, TokenStoreUnavailable) for result in results)
    assert source.queries == 1

    source.failing = False
    assert await store.lookup(b"sk-alice") == ALICE  # asked again, not an unknown token
    assert source.queries == 2


async def test_an_outage_is_logged_once_and_so_is_the_recovery(caplog: pytest.LogCaptureFixture) -> None:
    source = ScriptedSource()
    store = TokenStore(30, source)
    source.failing = True
    with caplog.at_level(logging.INFO, logger="tokenstore"):
        for token in (b"sk-1", b"sk-2", b"sk-3"):
            with pytest.raises(TokenStoreUnavailable):
                await store.lookup(token)
        assert not await store.is_ready()
        source.failing = False
        assert await store.is_ready()
        assert await store.lookup(b"sk-alice") == ALICE
    assert [(r.levelname, r.getMessage().split(" (")[0]) for r in caplog.records] == [
        ("WARNING", "token database unreachable"), ("INFO", "token database reachable again")]
    assert "Lost connection to the server" in caplog.records[0].getMessage()


async def test_a_query_that_hangs_is_unavailable_after_the_lookup_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenstore, "LOOKUP_TIMEOUT_S", 0.01)
    source = ScriptedSource()
    source.gate.clear()
    with pytest.raises(TokenStoreUnavailable):
        await TokenStore(30, source).lookup(b"sk-alice")


async def test_before_the_database_connects_lookups_are_unavailable_and_readiness_red() -> None:
    store = TokenStore(30)
    with pytest.raises(TokenStoreUnavailable):
        await store.lookup(b"sk-alice")
    assert not await store.is_ready()


async def test_every_query_is_counted_by_result() -> None:
    source = ScriptedSource()
    counted: list[str] = []
    store = TokenStore(30, source, on_query=counted.append)
    await store.lookup(b"sk-alice")
    await store.lookup(b"sk-alice")
    await store.lookup(b"sk-nobody")
    source.failing = True
    with pytest.raises(TokenStoreUnavailable):
        await store.lookup(b"sk-other")
    assert counted == ["found", "unknown", "failed"]


# ---------------------------------------------------------------------------------------------
# DATABASE_URL

@pytest.mark.parametrize(("url", "dialect"), [
    ("postgresql://u:p@db:5432/dispatcher", PostgresDatabase),
    ("postgres://u@db/dispatcher?sslmode=require", PostgresDatabase),
    ("mysql://u:p@db:3306/dispatcher", MySQLDatabase),
    ("MySQL://u@db/dispatcher", MySQLDatabase),
])
def test_database_url_scheme_picks_the_dialect(url: str, dialect: type) -> None:
    assert database_class(url) is dialect


def test_mysql_url_gives_the_connection_settings() -> None:
    assert MySQLDatabase.check_url("mysql://app%40x:p%2Fw%3Ard@db.example:3307/tokens") == {
        "host": "db.example", "port": 3307, "user": "app@x", "password": "p/w:rd", "db": "tokens"}
    assert MySQLDatabase.check_url("mysql://app@db/tokens")["port"] == 3306


@pytest.mark.parametrize(("url", "fragment"), [
    pytest.param("sqlite:///tokens.db", "postgresql:// or mysql://", id="unknown-scheme"),
    pytest.param("db:5432", "postgresql:// or mysql://", id="no-scheme"),
    pytest.param("postgresql://u:secret@db:99999/x", "Port", id="port-out-of-range"),
    pytest.param("mysql://u:secret@db:port/x", "Port", id="port-not-a-number"),
    pytest.param("mysql://u:secret@db:3306", "needs a user and a database", id="mysql-no-database"),
    pytest.param("mysql://db:3306/x", "needs a user and a database", id="mysql-no-user"),
    pytest.param("mysql://u:secret@db/x/y", "needs a user and a database", id="mysql-nested-path"),
    pytest.param("mysql://u:secret@db/x?ssl-mode=REQUIRED", "TLS is not supported", id="mysql-parameters"),
])
def test_bad_database_url_is_a_config_error_without_the_password(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        database_class(url)
    assert fragment in str(caught.value) and "DATABASE_URL" in str(caught.value)
    assert "secret" not in str(caught.value)
