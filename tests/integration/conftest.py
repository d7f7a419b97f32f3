"""Real processes on real services: the fake vLLM, `consumer.py` and `sender.py`, RabbitMQ, PostgreSQL
and MariaDB.

Every test names its own model (`unique_model`), so that tests never see each other's queue.
A session-wide PostgreSQL schema holds the tokens; `admin.py` creates them like an operator would.
Tests of the token database itself (`empty_db`, `db`) run once on each database, each in a fresh
PostgreSQL schema or MariaDB database of its own, dropped afterwards.
Services are started as subprocesses and awaited through their health routes, never a bare sleep;
their logs are printed when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncmy
import asyncmy.cursors
import asyncpg
import pytest

from tests.helpers import free_port, http, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("TEST_MARIADB_URL", "mysql://root@127.0.0.1:3306/test")
DATABASES = ("postgresql", "mariadb")


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    return http(url, timeout_s=timeout_s)


def http_post_json(url: str, payload: dict[str, Any], timeout_s: float = 5.0) -> tuple[int, bytes]:
    return http(url, payload, timeout_s=timeout_s)


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str
    metrics_url: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self) -> None:
        stop_process(self.process)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@dataclass
class Fake:
    """A fake vLLM process; `stats()` and `control()` use its test-only routes."""
    service: Service
    model: str

    @property
    def url(self) -> str:
        return self.service.url

    def stats(self) -> dict[str, Any]:
        status, body = http_get(self.url + "/_fake/stats")
        assert status == 200, body
        return json.loads(body)

    def control(self, **settings: Any) -> None:
        status, body = http_post_json(self.url + "/_fake/control", settings)
        assert status == 200, body


@dataclass
class Stack:
    """Starts services for one test and stops them after it."""
    tmp: Path
    database_url: str
    services: list[Service] = field(default_factory=list)

    def _start(self, name: str, args: list[str], env: dict[str, str], url: str, health: str) -> Service:
        log_path = self.tmp / f"{name}-{len(self.services)}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env,
                                       stdout=log_file, stderr=subprocess.STDOUT)
        service = Service(name, process, log_path, url)
        self.services.append(service)

        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{service.log()}")
            return http_get(url + health, 1.0)[0] == 200

        wait_until(healthy, timeout_s=30, what=f"{name} to be ready")
        return service

    def fake_vllm(self, model: str, *extra: str, port: int | None = None) -> Fake:
        """A fake vLLM process serving `model`; `extra` are its CLI flags (e.g. "--tpot-ms", "20")."""
        port = port or free_port()
        service = self._start("fake-vllm", ["tests/fake_vllm.py", "--host", "127.0.0.1", "--port", str(port),
                                            "--model", model, *extra], {}, f"http://127.0.0.1:{port}", "/health")
        return Fake(service, model)

    def consumer(self, model: str, vllm_url: str, **env: str) -> Service:
        port = free_port()
        return self._start("consumer", ["consumer.py"], {
            "MODEL": model, "VLLM_URL": vllm_url, "PROBE_PORT": str(port), "RABBITMQ_URL": RABBITMQ_URL,
            "METRICS_REFRESH_SECONDS": "0.2", **env}, f"http://127.0.0.1:{port}", "/ready")

    def sender(self, health: str = "/health/readiness", **env: str) -> Service:
        port, metrics_port = free_port(), free_port()
        service = self._start("sender", ["sender.py"], {
            "SENDER_HOST": "127.0.0.1", "SENDER_PORT": str(port), "METRICS_PORT": str(metrics_port),
            "RABBITMQ_URL": RABBITMQ_URL, "DATABASE_URL": self.database_url, **env},
            f"http://127.0.0.1:{port}", health)
        service.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        return service

    def served_model(self, model: str, token: str, fake_args: tuple[str, ...] = (),
                     consumer_env: dict[str, str] | None = None, sender_env: dict[str, str] | None = None
                     ) -> tuple[Fake, Service, Service]:
        """Fake vLLM + consumer + sender for `model`, waited for until the sender lists the model."""
        fake = self.fake_vllm(model, *fake_args)
        consumer = self.consumer(model, fake.url, **(consumer_env or {}))
        sender = self.sender(**(sender_env or {}))
        self.served(sender, model, token)
        return fake, consumer, sender

    def served(self, sender: Service, model: str, token: str) -> None:
        """Waits until `sender` lists `model` (consumers announce every few seconds)."""
        def listed() -> bool:
            status, body = http(sender.url + "/v1/models", token=token, timeout_s=2)
            return status == 200 and model in [m["id"] for m in json.loads(body)["data"]]
        wait_until(listed, timeout_s=15, interval_s=0.2, what=f"{model} to be listed by the sender")

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


@dataclass(frozen=True)
class Tokens:
    high: str       # priority 9, threshold 1000
    low: str        # priority 1, threshold 1000
    strict: str     # priority 1, threshold 0: only when nobody waits
    database_url: str

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "admin.py", *args], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "DATABASE_URL": self.database_url}, timeout=30)

    def create(self, name: str, priority: int, threshold: int) -> str:
        result = self.admin("create", name, "--priority", str(priority), "--threshold", str(threshold))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()


# ---------------------------------------------------------------------------------------------
# Databases: a fresh PostgreSQL schema or MariaDB database per test (or per session)

@dataclass(frozen=True)
class Database:
    """One fresh database of the test server of `kind`, and `admin.py` pointed at it.

    On PostgreSQL it is a schema, selected by `search_path` in the URL (asyncpg sends it as a
    server setting); on MariaDB a database of its own.
    """
    kind: str
    name: str

    @property
    def url(self) -> str:
        if self.kind == "postgresql":
            return f"{DATABASE_URL}?search_path={self.name}"
        return MARIADB_URL.rsplit("/", 1)[0] + "/" + self.name

    def admin(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "admin.py", *args], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "DATABASE_URL": self.url, **env}, timeout=30)

    def ok(self, *args: str, **env: str) -> str:
        result = self.admin(*args, **env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def create(self, name: str, priority: int = 5, threshold: int = 10) -> str:
        return self.ok("create", name, "--priority", str(priority), "--threshold", str(threshold)).strip()

    def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Rows as dicts; `sql` is written with PostgreSQL's $1, $2... (in order) for either server."""
        return asyncio.run(server_fetch(self.kind, self.url, sql, *args))


async def server_fetch(kind: str, url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    if kind == "postgresql":
        connection = await asyncpg.connect(url)
        try:
            return [dict(row) for row in await connection.fetch(sql, *args)]
        finally:
            await connection.close()
    connection = await mariadb_connect(url)
    try:
        async with connection.cursor(asyncmy.cursors.DictCursor) as cursor:
            await cursor.execute(re.sub(r"\$\d+", "%s", sql), args)
            return list(await cursor.fetchall())
    finally:
        connection.close()


async def mariadb_connect(url: str) -> Any:
    parts = urlsplit(url)
    return await asyncmy.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username,
                                 password=parts.password or "", database=parts.path.lstrip("/") or None,
                                 autocommit=True, init_command="SET time_zone = '+00:00'")


def create_database(kind: str, prefix: str) -> Database:
    database = Database(kind, f"{prefix}_{uuid.uuid4().hex[:12]}")
    server_url = DATABASE_URL if kind == "postgresql" else MARIADB_URL
    statement = "SCHEMA" if kind == "postgresql" else "DATABASE"
    asyncio.run(server_fetch(kind, server_url, f"CREATE {statement} {database.name}"))
    return database


def drop_database(database: Database) -> None:
    server_url = DATABASE_URL if database.kind == "postgresql" else MARIADB_URL
    statement = "SCHEMA {} CASCADE" if database.kind == "postgresql" else "DATABASE {}"
    asyncio.run(server_fetch(database.kind, server_url, "DROP " + statement.format(database.name)))


@pytest.fixture(params=DATABASES)
def empty_db(request: pytest.FixtureRequest) -> Iterator[Database]:
    """A fresh, empty database on each server in turn; dropped after the test."""
    database = create_database(request.param, "it")
    try:
        yield database
    finally:
        drop_database(database)


@pytest.fixture
def db(empty_db: Database) -> Database:
    """A fresh database migrated by `admin.py migrate`."""
    empty_db.ok("migrate")
    return empty_db


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """The session's PostgreSQL schema, migrated by `admin.py migrate`, for the tests that need tokens."""
    database = create_database("postgresql", "it")
    try:
        database.ok("migrate")
        yield database.url
    finally:
        drop_database(database)


@pytest.fixture(scope="session")
def tokens(database_url: str) -> Tokens:
    partial = Tokens("", "", "", database_url)
    suffix = uuid.uuid4().hex[:6]
    return Tokens(high=partial.create(f"high-{suffix}", 9, 1000), low=partial.create(f"low-{suffix}", 1, 1000),
                  strict=partial.create(f"strict-{suffix}", 1, 0), database_url=database_url)


@pytest.fixture
def stack(tmp_path: Path, database_url: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    stack = Stack(tmp_path, database_url)
    yield stack
    stack.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print_logs(stack)


def print_logs(stack: Stack) -> None:
    for service in stack.services:
        print(f"----- {service.name} ({service.log_path.name}) -----\n{service.log()}")


def metric_value(service: Service, sample: str) -> float | None:
    """The value of one Prometheus sample (name with labels, as exposed) on a service's metrics port."""
    status, body = http_get(service.metrics_url)
    assert status == 200
    for line in body.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return None


def consumer_queue(model: str) -> str:
    """The queue of `model`'s requests, as a consumer with the default MAX_PRIORITY and FAIR_SHARE_LEVELS
    declares it."""
    from common.messages import max_queue_priority, model_queue
    from consumer import DEFAULT_FAIR_SHARE_LEVELS

    return model_queue(model, max_queue_priority(10, DEFAULT_FAIR_SHARE_LEVELS))


def queue_ready_count(model: str, broker_url: str = RABBITMQ_URL) -> int:
    """Requests waiting for `model` in RabbitMQ: the ready messages of its queue."""
    import asyncio

    import aiormq


    async def count() -> int:
        connection = await aiormq.connect(broker_url)
        try:
            channel = await connection.channel()
            declared = await channel.queue_declare(consumer_queue(model), passive=True)
            return declared.message_count or 0
        finally:
            await connection.close()

    return asyncio.run(count())


@pytest.fixture
def unique_model() -> str:
    return f"it-model-{uuid.uuid4().hex[:8]}"


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
