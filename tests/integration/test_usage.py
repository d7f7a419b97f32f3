"""Usage accounting through real processes, on PostgreSQL and on MariaDB: what each kind of request
is charged, as the key holder sees it on `GET /v1/usage` and the operator with `admin.py usage`,
across a sender restart and a database outage.

The sender writes its totals every USAGE_FLUSH_SECONDS (0.2 s here), so each check waits for the
totals with a deadline. The fake vLLM sends one content delta per token, so an estimate from the
deltas equals the true completion count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import openai
import pytest

from tests.helpers import TcpRelay, free_port, http, wait_until
from tests.integration.conftest import Database, Fake, Service, Stack, metric_value
from tests.integration.test_token_store import relayed
from tokenstore import open_database
from usage import Totals

pytestmark = pytest.mark.integration

PROMPT = [{"role": "user", "content": "count the tokens"}]
FLUSH = {"USAGE_FLUSH_SECONDS": "0.2"}


def client(sender: Service, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=sender.url + "/v1", api_key=token, max_retries=0, timeout=30)


def usage_stack(stack: Stack, db: Database, model: str, *fake_args: str, names: tuple[str, ...] = ("alice",),
                **sender_env: str) -> tuple[Fake, Service, list[str]]:
    tokens = [db.create(name) for name in names]
    fake = stack.fake_vllm(model, *fake_args)
    stack.consumer(model, fake.url)
    sender = stack.sender(DATABASE_URL=sender_env.pop("DATABASE_URL", db.url), **{**FLUSH, **sender_env})
    stack.served(sender, model, tokens[0])
    return fake, sender, tokens


def usage_of(sender: Service, token: str, query: str = "") -> dict[str, Any]:
    status, body = http(sender.url + "/v1/usage" + query, token=token)
    assert status == 200, body
    return json.loads(body)


def totals(requests: int, prompt_tokens: int, completion_tokens: int, estimated_requests: int = 0) -> dict[str, int]:
    return {"requests": requests, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "estimated_requests": estimated_requests}


def wait_for_totals(sender: Service, token: str, model: str, expected: dict[str, int]) -> None:
    """Until /v1/usage shows exactly `expected` for `model` today, from the database."""
    def shown() -> bool:
        answer = usage_of(sender, token)
        assert answer["object"] == "list" and answer["source"] == "database", answer
        rows = [{key: row[key] for key in expected} for row in answer["data"] if row["model"] == model]
        return rows == [expected]
    wait_until(shown, timeout_s=10, interval_s=0.1, what=f"usage {expected} on /v1/usage")


def admin_usage(db: Database, *args: str) -> list[dict[str, Any]]:
    return json.loads(db.ok("usage", "--format", "json", *args))


def access_log(sender: Service) -> list[str]:
    return [line for line in sender.log().splitlines() if "POST /v1/" in line]


def test_non_streamed_answer_is_charged_its_usage(stack: Stack, db: Database, unique_model: str) -> None:
    _, sender, (token,) = usage_stack(stack, db, unique_model)
    answer = client(sender, token).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=5)
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    expected = totals(1, answer.usage.prompt_tokens, 5)
    wait_for_totals(sender, token, unique_model, expected)

    assert [{key: row[key] for key in ("token", "model", *expected)} for row in admin_usage(db)] == [
        {"token": "alice", "model": unique_model, **expected}]
    labels = f'model="{unique_model}",token="alice"'  # as exposed: labels sorted by name
    assert metric_value(sender, f'dispatcher_tokens_total{{kind="prompt",{labels}}}') == answer.usage.prompt_tokens
    assert metric_value(sender, f'dispatcher_tokens_total{{kind="completion",{labels}}}') == 5
    (line,) = access_log(sender)
    assert "token_name=alice " in line and "streamed=0" in line and "status=200" in line, line
    assert f"prompt_tokens={answer.usage.prompt_tokens} completion_tokens=5 counts=exact ended=complete" in line
    assert token not in sender.log()


def test_stream_with_include_usage_is_charged_the_usage_vllm_sent(
        stack: Stack, db: Database, unique_model: str) -> None:
    _, sender, (token,) = usage_stack(stack, db, unique_model)
    chunks = list(client(sender, token).chat.completions.create(
        model=unique_model, messages=PROMPT, max_tokens=7, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 7
    wait_for_totals(sender, token, unique_model, totals(1, usage.prompt_tokens, 7))
    assert "streamed=1" in access_log(sender)[0] and "counts=exact ended=complete" in access_log(sender)[0]


def test_stream_without_usage_is_estimated_from_its_deltas(stack: Stack, db: Database, unique_model: str) -> None:
    _, sender, (token,) = usage_stack(stack, db, unique_model)
    chunks = list(client(sender, token).chat.completions.create(
        model=unique_model, messages=PROMPT, max_tokens=6, stream=True))
    deltas = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(deltas) == 6
    wait_for_totals(sender, token, unique_model, totals(1, 0, 6, estimated_requests=1))
    assert "prompt_tokens=0 completion_tokens=6 counts=estimated ended=complete" in access_log(sender)[0]


def test_stream_with_forced_usage_is_charged_the_last_usage_not_the_sum(
        stack: Stack, db: Database, unique_model: str) -> None:
    """vLLM's --enable-force-include-usage puts the cumulative usage on every chunk: the last one counts."""
    _, sender, (token,) = usage_stack(stack, db, unique_model, "--enable-force-include-usage")
    chunks = list(client(sender, token).chat.completions.create(
        model=unique_model, messages=PROMPT, max_tokens=8, stream=True))
    assert sum(1 for chunk in chunks if chunk.usage is not None) > 2
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 8
    wait_for_totals(sender, token, unique_model, totals(1, usage.prompt_tokens, 8))


def test_client_leaving_mid_stream_is_charged_what_was_relayed(stack: Stack, db: Database, unique_model: str) -> None:
    _, sender, (token,) = usage_stack(stack, db, unique_model, "--tpot-ms", "40")
    stream = client(sender, token).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=200,
                                                           stream=True, stream_options={"include_usage": True})
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    stream.close()
    wait_until(lambda: any("ended=client_gone" in line for line in access_log(sender)), what="the client_gone record")
    (line,) = access_log(sender)
    assert "status=499" in line and "counts=estimated" in line, line
    charged = int(line.split("completion_tokens=")[1].split()[0])
    assert 3 <= charged < 200, line  # at least what the client read, not what it never got
    wait_for_totals(sender, token, unique_model, totals(1, 0, charged, estimated_requests=1))


def test_vllm_failing_mid_stream_is_charged_what_was_relayed(stack: Stack, db: Database, unique_model: str) -> None:
    fake, sender, (token,) = usage_stack(stack, db, unique_model, "--tpot-ms", "5")
    fake.control(fail_after_tokens=4)
    received = 0
    with pytest.raises(openai.APIError):
        for chunk in client(sender, token).chat.completions.create(model=unique_model, messages=PROMPT,
                                                                   max_tokens=50, stream=True):
            received += bool(chunk.choices and chunk.choices[0].delta.content)
    assert received == 4
    wait_for_totals(sender, token, unique_model, totals(1, 0, 4, estimated_requests=1))
    assert "status=502" in access_log(sender)[0] and "ended=upstream_failed" in access_log(sender)[0]


def test_each_token_sees_only_its_own_totals(stack: Stack, db: Database, unique_model: str) -> None:
    _, sender, (alice, bob) = usage_stack(stack, db, unique_model, names=("alice", "bob"))
    for _ in range(2):
        client(sender, alice).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=3)
    answer = client(sender, bob).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=4)
    prompt = answer.usage.prompt_tokens  # the same prompt for both
    wait_for_totals(sender, alice, unique_model, totals(2, 2 * prompt, 6))
    wait_for_totals(sender, bob, unique_model, totals(1, prompt, 4))
    assert [row["token"] for row in admin_usage(db)] == ["alice", "bob"]
    assert [row["requests"] for row in admin_usage(db, "--token", "bob")] == [1]
    assert usage_of(sender, bob, "?days=1")["data"][0]["completion_tokens"] == 4


def test_usage_days_out_of_range_is_400(stack: Stack, db: Database) -> None:
    token = db.create("alice")
    sender = stack.sender(DATABASE_URL=db.url)
    for query in ("?days=0", "?days=367", "?days=abc", "?days=1.5", "?days=", "?days=1&days=2"):
        status, body = http(sender.url + "/v1/usage" + query, token=token)
        assert status == 400, (query, body)
        assert json.loads(body)["error"]["param"] == "days", body
    assert usage_of(sender, token, "?days=366") == {"object": "list", "source": "database", "data": []}
    assert http(sender.url + "/v1/usage")[0] == 401


def test_sender_restart_keeps_its_totals(stack: Stack, db: Database, unique_model: str) -> None:
    """The totals not yet written when the sender stops are written at shutdown."""
    _, sender, (token,) = usage_stack(stack, db, unique_model, USAGE_FLUSH_SECONDS="10")
    answer = client(sender, token).chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=5)
    sender.stop()
    assert sender.process.returncode == 0, sender.log()
    restarted = stack.sender(DATABASE_URL=db.url)
    wait_for_totals(restarted, token, unique_model, totals(1, answer.usage.prompt_tokens, 5))


def test_database_outage_delays_the_totals_and_loses_none(stack: Stack, db: Database, unique_model: str) -> None:
    with relayed_usage_stack(stack, db, unique_model) as (relay, sender, ask, prompt):
        relay.cut()
        for _ in range(3):
            ask(model=unique_model, messages=PROMPT, max_tokens=2)
        wait_until(lambda: "usage totals not written" in sender.log(), what="the failed write to be logged")
        assert [row["requests"] for row in admin_usage(db)] == [1]

        relay.open()
        wait_until(lambda: [(row["requests"], row["prompt_tokens"], row["completion_tokens"])
                            for row in admin_usage(db)] == [(4, 4 * prompt, 8)], timeout_s=20, what="all four totals")
    assert sender.log().count("usage totals not written") == 1, sender.log()
    assert "usage totals written again" in sender.log()
    assert metric_value(sender, "dispatcher_usage_dropped_total") == 0


class LostCommitAnswer(TcpRelay):
    """A link to the database that, once armed, lets the next COMMIT through and cuts the connection
    when the database answers it, before the answer reaches the sender: the batch is committed, and
    the sender cannot know it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.armed = threading.Event()
        self.answer_lost = threading.Event()

    def to_server(self, link: dict[str, Any], data: bytes) -> bool:
        if self.armed.is_set() and b"COMMIT" in data:  # PostgreSQL and MySQL: the query "COMMIT"
            self.armed.clear()
            link["committing"] = True
        return True

    def to_client(self, link: dict[str, Any], data: bytes) -> bool:
        if link.get("committing"):  # the answer to the COMMIT: the database has committed
            self.answer_lost.set()
            return False
        return True


@contextmanager
def relayed_usage_stack(stack: Stack, db: Database, model: str, kind: type[TcpRelay] = TcpRelay
                        ) -> Iterator[tuple[Any, Service, Callable[..., Any], int]]:
    """A usage stack whose sender reaches the database through a relay (a `kind`), once its first
    request's totals are written: (the relay, the sender, `create` of its client, the prompt's tokens)."""
    url, relay = relayed(db.url, free_port(), kind)
    relay.open()
    try:
        _, sender, (token,) = usage_stack(stack, db, model, DATABASE_URL=url, TOKEN_CACHE_SECONDS="600")
        ask = client(sender, token).chat.completions.create
        prompt = ask(model=model, messages=PROMPT, max_tokens=2).usage.prompt_tokens
        wait_until(lambda: [row["requests"] for row in admin_usage(db)] == [1], what="the first write")
        yield relay, sender, ask, prompt
    finally:
        relay.close()


def test_a_batch_committed_without_an_answer_is_not_counted_twice(stack: Stack, db: Database, unique_model: str) -> None:
    """The database commits a batch of totals and the link fails before the sender hears of it: the
    sender must write it again (it cannot know), and the database must not add it twice."""
    with relayed_usage_stack(stack, db, unique_model, LostCommitAnswer) as (relay, sender, ask, prompt):
        relay.armed.set()
        for _ in range(3):
            ask(model=unique_model, messages=PROMPT, max_tokens=2)
        wait_until(relay.answer_lost.is_set, what="a commit whose answer is lost")
        wait_until(lambda: "usage totals written again" in sender.log(), timeout_s=20, what="the batch written again")
        assert [(row["requests"], row["prompt_tokens"], row["completion_tokens"]) for row in admin_usage(db)] == [
            (4, 4 * prompt, 8)]
    assert "had been written already" in sender.log()
    assert metric_value(sender, "dispatcher_usage_dropped_total") == 0


AGE_BATCHES = {"postgresql": "UPDATE usage_batches SET written_at = now() - interval '8 days'",
               "mariadb": "UPDATE usage_batches SET written_at = UTC_TIMESTAMP(6) - INTERVAL 8 DAY"}


def test_the_database_adds_a_batch_once_and_forgets_its_id_after_a_week(db: Database, caplog) -> None:
    hour = datetime(2026, 3, 1, 10, tzinfo=timezone.utc)
    batch = {("alice", "m", hour): Totals(1, 2, 3, 0)}

    async def write(*batch_ids: str) -> list[bool]:
        database = await open_database(db.url, pool_size=1)
        try:
            return [await database.add_usage(batch_id, batch) for batch_id in batch_ids]
        finally:
            await database.close()

    assert asyncio.run(write("sender-a-1", "sender-a-1", "sender-b-1")) == [True, False, True]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]  # a repeat is no warning
    assert [(row["requests"], row["prompt_tokens"], row["completion_tokens"]) for row in admin_usage(db)] == [(2, 4, 6)]
    db.fetch(AGE_BATCHES[db.kind])
    assert asyncio.run(write("sender-c-1")) == [True]  # and the ids of a week ago are gone
    assert [row["batch_id"] for row in db.fetch("SELECT batch_id FROM usage_batches")] == ["sender-c-1"]
