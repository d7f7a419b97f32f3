"""The sender and its token database: start-up before the database, outages, cached lookups.

Clients see a database that cannot answer as 503 with `Retry-After`, never as 401 (their token
may be fine), and the sender's readiness follows the database. The database is reached through
a `TcpRelay` that the test opens and cuts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse

import openai
import pytest

from tests.helpers import TcpRelay, free_port, wait_until
from tests.integration.conftest import RABBITMQ_URL, ROOT, Service, Stack, Tokens, http_get

pytestmark = pytest.mark.integration

PROMPT = [{"role": "user", "content": "hello"}]


def relayed(database_url: str, port: int) -> tuple[str, TcpRelay]:
    """`database_url` through a relay on `port` (not opened yet), and the relay."""
    url = urllib.parse.urlsplit(database_url)
    relay = TcpRelay(url.hostname or "127.0.0.1", url.port or 5432, port)
    netloc = url.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}" if "@" in url.netloc else f"127.0.0.1:{port}"
    return url._replace(netloc=netloc).geturl(), relay


def client(sender: Service, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=sender.url + "/v1", api_key=token, max_retries=0, timeout=30)


def assert_token_store_unavailable(sender: Service, token: str, model: str) -> None:
    try:
        client(sender, token).chat.completions.create(model=model, messages=PROMPT, max_tokens=1)
    except openai.InternalServerError as error:
        assert error.status_code == 503, error
        assert error.body["code"] == "token_store_unavailable", error.body
        assert 1 <= int(error.response.headers["retry-after"]) <= 60
    else:
        raise AssertionError("answered although the token database is unreachable")


def test_sender_starts_before_its_database_and_serves_once_it_comes(
        stack: Stack, tokens: Tokens, database_url: str, unique_model: str) -> None:
    """Kubernetes may start the sender before the database: it waits, not ready, answering 503."""
    url, relay = relayed(database_url, free_port())  # nothing listens there yet
    try:
        fake = stack.fake_vllm(unique_model)
        stack.consumer(unique_model, fake.url)
        sender = stack.sender(health="/health/liveness", DATABASE_URL=url)

        assert http_get(sender.url + "/health/readiness")[0] == 503
        assert_token_store_unavailable(sender, tokens.high, unique_model)

        relay.open()
        wait_until(lambda: http_get(sender.url + "/health/readiness")[0] == 200, timeout_s=20,
                   what="readiness once the database is reachable")
        stack.served(sender, unique_model, tokens.high)
        answer = client(sender, tokens.high).chat.completions.create(model=unique_model, messages=PROMPT,
                                                                    max_tokens=3)
        assert answer.choices[0].message.content
    finally:
        relay.close()
    log = sender.log()
    assert "Traceback" not in log, log
    down_lines = [line for line in log.splitlines() if "token database unreachable" in line]
    assert len(down_lines) == 1, log


@pytest.mark.parametrize(("url", "lines"), [
    pytest.param("ftp://postgres@127.0.0.1/test", 1, id="wrong-scheme"),
    pytest.param("postgresql://postgres@127.0.0.1:99999/test", 1, id="port-out-of-range"),
    # Found by asyncpg once it tries, after the sender has started (and said so in the log).
    pytest.param("postgresql://postgres@127.0.0.1:5432/test?sslmode=sometimes", None, id="bad-sslmode"),
])
def test_bad_database_setting_stops_the_sender_with_one_line(url: str, lines: int | None) -> None:
    """Retrying cannot fix a setting: the sender stops, saying which variable is wrong, without a traceback."""
    result = subprocess.run([sys.executable, "sender.py"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                            env={**os.environ, "DATABASE_URL": url, "SENDER_HOST": "127.0.0.1",
                                 "SENDER_PORT": str(free_port()), "METRICS_PORT": "0", "RABBITMQ_URL": RABBITMQ_URL})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    output = result.stderr.strip().splitlines()
    assert "DATABASE_URL" in output[-1], result.stderr
    if lines is not None:
        assert len(output) == lines, result.stderr
