"""The sender and its token database, on PostgreSQL and on MariaDB: start-up before the database,
outages, cached and shared lookups, revocation, bad settings.

Clients see a database that cannot answer as 503 with `Retry-After`, never as 401 (their token
may be fine), and the sender's readiness follows the database. The database is reached through
a `TcpRelay` that the test opens and cuts. Each test runs on both servers, in a fresh database.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import openai
import pytest

from tests.helpers import TcpRelay, async_wait_until, free_port, wait_until
from tests.integration.conftest import (DATABASE_URL, MARIADB_URL, RABBITMQ_URL, ROOT, Database, Service, Stack,
                                        http_get, mariadb_connect, metric_value, server_fetch)

pytestmark = pytest.mark.integration

PROMPT = [{"role": "user", "content": "hello"}]
UNREACHABLE = "token database unreachable"


def relayed(url: str, port: int, kind: type[TcpRelay] = TcpRelay) -> tuple[str, TcpRelay]:
    """`url` through a relay (a `kind`) on `port` (not opened yet), and the relay."""
    parts = urllib.parse.urlsplit(url)
    relay = kind(parts.hostname or "127.0.0.1", parts.port or 5432, port)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return parts._replace(netloc=f"{user}127.0.0.1:{port}").geturl(), relay


def client(sender: Service, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=sender.url + "/v1", api_key=token, max_retries=0, timeout=30)


def assert_token_store_unavailable(sender: Service, token: str) -> None:
    """A request that needs the database gets 503 + Retry-After, not 401."""
    try:
        client(sender, token).models.list()
    except openai.InternalServerError as error:
        assert error.status_code == 503, error
        assert error.body["code"] == "token_store_unavailable", error.body
        assert 1 <= int(error.response.headers["retry-after"]) <= 60
    else:
        raise AssertionError("answered although the token database is unreachable")


def is_ready(sender: Service) -> bool:
    return http_get(sender.url + "/health/readiness")[0] == 200


def log_lines(sender: Service, fragment: str) -> list[str]:
    return [line for line in sender.log().splitlines() if fragment in line]


def test_sender_starts_before_its_database_and_serves_once_it_comes(
        stack: Stack, db: Database, unique_model: str) -> None:
    """Kubernetes may start the sender before the database: it waits, not ready, answering 503."""
    token = db.create("early")
    url, relay = relayed(db.url, free_port())  # nothing listens there yet
    try:
        fake = stack.fake_vllm(unique_model)
        stack.consumer(unique_model, fake.url)
        sender = stack.sender(health="/health/liveness", DATABASE_URL=url)

        assert not is_ready(sender)
        assert_token_store_unavailable(sender, token)

        relay.open()
        wait_until(lambda: is_ready(sender), timeout_s=20, what="readiness once the database is reachable")
        stack.served(sender, unique_model, token)
        answer = client(sender, token).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=3)
        assert answer.choices[0].message.content
    finally:
        relay.close()
    assert "Traceback" not in sender.log()
    assert len(log_lines(sender, UNREACHABLE)) == 1, sender.log()


def test_database_outage_is_503_not_401_and_readiness_follows(stack: Stack, db: Database) -> None:
    """Tokens already looked up keep working from the cache; others wait for the database, with 503."""
    known, unseen = db.create("known"), db.create("unseen")
    url, relay = relayed(db.url, free_port())
    relay.open()
    try:
        sender = stack.sender(DATABASE_URL=url)
        assert client(sender, known).models.list().object == "list"

        relay.cut()
        wait_until(lambda: not is_ready(sender), timeout_s=10, what="readiness to turn red")
        assert client(sender, known).models.list().object == "list"  # from the cache
        assert_token_store_unavailable(sender, unseen)
        assert_token_store_unavailable(sender, unseen)  # a failure is not cached as an unknown token

        relay.open()
        wait_until(lambda: is_ready(sender), timeout_s=20, what="readiness once the database is back")
        assert client(sender, unseen).models.list().object == "list"
    finally:
        relay.close()
    assert "Traceback" not in sender.log()
    assert len(log_lines(sender, UNREACHABLE)) == 1, sender.log()
    assert len(log_lines(sender, "token database reachable again")) == 1, sender.log()


@asynccontextmanager
async def tokens_table_locked(db: Database) -> AsyncIterator[None]:
    """Holds a lock that makes every read of the tokens table wait, as a slow database would."""
    if db.kind == "postgresql":
        connection = await asyncpg.connect(db.url)
        try:
            async with connection.transaction():
                await connection.execute("LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
                yield
        finally:
            await connection.close()
        return
    connection = await mariadb_connect(db.url)
    try:
        async with connection.cursor() as cursor:
            await cursor.execute("LOCK TABLES tokens WRITE")
            try:
                yield
            finally:
                await cursor.execute("UNLOCK TABLES")
    finally:
        connection.close()


async def waiting_lookups(db: Database) -> int:
    """Token lookups of the sender that wait for the lock of `tokens_table_locked`."""
    pattern = "%FROM tokens WHERE token_sha256%"
    if db.kind == "postgresql":
        rows = await server_fetch(db.kind, DATABASE_URL, "SELECT count(*) AS n FROM pg_stat_activity "
                                  "WHERE wait_event_type = 'Lock' AND query LIKE $1", pattern)
    else:
        rows = await server_fetch(db.kind, MARIADB_URL, "SELECT count(*) AS n FROM information_schema.PROCESSLIST "
                                  "WHERE DB = $1 AND INFO LIKE $2", db.name, pattern)
    return rows[0]["n"]


async def test_concurrent_lookups_of_one_token_share_one_query(stack: Stack, db: Database) -> None:
    """16 requests with a token not yet cached, while the database is slow: one query answers them all."""
    token = db.create("busy")
    sender = stack.sender(DATABASE_URL=db.url)
    found = 'dispatcher_token_queries_total{result="found"}'
    async with openai.AsyncOpenAI(base_url=sender.url + "/v1", api_key=token, max_retries=0, timeout=30) as api:
        async with tokens_table_locked(db):
            requests = [asyncio.ensure_future(api.models.list()) for _ in range(16)]
            await async_wait_until(lambda: waiting_lookups(db), timeout_s=4, what="the lookup to wait for the lock")
            assert await waiting_lookups(db) == 1
        answers = await asyncio.gather(*requests)
        assert [answer.object for answer in answers] == ["list"] * 16
        assert metric_value(sender, found) == 1

        await api.models.list()
        assert metric_value(sender, found) == 1  # cached


def test_revoked_token_stops_working_within_the_cache_time(stack: Stack, db: Database) -> None:
    sender = stack.sender(DATABASE_URL=db.url, TOKEN_CACHE_SECONDS="1")
    token = db.create("soon-revoked")
    assert client(sender, token).models.list().object == "list"

    assert "revoked" in db.ok("revoke", "soon-revoked")
    revoked_at = time.monotonic()

    def refused() -> bool:
        try:
            client(sender, token).models.list()
        except openai.AuthenticationError as error:
            return error.status_code == 401
        return False

    wait_until(refused, timeout_s=10, what="the revoked token to be refused")
    assert time.monotonic() - revoked_at < 5


@pytest.mark.parametrize(("url", "reason"), [
    pytest.param("postgresql://nobody_here:hunter2@127.0.0.1:5432/test", "nobody_here", id="pg-wrong-credentials"),
    pytest.param("postgresql://postgres:hunter2@127.0.0.1:5432/no_such_database_here", "no_such_database_here",
                 id="pg-no-database"),
    pytest.param("mysql://root:hunter2@nosuchhost.invalid:3306/test", "nosuchhost.invalid", id="mysql-bad-host"),
    pytest.param("mysql://nobody_here:hunter2@127.0.0.1:3306/test", "Access denied", id="mysql-wrong-credentials"),
    pytest.param("mysql://root@127.0.0.1:3306/no_such_database_here", "Unknown database",
                 id="mysql-no-database"),
])
def test_unusable_database_keeps_readiness_red_with_one_log_line(stack: Stack, url: str, reason: str) -> None:
    """A database that refuses the sender may be fixed while it runs: it waits, red, and says why once."""
    sender = stack.sender(health="/health/liveness", DATABASE_URL=url)
    wait_until(lambda: log_lines(sender, UNREACHABLE), timeout_s=20, what="the sender to say why it is not ready")
    assert not is_ready(sender)
    assert_token_store_unavailable(sender, "sk-any")
    lines = log_lines(sender, UNREACHABLE)
    assert len(lines) == 1 and reason in lines[0], sender.log()
    assert "Traceback" not in sender.log() and "hunter2" not in sender.log()


@pytest.mark.parametrize(("url", "lines"), [
    pytest.param("ftp://postgres@127.0.0.1/test", 1, id="wrong-scheme"),
    pytest.param("postgresql://postgres@127.0.0.1:99999/test", 1, id="port-out-of-range"),
    pytest.param("mysql://root:hunter2@127.0.0.1:3306", 1, id="mysql-without-database"),
    pytest.param("mysql://root:hunter2@127.0.0.1:3306/test?ssl-mode=REQUIRED", 1, id="mysql-parameters"),
    # Found by asyncpg once it tries, after the sender has started (and said so in the log).
    pytest.param("postgresql://postgres@127.0.0.1:5432/test?sslmode=sometimes", None, id="pg-bad-sslmode"),
])
def test_bad_database_setting_stops_the_sender_with_one_line(url: str, lines: int | None) -> None:
    """Retrying cannot fix a setting: the sender stops, saying which variable is wrong, without a traceback."""
    result = subprocess.run([sys.executable, "sender.py"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                            env={**os.environ, "DATABASE_URL": url, "SENDER_HOST": "127.0.0.1",
                                 "SENDER_PORT": str(free_port()), "METRICS_PORT": "0", "RABBITMQ_URL": RABBITMQ_URL})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
    output = result.stderr.strip().splitlines()
    assert "DATABASE_URL" in output[-1], result.stderr
    if lines is not None:
        assert len(output) == lines, result.stderr
