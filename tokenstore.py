"""Bearer tokens: the sender's cache of lookups, and the database behind it and behind admin.py.

The sender calls `TokenStore.lookup` for every request. A cached answer costs a dict lookup; on a
miss the database is asked once however many requests wait for the same token (single flight),
and an unknown token is remembered for a few seconds too, so that a flood of bad tokens stays off
the database. When the database cannot answer, `lookup` raises `TokenStoreUnavailable`: the
sender answers 503, never 401, since the token may well be valid.

The database is one small interface, `Database`, with one implementation per dialect, each with
its SQL, its schema and its migrations in one place: `PostgresDatabase` (asyncpg) and
`MySQLDatabase` (asyncmy; MySQL 8 and MariaDB 10.6+). `DATABASE_URL` picks one by its scheme,
`postgresql://` or `mysql://`. `admin.py` manages tokens through the same classes.

Invariants: only the SHA-256 hex digest of a token is stored, looked up or cached; no message
holds a token or the database URL (it may hold a password).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from time import monotonic
from typing import Any, Protocol

import asyncmy
import asyncmy.errors
import asyncpg

from common.config import ConfigError
from usage import Totals, UsageKey, UsageRow

log = logging.getLogger("tokenstore")

TOKEN_MISS_CACHE_S = 5.0            # unknown tokens are remembered this long (floods stay off the database)
TOKEN_CACHE_MAX_ENTRIES = 100_000
LOOKUP_TIMEOUT_S = 5.0
PING_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0            # admin.py's statements (a migration may wait for another's lock)
CONNECT_DELAY_MIN_S = 0.25          # the sender's first connection: back-off while the database is not there
CONNECT_DELAY_MAX_S = 5.0
SENDER_POOL_SIZE = 8
MIGRATION_LOCK_WAIT_S = 60
USAGE_BATCH_DAYS = 7                # usage batch ids are kept this long: a retry comes seconds or hours later


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What the sender needs to know about a valid token."""
    name: str
    priority: int
    threshold: int
    max_in_flight: int | None = None  # the token's requests per model, waiting or running, all senders


@dataclass(frozen=True, slots=True)
class TokenRow:
    """A token as `admin.py list` shows it (never its hash); times are UTC."""
    name: str
    priority: int
    threshold: int
    max_in_flight: int | None
    created_at: datetime
    revoked_at: datetime | None


class TokenStoreUnavailable(Exception):
    """The token store cannot answer now (database unreachable or failing): a 503, never a 401."""


class DatabaseError(Exception):
    """The database failed; the message is one line, without the URL."""


class DatabaseUnavailable(DatabaseError):
    """No connection could be made: server down, bad host, wrong credentials, missing database."""


class SchemaMissing(DatabaseError):
    """The tables do not exist yet: `admin.py migrate` creates them."""


class NoSuchToken(DatabaseError):
    """No token has this name."""


class TokenConflict(DatabaseError):
    """A name or a token hash is already taken.

    `name_revoked` says whether the name is taken (None: it is free, so the token is the
    duplicate) and by a revoked token; `owner` names the token that already has this hash and
    `entry` is the number of the offending entry of a `load` (both when known).
    """

    def __init__(self, *, name_revoked: bool | None = None, owner: str | None = None, entry: int = 0) -> None:
        super().__init__("token conflict")
        self.name_revoked = name_revoked
        self.owner = owner
        self.entry = entry


def hash_token(token: str | bytes) -> str:
    """The hex SHA-256 of the token's bytes: what the database stores and the sender looks up."""
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).hexdigest()


def one_line(exc: BaseException) -> str:
    """A driver's message on one line, or the exception's name when it has none."""
    message = exc.args[1] if isinstance(exc, asyncmy.errors.MySQLError) and len(exc.args) > 1 else str(exc)
    return " ".join(str(message).split()) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# The sender's side: a cache in front of a token source

class TokenSource(Protocol):
    """What the cache needs: a database (see `Database`) or a table in memory."""

    async def find_token(self, digest: str) -> TokenInfo | None: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


class TokenStore:
    """Finds a token's name, priority and threshold; the source is asked on a cache miss only.

    Keyed by the token's SHA-256. Concurrent misses for one token share one query; a failed
    query is not cached. With a database, `connect` runs in the background from start-up until
    the first connection: until then lookups raise `TokenStoreUnavailable` and readiness is red.
    `on_query` is called with "found", "unknown" or "failed" for every query the cache could not
    spare (the sender counts them in Prometheus).
    """

    def __init__(self, cache_s: float, source: TokenSource | None = None,
                 on_query: Callable[[str], None] = lambda result: None) -> None:
        self._source = source
        self._cache_s = cache_s
        self._miss_s = min(TOKEN_MISS_CACHE_S, cache_s)
        self._on_query = on_query
        self._cache: dict[str, tuple[TokenInfo | None, float]] = {}
        self._queries: dict[str, asyncio.Task[TokenInfo | None]] = {}
        self._failing: str | None = None  # why the database last failed, while it fails

    @classmethod
    def from_file(cls, path: str, cache_s: float, max_priority: int) -> TokenStore:
        """The tokens of a TOKENS_FILE (the format `admin.py load` reads), held in memory."""
        from admin import load_token_entries  # the operator tool owns the token file format

        try:
            entries = load_token_entries(path, max_priority)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"TOKENS_FILE: {exc}") from None
        return cls(cache_s, TokenTable({hash_token(entry["token"]): TokenInfo(
            entry["name"], entry["priority"], entry["threshold"], entry["max_in_flight"]) for entry in entries}))

    async def connect(self, url: str) -> None:
        """Opens the database, retrying with a capped, jittered back-off until it answers.

        Logs one line per kind of failure, not one per attempt. A setting the driver refuses is a
        ConfigError (retrying would not fix it), raised to the caller.
        """
        delay = CONNECT_DELAY_MIN_S
        while True:
            try:
                database = await open_database(url, pool_size=SENDER_POOL_SIZE)
            except DatabaseUnavailable as exc:
                self._report_failure(str(exc), first_connection=True)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, CONNECT_DELAY_MAX_S)
                continue
            self._source, self._failing = database, None
            log.info("connected to the token database (%s)", database.dialect)
            return

    @property
    def database(self) -> Database | None:
        """The database once connected (None before, and with TOKENS_FILE): where usage totals go too."""
        return None if isinstance(self._source, TokenTable) else self._source  # type: ignore[return-value]

    async def close(self) -> None:
        for query in list(self._queries.values()):
            query.cancel()
        await asyncio.gather(*self._queries.values(), return_exceptions=True)
        if self._source is not None:
            await self._source.close()

    async def lookup(self, token: bytes) -> TokenInfo | None:
        """The token's owner, or None for an unknown or revoked token."""
        digest = hashlib.sha256(token).hexdigest()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > monotonic():
            return cached[0]
        query = self._queries.get(digest)
        if query is None:  # the first miss asks the database; the misses that follow share its answer
            query = self._queries[digest] = asyncio.create_task(self._query(digest))
            query.add_done_callback(lambda done: self._forget(digest, done))
        # A task of its own, shielded: a request cancelled while it waits (a client gone, a
        # shutdown) cannot cancel the query the others wait for.
        return await asyncio.shield(query)

    def _forget(self, digest: str, query: asyncio.Task[TokenInfo | None]) -> None:
        del self._queries[digest]
        if not query.cancelled():
            query.exception()  # retrieved: a failure nobody waits for any more is not an error to report

    async def _query(self, digest: str) -> TokenInfo | None:
        source = self._source
        if source is None:
            raise TokenStoreUnavailable("not connected yet")
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                info = await source.find_token(digest)
        except (DatabaseError, TimeoutError) as exc:
            self._on_query("failed")
            self._report_failure(one_line(exc))
            raise TokenStoreUnavailable(str(exc)) from None  # not cached: the next request asks again
        self._on_query("unknown" if info is None else "found")
        self._report_success()
        if len(self._cache) >= TOKEN_CACHE_MAX_ENTRIES:
            self._cache.clear()
        self._cache[digest] = (info, monotonic() + (self._cache_s if info else self._miss_s))
        return info

    async def is_ready(self) -> bool:
        """Whether tokens can be checked now: connected, and the database answers a ping."""
        if self._source is None:
            return False
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                await self._source.ping()
        except (DatabaseError, TimeoutError) as exc:
            self._report_failure(one_line(exc))
            return False
        self._report_success()
        return True

    def _report_failure(self, reason: str, first_connection: bool = False) -> None:
        """Logs the database going down once; before the first connection, each new reason too
        (the server may come up and then refuse the login)."""
        if self._failing is None or (first_connection and reason != self._failing):
            log.warning("token database unreachable (%s): requests that need a token lookup get 503 and "
                        "readiness is red until it answers", reason)
        self._failing = reason

    def _report_success(self) -> None:
        if self._failing is not None:
            log.info("token database reachable again")
            self._failing = None


class TokenTable:
    """Tokens held in memory (TOKENS_FILE), keyed by their SHA-256: a source that is always there."""

    def __init__(self, tokens: dict[str, TokenInfo]) -> None:
        self._tokens = tokens

    async def find_token(self, digest: str) -> TokenInfo | None:
        return self._tokens.get(digest)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# The database: one interface, one implementation per dialect

class Database(Protocol):
    """What the sender and admin.py ask of the database. Every method raises DatabaseError (or a
    subclass) for a failure, never a driver's exception."""

    dialect: str
    MIGRATIONS: tuple[str, ...]

    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def find_token(self, digest: str) -> TokenInfo | None: ...
    async def migrate(self) -> tuple[int, int]: ...
    async def create_token(self, name: str, digest: str, priority: int, threshold: int,
                           max_in_flight: int | None = None) -> None: ...
    async def list_tokens(self) -> list[TokenRow]: ...
    async def revoke_token(self, name: str) -> bool: ...
    async def update_token(self, name: str, priority: int | None, threshold: int | None,
                           max_in_flight: int | None = None) -> TokenRow: ...
    async def load_tokens(self, entries: Sequence[TokenEntry]) -> int: ...
    async def add_usage(self, batch_id: str, batch: dict[UsageKey, Totals]) -> bool: ...
    async def usage_rows(self, since: datetime, token: str | None = None) -> list[UsageRow]: ...


# What `load_tokens` upserts: name, token hash, priority, threshold, max_in_flight (None: no cap).
# `update_token`'s max_in_flight: None keeps the current cap, 0 removes it.
TokenEntry = tuple[str, str, int, int, int | None]


def database_class(url: str) -> type[PostgresDatabase] | type[MySQLDatabase]:
    """The implementation for the URL's scheme; a ConfigError for anything else or a bad address."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    for cls in (PostgresDatabase, MySQLDatabase):
        if scheme in cls.schemes:
            cls.check_url(url)
            return cls
    raise ConfigError("DATABASE_URL must start with postgresql:// or mysql://")


async def open_database(url: str, *, pool_size: int) -> Database:
    """A pool of connections to the URL's database. DatabaseUnavailable when it cannot connect."""
    return await database_class(url).open(url, pool_size)


def parse_address(url: str) -> urllib.parse.SplitResult:
    """The URL, split; its port checked. The message never repeats the URL (it may hold a password)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(f"DATABASE_URL: {exc}") from None
    return parts


def as_utc(value: datetime | None) -> datetime | None:
    """MySQL's DATETIME has no time zone: the sessions here run in UTC, so its values are UTC."""
    return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)


class PostgresDatabase:
    """PostgreSQL through an asyncpg pool."""

    dialect = "PostgreSQL"
    schemes = ("postgresql", "postgres")

    # Migration N is MIGRATIONS[N - 1]: append new ones (a table each), never edit an applied one.
    # `IF NOT EXISTS` adopts a table created by hand from this schema.
    MIGRATIONS: tuple[str, ...] = (
        """
        CREATE TABLE IF NOT EXISTS tokens (
            id bigserial PRIMARY KEY,
            name text NOT NULL UNIQUE,
            token_sha256 text NOT NULL UNIQUE,
            priority integer NOT NULL CHECK (priority >= 0),
            threshold integer NOT NULL CHECK (threshold >= 0),
            created_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz
        )
        """,
        "ALTER TABLE tokens ADD COLUMN IF NOT EXISTS max_in_flight integer CHECK (max_in_flight >= 1)",
        # Usage totals per token name, model and hour (UTC); the sender adds to them in batches.
        """
        CREATE TABLE IF NOT EXISTS usage_totals (
            token_name text NOT NULL,
            model text NOT NULL,
            hour timestamptz NOT NULL,
            requests bigint NOT NULL DEFAULT 0,
            prompt_tokens bigint NOT NULL DEFAULT 0,
            completion_tokens bigint NOT NULL DEFAULT 0,
            estimated_requests bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (token_name, model, hour)
        )
        """,
        # The usage batches written in the last USAGE_BATCH_DAYS: a batch whose commit went unanswered is
        # written again under its id, and added once.
        """
        CREATE TABLE IF NOT EXISTS usage_batches (
            batch_id text PRIMARY KEY,
            written_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX IF NOT EXISTS usage_batches_written_at ON usage_batches (written_at)
        """,
    )
    SCHEMA_VERSION = """
        CREATE TABLE IF NOT EXISTS schema_version (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
    """
    # pg_advisory_xact_lock key: two install jobs migrating at once must not race on CREATE TABLE.
    MIGRATION_LOCK_KEY = 0x746F6B656E73  # "tokens"
    DRIVER_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @staticmethod
    def check_url(url: str) -> None:
        parse_address(url)  # the rest (parameters, sslmode...) is asyncpg's to judge when it connects

    @classmethod
    async def open(cls, url: str, pool_size: int) -> PostgresDatabase:
        """The pool keeps no connection floor (asyncpg would restore it in the background, logging a
        traceback per attempt while the database is down): the first connection is made here."""
        pool = asyncpg.create_pool(url, min_size=0, max_size=pool_size, timeout=CONNECT_TIMEOUT_S,
                                   command_timeout=COMMAND_TIMEOUT_S)
        try:
            await pool
            await pool.execute("SELECT 1")
        except (ValueError, ArithmeticError) as exc:  # asyncpg's word for a bad parameter
            await pool.close()
            raise ConfigError(f"DATABASE_URL: {exc}") from None
        except cls.DRIVER_ERRORS as exc:
            await pool.close()
            raise DatabaseUnavailable(one_line(exc)) from None
        return cls(pool)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; asyncpg's exceptions become ours at this border."""
        try:
            async with self._pool.acquire() as connection:
                yield connection
        except asyncpg.UndefinedTableError:
            raise SchemaMissing("the tokens table does not exist") from None
        except self.DRIVER_ERRORS as exc:
            raise DatabaseError(one_line(exc)) from None

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        async with self._connection() as connection:
            await connection.fetchval("SELECT 1")

    async def find_token(self, digest: str) -> TokenInfo | None:
        async with self._connection() as connection:
            row = await connection.fetchrow(
                "SELECT name, priority, threshold, max_in_flight FROM tokens WHERE token_sha256 = $1 AND revoked_at IS NULL",
                digest)
        return None if row is None else TokenInfo(*row)

    async def migrate(self) -> tuple[int, int]:
        """Idempotent; serialised by an advisory lock; a database at a newer version is left as is."""
        async with self._connection() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", self.MIGRATION_LOCK_KEY)
            await connection.execute(self.SCHEMA_VERSION)
            before = await connection.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            for version in range(before + 1, len(self.MIGRATIONS) + 1):
                await connection.execute(self.MIGRATIONS[version - 1])
                await connection.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
        return before, max(before, len(self.MIGRATIONS))

    async def create_token(self, name: str, digest: str, priority: int, threshold: int,
                           max_in_flight: int | None = None) -> None:
        async with self._connection() as connection:
            try:
                await connection.execute(
                    "INSERT INTO tokens (name, token_sha256, priority, threshold, max_in_flight) "
                    "VALUES ($1, $2, $3, $4, $5)", name, digest, priority, threshold, max_in_flight)
            except asyncpg.UniqueViolationError:
                revoked = await connection.fetchval("SELECT revoked_at IS NOT NULL FROM tokens WHERE name = $1", name)
                raise TokenConflict(name_revoked=revoked) from None

    async def list_tokens(self) -> list[TokenRow]:
        async with self._connection() as connection:
            rows = await connection.fetch(
                "SELECT name, priority, threshold, max_in_flight, created_at, revoked_at FROM tokens ORDER BY name")
        return [TokenRow(*row) for row in rows]

    async def revoke_token(self, name: str) -> bool:
        """False when the token was already revoked (its revocation time is kept)."""
        async with self._connection() as connection:
            row = await connection.fetchrow(
                "UPDATE tokens SET revoked_at = coalesce(revoked_at, now()) WHERE name = $1 "
                "RETURNING revoked_at = now() AS revoked_now", name)
        if row is None:
            raise NoSuchToken(name)
        return row["revoked_now"]

    async def update_token(self, name: str, priority: int | None, threshold: int | None,
                           max_in_flight: int | None = None) -> TokenRow:
        async with self._connection() as connection:
            row = await connection.fetchrow(
                "UPDATE tokens SET priority = coalesce($2, priority), threshold = coalesce($3, threshold), "
                "max_in_flight = CASE WHEN $4::integer IS NULL THEN max_in_flight ELSE nullif($4::integer, 0) END "
                "WHERE name = $1 RETURNING name, priority, threshold, max_in_flight, created_at, revoked_at",
                name, priority, threshold, max_in_flight)
        if row is None:
            raise NoSuchToken(name)
        return TokenRow(*row)

    async def load_tokens(self, entries: Sequence[TokenEntry]) -> int:
        """Upserts by name in one transaction (all or nothing), un-revoking; returns how many were created."""
        created = 0
        async with self._connection() as connection, connection.transaction():
            for number, (name, digest, priority, threshold, max_in_flight) in enumerate(entries, start=1):
                try:
                    # xmax is 0 on a freshly inserted row: tells an insert from an update in one statement.
                    async with connection.transaction():  # a savepoint, so the error below can still query
                        inserted = await connection.fetchval(
                            "INSERT INTO tokens (name, token_sha256, priority, threshold, max_in_flight) "
                            "VALUES ($1, $2, $3, $4, $5) "
                            "ON CONFLICT (name) DO UPDATE SET token_sha256 = EXCLUDED.token_sha256, "
                            "priority = EXCLUDED.priority, threshold = EXCLUDED.threshold, "
                            "max_in_flight = EXCLUDED.max_in_flight, revoked_at = NULL "
                            "RETURNING xmax = 0", name, digest, priority, threshold, max_in_flight)
                except asyncpg.UniqueViolationError:
                    owner = await connection.fetchval("SELECT name FROM tokens WHERE token_sha256 = $1", digest)
                    raise TokenConflict(owner=owner, entry=number) from None
                created += inserted
        return created

    async def add_usage(self, batch_id: str, batch: dict[UsageKey, Totals]) -> bool:
        """Adds the batch to the totals, all or nothing, once: False if `batch_id` was written before."""
        async with self._connection() as connection, connection.transaction():
            if not await connection.fetchval("INSERT INTO usage_batches (batch_id) VALUES ($1) ON CONFLICT DO NOTHING "
                                             "RETURNING true", batch_id):
                return False
            await connection.execute("DELETE FROM usage_batches WHERE written_at < now() - make_interval(days => $1)",
                                     USAGE_BATCH_DAYS)
            await connection.executemany(
                "INSERT INTO usage_totals (token_name, model, hour, requests, prompt_tokens, completion_tokens, "
                "estimated_requests) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (token_name, model, hour) "
                "DO UPDATE SET requests = usage_totals.requests + EXCLUDED.requests, "
                "prompt_tokens = usage_totals.prompt_tokens + EXCLUDED.prompt_tokens, "
                "completion_tokens = usage_totals.completion_tokens + EXCLUDED.completion_tokens, "
                "estimated_requests = usage_totals.estimated_requests + EXCLUDED.estimated_requests",
                [(token, model, hour, t.requests, t.prompt_tokens, t.completion_tokens, t.estimated_requests)
                 for (token, model, hour), t in batch.items()])
        return True

    async def usage_rows(self, since: datetime, token: str | None = None) -> list[UsageRow]:
        """Totals per token, model and UTC day from `since` on, of one token or all."""
        async with self._connection() as connection:
            rows = await connection.fetch(
                "SELECT token_name, model, (hour AT TIME ZONE 'UTC')::date AS day, sum(requests), sum(prompt_tokens), "
                "sum(completion_tokens), sum(estimated_requests) FROM usage_totals "
                "WHERE hour >= $1 AND ($2::text IS NULL OR token_name = $2) "
                "GROUP BY token_name, model, day ORDER BY day, token_name, model", since, token)
        return usage_rows(rows)


class MySQLDatabase:
    """MySQL 8 or MariaDB 10.6+ through an asyncmy pool.

    Every connection runs in UTC (DATETIME has no time zone) with autocommit, so that a lookup
    never reads an old snapshot: a revocation is seen at the next query. MySQL commits DDL at
    once, so a migration here is a single idempotent statement, run under a named lock.
    """

    dialect = "MySQL"
    schemes = ("mysql",)

    # Migration N is MIGRATIONS[N - 1]: append new ones (a table each), never edit an applied one.
    # Names compare byte for byte (utf8mb4_bin), as in PostgreSQL; hashes are ASCII.
    MIGRATIONS: tuple[str, ...] = (
        """
        CREATE TABLE IF NOT EXISTS tokens (
            id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
            name VARCHAR(200) COLLATE utf8mb4_bin NOT NULL,
            token_sha256 CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
            priority INT NOT NULL CHECK (priority >= 0),
            threshold INT NOT NULL CHECK (threshold >= 0),
            created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
            revoked_at DATETIME(6) NULL,
            UNIQUE KEY tokens_name (name),
            UNIQUE KEY tokens_token_sha256 (token_sha256)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin
        """,
        "ALTER TABLE tokens ADD COLUMN max_in_flight INT NULL CHECK (max_in_flight >= 1)",
        # Usage totals per token name, model and hour (UTC); the sender adds to them in batches.
        # Model ids are ASCII (common.messages.is_valid_model_id), at most 255 bytes.
        """
        CREATE TABLE IF NOT EXISTS usage_totals (
            token_name VARCHAR(200) COLLATE utf8mb4_bin NOT NULL,
            model VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
            hour DATETIME NOT NULL,
            requests BIGINT NOT NULL DEFAULT 0,
            prompt_tokens BIGINT NOT NULL DEFAULT 0,
            completion_tokens BIGINT NOT NULL DEFAULT 0,
            estimated_requests BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (token_name, model, hour)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin
        """,
        # The usage batches written in the last USAGE_BATCH_DAYS (see PostgresDatabase).
        """
        CREATE TABLE IF NOT EXISTS usage_batches (
            batch_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
            written_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
            KEY usage_batches_written_at (written_at)
        ) ENGINE=InnoDB
        """,
    )
    SCHEMA_VERSION = """
        CREATE TABLE IF NOT EXISTS schema_version (
            version INT PRIMARY KEY,
            applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
        ) ENGINE=InnoDB
    """
    # UTC; strict; no "note" for an `IF NOT EXISTS` that found its table (asyncmy would log it as a warning).
    SESSION_SETUP = "SET time_zone = '+00:00', sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION', sql_notes = 0"
    # GET_LOCK names are server-wide: the database's name keeps two databases' migrations apart.
    MIGRATION_LOCK = "LEFT(CONCAT('dispatcher-migrate:', DATABASE()), 64)"
    NO_SUCH_TABLE = 1146

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @staticmethod
    def check_url(url: str) -> dict[str, Any]:
        """The connection settings of `mysql://user:password@host:port/database`."""
        parts = parse_address(url)
        database = urllib.parse.unquote(parts.path.lstrip("/"))
        if not parts.username or not database or "/" in database:
            raise ConfigError("DATABASE_URL: mysql:// needs a user and a database: "
                              "mysql://user:password@host:3306/database")
        if parts.query:
            raise ConfigError("DATABASE_URL: mysql:// takes no parameters after `?` (TLS is not supported)")
        return {"host": parts.hostname or "localhost", "port": parts.port or 3306,
                "user": urllib.parse.unquote(parts.username), "password": urllib.parse.unquote(parts.password or ""),
                "db": database}

    @classmethod
    async def open(cls, url: str, pool_size: int) -> MySQLDatabase:
        try:
            pool = await asyncmy.create_pool(minsize=1, maxsize=pool_size, connect_timeout=CONNECT_TIMEOUT_S,
                                             autocommit=True, charset="utf8mb4", init_command=cls.SESSION_SETUP,
                                             **cls.check_url(url))
        except (asyncmy.errors.MySQLError, OSError, TimeoutError) as exc:
            raise DatabaseUnavailable(one_line(exc)) from None
        return cls(pool)

    @asynccontextmanager
    async def _cursor(self) -> AsyncIterator[Any]:
        """A cursor on a pooled connection; asyncmy's exceptions become ours at this border."""
        try:
            async with self._pool.acquire() as connection, connection.cursor() as cursor:
                yield cursor
        except asyncmy.errors.ProgrammingError as exc:
            if exc.args and exc.args[0] == self.NO_SUCH_TABLE:
                raise SchemaMissing("the tokens table does not exist") from None
            raise DatabaseError(one_line(exc)) from None
        except (asyncmy.errors.MySQLError, OSError, TimeoutError) as exc:
            raise DatabaseError(one_line(exc)) from None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        async with self._cursor() as cursor:
            await cursor.execute("BEGIN")
            try:
                yield cursor
            except BaseException:
                await cursor.execute("ROLLBACK")
                raise
            await cursor.execute("COMMIT")

    async def close(self) -> None:
        self._pool.close()
        await self._pool.wait_closed()

    async def ping(self) -> None:
        async with self._cursor() as cursor:
            await cursor.execute("SELECT 1")

    async def find_token(self, digest: str) -> TokenInfo | None:
        async with self._cursor() as cursor:
            await cursor.execute(
                "SELECT name, priority, threshold, max_in_flight FROM tokens WHERE token_sha256 = %s "
                "AND revoked_at IS NULL", (digest,))
            row = await cursor.fetchone()
        return None if row is None else TokenInfo(*row)

    async def migrate(self) -> tuple[int, int]:
        """Idempotent; serialised by a named lock; a database at a newer version is left as is."""
        async with self._cursor() as cursor:
            await cursor.execute(f"SELECT GET_LOCK({self.MIGRATION_LOCK}, %s)", (MIGRATION_LOCK_WAIT_S,))
            if (await cursor.fetchone())[0] != 1:
                raise DatabaseError("another migration holds the lock; try again")
            try:
                await cursor.execute(self.SCHEMA_VERSION)
                await cursor.execute("SELECT coalesce(max(version), 0) FROM schema_version")
                before = (await cursor.fetchone())[0]
                for version in range(before + 1, len(self.MIGRATIONS) + 1):
                    await cursor.execute(self.MIGRATIONS[version - 1])
                    await cursor.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
            finally:
                await cursor.execute(f"DO RELEASE_LOCK({self.MIGRATION_LOCK})")
        return before, max(before, len(self.MIGRATIONS))

    async def create_token(self, name: str, digest: str, priority: int, threshold: int,
                           max_in_flight: int | None = None) -> None:
        async with self._cursor() as cursor:
            try:
                await cursor.execute("INSERT INTO tokens (name, token_sha256, priority, threshold, max_in_flight) "
                                     "VALUES (%s, %s, %s, %s, %s)", (name, digest, priority, threshold, max_in_flight))
            except asyncmy.errors.IntegrityError:
                await cursor.execute("SELECT revoked_at IS NOT NULL FROM tokens WHERE name = %s", (name,))
                row = await cursor.fetchone()
                raise TokenConflict(name_revoked=None if row is None else bool(row[0])) from None

    async def list_tokens(self) -> list[TokenRow]:
        async with self._cursor() as cursor:
            await cursor.execute("SELECT name, priority, threshold, max_in_flight, created_at, revoked_at FROM tokens "
                                 "ORDER BY name")
            rows = await cursor.fetchall()
        return [self._token_row(row) for row in rows]

    async def revoke_token(self, name: str) -> bool:
        """False when the token was already revoked (its revocation time is kept)."""
        async with self._cursor() as cursor:
            await cursor.execute("UPDATE tokens SET revoked_at = CURRENT_TIMESTAMP(6) "
                                 "WHERE name = %s AND revoked_at IS NULL", (name,))
            if cursor.rowcount == 1:
                return True
            await cursor.execute("SELECT 1 FROM tokens WHERE name = %s", (name,))
            if await cursor.fetchone() is None:
                raise NoSuchToken(name)
        return False

    async def update_token(self, name: str, priority: int | None, threshold: int | None,
                           max_in_flight: int | None = None) -> TokenRow:
        async with self._transaction() as cursor:
            await cursor.execute("UPDATE tokens SET priority = coalesce(%s, priority), "
                                 "threshold = coalesce(%s, threshold), "
                                 "max_in_flight = CASE WHEN %s IS NULL THEN max_in_flight ELSE nullif(%s, 0) END "
                                 "WHERE name = %s", (priority, threshold, max_in_flight, max_in_flight, name))
            await cursor.execute("SELECT name, priority, threshold, max_in_flight, created_at, revoked_at FROM tokens "
                                 "WHERE name = %s", (name,))
            row = await cursor.fetchone()
        if row is None:
            raise NoSuchToken(name)
        return self._token_row(row)

    async def load_tokens(self, entries: Sequence[TokenEntry]) -> int:
        """Upserts by name in one transaction (all or nothing), un-revoking; returns how many were created.

        Not `ON DUPLICATE KEY UPDATE`: it fires on any unique key, and would move a token that
        another name holds instead of refusing it.
        """
        created = 0
        async with self._transaction() as cursor:
            for number, (name, digest, priority, threshold, max_in_flight) in enumerate(entries, start=1):
                await cursor.execute("SELECT name FROM tokens WHERE token_sha256 = %s OR name = %s FOR UPDATE",
                                     (digest, name))
                holders = {row[0] for row in await cursor.fetchall()}
                if holders - {name}:
                    raise TokenConflict(owner=(holders - {name}).pop(), entry=number)
                if name in holders:
                    await cursor.execute("UPDATE tokens SET token_sha256 = %s, priority = %s, threshold = %s, "
                                         "max_in_flight = %s, revoked_at = NULL WHERE name = %s",
                                         (digest, priority, threshold, max_in_flight, name))
                else:
                    await cursor.execute("INSERT INTO tokens (name, token_sha256, priority, threshold, max_in_flight) "
                                         "VALUES (%s, %s, %s, %s, %s)", (name, digest, priority, threshold, max_in_flight))
                    created += 1
        return created

    async def add_usage(self, batch_id: str, batch: dict[UsageKey, Totals]) -> bool:
        """Adds the batch to the totals, all or nothing, once: False if `batch_id` was written before."""
        async with self._transaction() as cursor:
            # Affected rows: 1 for a new id, 0 for one already there (INSERT IGNORE would log a warning).
            await cursor.execute("INSERT INTO usage_batches (batch_id) VALUES (%s) "
                                 "ON DUPLICATE KEY UPDATE batch_id = batch_id", (batch_id,))
            if cursor.rowcount != 1:
                return False
            await cursor.execute("DELETE FROM usage_batches WHERE written_at < UTC_TIMESTAMP(6) - INTERVAL %s DAY",
                                 (USAGE_BATCH_DAYS,))
            await cursor.executemany(
                "INSERT INTO usage_totals (token_name, model, hour, requests, prompt_tokens, completion_tokens, "
                "estimated_requests) VALUES (%s, %s, %s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE "
                "requests = requests + VALUES(requests), prompt_tokens = prompt_tokens + VALUES(prompt_tokens), "
                "completion_tokens = completion_tokens + VALUES(completion_tokens), "
                "estimated_requests = estimated_requests + VALUES(estimated_requests)",
                [(token, model, hour.replace(tzinfo=None), t.requests, t.prompt_tokens, t.completion_tokens,
                  t.estimated_requests) for (token, model, hour), t in batch.items()])
        return True

    async def usage_rows(self, since: datetime, token: str | None = None) -> list[UsageRow]:
        """Totals per token, model and UTC day from `since` on, of one token or all."""
        async with self._cursor() as cursor:
            await cursor.execute(
                "SELECT token_name, model, DATE(hour) AS day, sum(requests), sum(prompt_tokens), "
                "sum(completion_tokens), sum(estimated_requests) FROM usage_totals "
                "WHERE hour >= %s AND (%s IS NULL OR token_name = %s) "
                "GROUP BY token_name, model, day ORDER BY day, token_name, model",
                (since.astimezone(timezone.utc).replace(tzinfo=None), token, token))
            rows = await cursor.fetchall()
        return usage_rows(rows)

    @staticmethod
    def _token_row(row: tuple[Any, ...]) -> TokenRow:
        name, priority, threshold, max_in_flight, created_at, revoked_at = row
        return TokenRow(name, priority, threshold, max_in_flight, as_utc(created_at),  # type: ignore[arg-type]
                        as_utc(revoked_at))


def usage_rows(rows: Sequence[Sequence[Any]]) -> list[UsageRow]:
    """Rows of (token, model, day, requests, prompt, completion, estimated) as UsageRow (sums come as Decimal)."""
    return [UsageRow(token, model, day, *(int(value) for value in counts)) for token, model, day, *counts in rows]
