"""The two asyncio MySQL drivers on PyPI, timed on what the sender asks of its database: token lookups.

`asyncmy` (the one in requirements.txt) and `aiomysql` (install it beside, e.g. with
`pip install -r bench/requirements-mysql.txt`) each run, on uvloop like the sender, through a pool of
8 connections (the sender's) against the MariaDB of this machine, the sender's query on a table of
1,000 tokens in a database of their own (created and dropped here):

- one at a time: the latency a request sees on a cache miss (p50, p99);
- 64 at a time: lookups per second, and the CPU the client process spends per lookup (the sender
  shares its cores with the rest of the pod).

asyncpg on the PostgreSQL of this machine runs the same workload as a yardstick. Rounds alternate
the drivers so that a slow moment of the machine does not fall on one only; the median is kept.

    python bench/mysql_drivers.py [--rounds 3] [--lookups 3000]      # prints a Markdown table
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

MYSQL = {"host": os.environ.get("BENCH_MYSQL_HOST", "127.0.0.1"), "port": 3306, "user": "root", "password": ""}
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
TOKENS = 1000
POOL_SIZE = 8
CONCURRENCY = 64
MYSQL_QUERY = "SELECT name, priority, threshold FROM tokens WHERE token_sha256 = %s AND revoked_at IS NULL"
POSTGRES_QUERY = "SELECT name, priority, threshold FROM tokens WHERE token_sha256 = $1 AND revoked_at IS NULL"

Lookup = Callable[[str], Awaitable[Any]]


def digests() -> list[str]:
    return [hashlib.sha256(f"sk-bench-{n}".encode()).hexdigest() for n in range(TOKENS)]


async def mysql_setup(module: Any, database: str) -> None:
    connection = await module.connect(**MYSQL, autocommit=True)
    try:
        async with connection.cursor() as cursor:
            await cursor.execute(f"CREATE DATABASE `{database}`")
            await cursor.execute(f"USE `{database}`")
            await cursor.execute(
                "CREATE TABLE tokens (id BIGINT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(200) NOT NULL UNIQUE, "
                "token_sha256 CHAR(64) NOT NULL UNIQUE, priority INT NOT NULL, threshold INT NOT NULL, "
                "revoked_at DATETIME(6) NULL) CHARACTER SET utf8mb4")
            await cursor.executemany("INSERT INTO tokens (name, token_sha256, priority, threshold) VALUES (%s, %s, 5, 10)",
                                     [(f"bench-{n}", digest) for n, digest in enumerate(digests())])
    finally:
        connection.close()


async def mysql_drop(module: Any, database: str) -> None:
    connection = await module.connect(**MYSQL, autocommit=True)
    try:
        async with connection.cursor() as cursor:
            await cursor.execute(f"DROP DATABASE IF EXISTS `{database}`")
    finally:
        connection.close()


async def mysql_pool(module: Any, database: str) -> tuple[Lookup, Callable[[], Awaitable[None]]]:
    pool = await module.create_pool(**MYSQL, db=database, minsize=POOL_SIZE, maxsize=POOL_SIZE, autocommit=True)

    async def lookup(digest: str) -> Any:
        async with pool.acquire() as connection, connection.cursor() as cursor:
            await cursor.execute(MYSQL_QUERY, (digest,))
            return await cursor.fetchone()

    async def close() -> None:
        pool.close()
        await pool.wait_closed()

    return lookup, close


async def postgres_pool(schema: str) -> tuple[Lookup, Callable[[], Awaitable[None]]]:
    import asyncpg

    pool = await asyncpg.create_pool(POSTGRES_URL, min_size=POOL_SIZE, max_size=POOL_SIZE,
                                     server_settings={"search_path": schema})

    async def lookup(digest: str) -> Any:
        return await pool.fetchrow(POSTGRES_QUERY, digest)

    async def close() -> None:
        await pool.close()

    return lookup, close


async def postgres_setup(schema: str, drop: bool = False) -> None:
    import asyncpg

    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        if drop:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            return
        await connection.execute(f'CREATE SCHEMA "{schema}"')
        await connection.execute(
            f'CREATE TABLE "{schema}".tokens (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE, '
            "token_sha256 text NOT NULL UNIQUE, priority integer NOT NULL, threshold integer NOT NULL, "
            "revoked_at timestamptz)")
        await connection.executemany(f'INSERT INTO "{schema}".tokens (name, token_sha256, priority, threshold) '
                                     "VALUES ($1, $2, 5, 10)", [(f"bench-{n}", d) for n, d in enumerate(digests())])
    finally:
        await connection.close()


async def measure(lookup: Lookup, lookups: int) -> dict[str, float]:
    keys = digests()
    for digest in keys[:100]:  # warm the pool's connections and the server's caches
        assert await lookup(digest) is not None
    latencies = []
    for _ in range(lookups):
        started = time.perf_counter()
        await lookup(random.choice(keys))
        latencies.append(time.perf_counter() - started)
    latencies.sort()

    remaining = lookups * 4

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await lookup(random.choice(keys))

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"p50_us": latencies[len(latencies) // 2] * 1e6, "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
            "per_s": lookups * 4 / wall, "cpu_us": cpu / (lookups * 4) * 1e6}


async def run_driver(name: str, lookups: int) -> dict[str, float]:
    tag = f"bench_{uuid.uuid4().hex[:10]}"
    if name == "asyncpg":
        await postgres_setup(tag)
        try:
            lookup, close = await postgres_pool(tag)
            try:
                return await measure(lookup, lookups)
            finally:
                await close()
        finally:
            await postgres_setup(tag, drop=True)
    module = __import__(name)
    await mysql_setup(module, tag)
    try:
        lookup, close = await mysql_pool(module, tag)
        try:
            return await measure(lookup, lookups)
        finally:
            await close()
    finally:
        await mysql_drop(module, tag)


def versions() -> dict[str, str]:
    from importlib.metadata import version
    return {name: version(name) for name in ("asyncmy", "aiomysql", "PyMySQL", "asyncpg")}


async def main(rounds: int, lookups: int) -> None:
    drivers = ["asyncmy", "aiomysql", "asyncpg"]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in drivers}
    for round_number in range(rounds):
        order = drivers if round_number % 2 == 0 else drivers[::-1]
        for name in order:
            results[name].append(await run_driver(name, lookups))
    found = versions()
    print(f"{rounds} rounds of {lookups} lookups one at a time and {lookups * 4} with {CONCURRENCY} at once, "
          f"pool of {POOL_SIZE}, uvloop; medians over the rounds\n")
    print("| driver | server | one at a time p50 | p99 | 64 at once | client CPU per lookup |")
    print("|---|---|---|---|---|---|")
    for name in drivers:
        median = {key: statistics.median(r[key] for r in results[name]) for key in results[name][0]}
        server = "PostgreSQL" if name == "asyncpg" else "MariaDB"
        label = f"{name} {found[name]}" + (f" (PyMySQL {found['PyMySQL']})" if name == "aiomysql" else "")
        print(f"| {label} | {server} | {median['p50_us']:.0f} µs | {median['p99_us']:.0f} µs | "
              f"{median['per_s']:,.0f}/s | {median['cpu_us']:.0f} µs |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lookups", type=int, default=3000)
    arguments = parser.parse_args()
    uvloop.run(main(arguments.rounds, arguments.lookups))
