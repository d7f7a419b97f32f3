"""The dispatcher in front of the real vLLM: openai SDK → sender.py → RabbitMQ → consumer.py → vLLM, and back."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from tests.helpers import http, wait_until
from tests.integration.conftest import Stack, queue_ready_count
from tests.vllm.conftest import Dispatcher
from tests.vllm.server import MAX_MODEL_LEN, MAX_NUM_SEQS, VLLMServer, metric_sum

PROMPT = [{"role": "user", "content": "Say something"}]
EXACT = {"ignore_eos": True}     # the random model may emit EOS at any step; lengths are then exact
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def raw_keys(value: Any) -> Any:
    """The structure of a JSON value: its keys, recursively, without the values."""
    if isinstance(value, dict):
        return {key: raw_keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [raw_keys(item) for item in value[:1]]
    return None


# --- the OpenAI API, streamed and not

def test_chat_completion_is_vllms_answer(dispatcher: Dispatcher, vllm_server: VLLMServer) -> None:
    through = dispatcher.client().chat.completions.with_raw_response.create(
        model=vllm_server.name, messages=PROMPT, max_tokens=8, extra_body=EXACT)
    direct = vllm_server.client().chat.completions.with_raw_response.create(
        model=vllm_server.name, messages=PROMPT, max_tokens=8, extra_body=EXACT)
    completion = through.parse()
    assert completion.object == "chat.completion" and completion.model == vllm_server.name
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and direct.parse().usage is not None
    assert completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens == direct.parse().usage.prompt_tokens
    assert raw_keys(json.loads(through.http_response.content)) == raw_keys(json.loads(direct.http_response.content))
    assert through.http_response.headers["vary"] == "Origin"  # vLLM's headers come through


def test_chat_stream_relays_every_event_and_the_usage(dispatcher: Dispatcher, vllm_server: VLLMServer) -> None:
    chunks = list(dispatcher.client().chat.completions.create(
        model=vllm_server.name, messages=PROMPT, max_tokens=12, stream=True, stream_options={"include_usage": True},
        extra_body=EXACT))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [chunk for chunk in chunks if chunk.choices]
    assert with_choices[-1].choices[0].finish_reason == "length"
    # Events are not tokens: several tokens may share an event, and an event may carry no text.
    assert 1 <= len(with_choices) <= 1 + 12
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_through_the_dispatcher(dispatcher: Dispatcher, vllm_server: VLLMServer, stream: bool) -> None:
    client = dispatcher.client()
    if stream:
        chunks = list(client.completions.create(model=vllm_server.name, prompt="Once upon a time", max_tokens=6,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body=EXACT))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    else:
        completion = client.completions.create(model=vllm_server.name, prompt="Once upon a time", max_tokens=6,
                                               extra_body=EXACT)
        assert completion.object == "text_completion" and completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 6


def test_models_lists_vllms_card(dispatcher: Dispatcher, vllm_server: VLLMServer) -> None:
    listed = {model.id: model for model in dispatcher.client().models.list()}
    card = listed[vllm_server.name].model_dump()
    assert card["owned_by"] == "vllm" and card["max_model_len"] == MAX_MODEL_LEN
    direct = {model.id: model.model_dump() for model in vllm_server.client().models.list()}[vllm_server.name]
    assert card["root"] == direct["root"] and raw_keys(card) == raw_keys(direct)


# --- vLLM's errors, untouched

def error_cases(model: str) -> list[tuple[str, dict[str, Any]]]:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    return [
        ("/v1/chat/completions", {"model": model, "messages": PROMPT, "max_tokens": MAX_MODEL_LEN + 1}),
        ("/v1/chat/completions", {"model": model, "messages": []}),
        ("/v1/chat/completions", {"model": model, "messages": PROMPT, "max_tokens": "many"}),
        ("/v1/chat/completions", {"model": model, "messages": PROMPT, "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"model": model, "messages": PROMPT, "tools": [tool]}),
        ("/v1/completions", {"model": model, "prompt": [7] * (MAX_MODEL_LEN + 1)}),
        ("/v1/completions", {"model": model, "prompt": [7] * MAX_MODEL_LEN}),
        ("/v1/completions", {"model": model}),
        ("/v1/no-such-route", {"model": model}),
    ]


def test_vllm_errors_pass_through_byte_for_byte(dispatcher: Dispatcher, vllm_server: VLLMServer) -> None:
    for path, body in error_cases(vllm_server.name):
        through = http(dispatcher.sender.url + path, body, token=dispatcher.token)
        direct = http(vllm_server.url + path, body)
        assert 400 <= direct[0] < 500, (path, body, direct)
        assert through == direct, (path, body)


# --- tools: refused without a tool parser, served with one

def test_tools_refused_by_a_server_without_a_tool_parser(dispatcher: Dispatcher, vllm_server: VLLMServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        dispatcher.client().chat.completions.create(model=vllm_server.name, messages=PROMPT, tools=[WEATHER_TOOL])
    assert caught.value.body["message"] == (  # type: ignore[index]
        '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')


def test_tools_served_by_a_server_with_a_tool_parser(dispatcher: Dispatcher, vllm_featured: VLLMServer) -> None:
    """`auto` is accepted (the random model rarely calls a tool by itself); a named tool choice makes
    vLLM's structured output write the call, which the hermes parser returns as `tool_calls`."""
    client = dispatcher.client()
    auto = client.chat.completions.create(model=vllm_featured.name, messages=PROMPT, tools=[WEATHER_TOOL],
                                          max_tokens=8)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    named = client.chat.completions.create(
        model=vllm_featured.name, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=200)
    calls = named.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    streamed = list(client.chat.completions.create(
        model=vllm_featured.name, messages=PROMPT, tools=[WEATHER_TOOL], max_tokens=8, stream=True))
    assert streamed[-1].usage is not None  # --enable-force-include-usage: the last chunk is the usage


# --- hang-ups

def test_hangup_mid_stream_aborts_the_generation(dispatcher: Dispatcher, vllm_server: VLLMServer) -> None:
    """Closing the stream closes the sender's connection to vLLM, which aborts the request: vLLM stops
    running it long before its end, and (as vLLM does for aborts) counts it in no finished reason."""
    finished_before = vllm_server.metric("vllm:request_success_total")
    generated_before = vllm_server.metric("vllm:generation_tokens_total")
    stream = dispatcher.client().chat.completions.create(
        model=vllm_server.name, messages=PROMPT, max_tokens=3000, stream=True, extra_body=EXACT)
    for index, _ in enumerate(stream):
        if index == 3:
            break
    wait_until(lambda: vllm_server.running() == 1, timeout_s=10, what="vLLM to run the request")
    stream.close()
    wait_until(lambda: vllm_server.running() == 0, timeout_s=10, what="vLLM to abort the request")
    assert vllm_server.metric("vllm:request_success_total") == finished_before
    assert vllm_server.metric("vllm:generation_tokens_total") - generated_before < 3000


def test_streams_read_to_done_are_complete_not_gone(dispatcher: Dispatcher, vllm_server: VLLMServer) -> None:
    """A synchronous openai client closes its connection as soon as it reads `data: [DONE]`, often before
    vLLM's chunked terminator arrives: every such stream is still a 200 for the sender, none a 499."""
    model, per_client, clients = vllm_server.name, 15, 4
    counted_before = {status: dispatcher.requests_counted(model, status) for status in ("200", "499")}
    log_before = dispatcher.sender.log_path.stat().st_size

    def streams() -> int:
        client = dispatcher.client()
        for _ in range(per_client):
            chunks = list(client.chat.completions.create(model=model, messages=PROMPT, max_tokens=24, stream=True))
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        return per_client

    with ThreadPoolExecutor(clients) as pool:
        assert sum(pool.map(lambda _: streams(), range(clients))) == per_client * clients
    total = per_client * clients
    wait_until(lambda: sum(dispatcher.requests_counted(model, s) - counted_before[s] for s in ("200", "499")) == total,
               timeout_s=10, what="every stream counted")
    assert dispatcher.requests_counted(model, "499") - counted_before["499"] == 0
    with open(dispatcher.sender.log_path, "rb") as log:
        log.seek(log_before)
        assert b"status=499" not in log.read()


# --- the consumer against vLLM's real /metrics

def test_speed_rule_keeps_a_second_request_waiting(dispatcher: Dispatcher, vllm_server: VLLMServer,
                                                   stack: Stack) -> None:
    """With a floor no CPU reaches and no burst (BURST_GRANTS=1), the first request runs at once (nothing
    runs yet) and the next waits in the queue, read off vLLM's /metrics, until the first has ended."""
    model = vllm_server.alias("speed")
    consumer = dispatcher.serve(model, vllm_server, stack, MIN_TOKENS_PER_SECOND_PER_USER="1000000",
                                BURST_GRANTS="1")
    client = dispatcher.client()
    first = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=1500, stream=True,
                                           extra_body=EXACT)
    next(iter(first))
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(client.chat.completions.create, model=model, messages=PROMPT, max_tokens=4)
        wait_until(lambda: queue_ready_count(model) == 1, timeout_s=10, what="the second request to wait")
        wait_until(lambda: metric_sum(consumer.metrics_url, "dispatcher_consumer_blocked", reason="speed") == 1,
                   timeout_s=10, what="the consumer to report the speed rule")
        assert vllm_server.running() == 1 and not second.done()
        first.close()  # the first ends (a hang-up); the second is granted
        assert second.result(timeout=60).choices[0].finish_reason in ("stop", "length")


def test_slots_cap_what_runs_on_vllm(dispatcher: Dispatcher, vllm_server: VLLMServer, stack: Stack) -> None:
    """MAX_PARALLEL_REQUESTS=2 (speed rule off): of four long streams, two run on vLLM and two wait in
    the queue; all four complete; the slots are free again afterwards."""
    model = vllm_server.alias("slots")
    consumer = dispatcher.serve(model, vllm_server, stack, MAX_PARALLEL_REQUESTS="2",
                                MIN_TOKENS_PER_SECOND_PER_USER="0")
    client = dispatcher.client()

    def stream() -> int | None:
        chunks = list(client.chat.completions.create(model=model, messages=PROMPT, max_tokens=300, stream=True,
                                                     stream_options={"include_usage": True}, extra_body=EXACT))
        return chunks[-1].usage.completion_tokens if chunks[-1].usage else None

    with ThreadPoolExecutor(4) as pool:
        results = [pool.submit(stream) for _ in range(4)]
        wait_until(lambda: queue_ready_count(model) == 2 and vllm_server.running() == 2, timeout_s=30,
                   what="two requests running and two waiting")
        assert [result.result(timeout=300) for result in results] == [300] * 4
    wait_until(lambda: metric_sum(consumer.metrics_url, "dispatcher_consumer_slots_used") == 0, timeout_s=10,
               what="the slots to be free")


# --- X-Vllm-Priority, on a server with --scheduling-policy priority

def test_priority_header_orders_vllms_own_queue(dispatcher: Dispatcher, vllm_featured: VLLMServer) -> None:
    """FORWARD_PRIORITY=1: the sender sends a priority-9 token's request with X-Vllm-Priority 1 (10 - 9).
    With every vLLM slot busy, it waits in vLLM's queue; a direct request of vLLM priority 0 that comes
    later is served first, as priority scheduling does (FCFS would serve the dispatcher's first)."""
    direct = vllm_featured.client()
    order: list[str] = []
    lock = threading.Lock()

    def first_event(name: str, create: Any, **options: Any) -> None:
        with create(model=vllm_featured.name, messages=PROMPT, stream=True, extra_body=EXACT, **options) as stream:
            next(iter(stream))
            with lock:
                order.append(name)

    def blocker(index: int) -> None:
        # Different lengths, so that slots free one at a time.
        list(direct.chat.completions.create(model=vllm_featured.name, messages=PROMPT, max_tokens=150 + 60 * index,
                                            stream=True, extra_body=EXACT))

    with ThreadPoolExecutor(MAX_NUM_SEQS + 2) as pool:
        blockers = [pool.submit(blocker, index) for index in range(MAX_NUM_SEQS)]
        wait_until(lambda: vllm_featured.running() == MAX_NUM_SEQS, timeout_s=30, what="every vLLM slot busy")
        through = pool.submit(first_event, "dispatcher", dispatcher.client().chat.completions.create, max_tokens=4)
        wait_until(lambda: vllm_featured.metric("vllm:num_requests_waiting") == 1, timeout_s=30,
                   what="the dispatcher's request to wait in vLLM")
        later = pool.submit(first_event, "direct", direct.chat.completions.create, max_tokens=4)
        wait_until(lambda: vllm_featured.metric("vllm:num_requests_waiting") == 2, timeout_s=30,
                   what="the direct request to wait in vLLM")
        for future in (*blockers, through, later):
            future.result(timeout=120)
    assert order == ["direct", "dispatcher"]  # in the order their first events came: when vLLM admitted them


# --- usage: what the dispatcher records is vLLM's own count

@pytest.mark.parametrize("case", ["whole", "stream-include-usage", "stream-forced-usage"])
def test_recorded_usage_is_vllms_own(dispatcher: Dispatcher, vllm_server: VLLMServer, vllm_featured: VLLMServer,
                                     case: str) -> None:
    """The tokens the sender records (dispatcher_tokens_total, what /v1/usage adds up) equal the usage vLLM
    returned: in a whole answer, in a stream that asked for it, and in a stream of a server started with
    --enable-force-include-usage, where every chunk carries the running total and only the last counts."""
    server = vllm_featured if case == "stream-forced-usage" else vllm_server

    def recorded(kind: str) -> float:
        return metric_sum(dispatcher.sender.metrics_url, "dispatcher_tokens_total", model=server.name, kind=kind)

    before = {kind: recorded(kind) for kind in ("prompt", "completion")}
    client = dispatcher.client()
    if case == "whole":
        usage = client.chat.completions.create(model=server.name, messages=PROMPT, max_tokens=12).usage
    else:
        options = {"stream_options": {"include_usage": True}} if case == "stream-include-usage" else {}
        chunks = list(client.chat.completions.create(model=server.name, messages=PROMPT, max_tokens=12, stream=True,
                                                     **options))
        usage = [chunk.usage for chunk in chunks if chunk.usage][-1]
    assert usage is not None and usage.completion_tokens > 0
    wait_until(lambda: recorded("completion") - before["completion"] == usage.completion_tokens, timeout_s=10,
               what=f"{usage.completion_tokens} completion tokens recorded")
    assert recorded("prompt") - before["prompt"] == usage.prompt_tokens
