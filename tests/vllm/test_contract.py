"""The contract between tests/fake_vllm.py and the real vLLM: the same assertions, run against both.

Every test here is parametrized over the two servers ("fake" and "vllm"), so the fake the other tiers
rely on cannot drift from what vLLM 0.32 really does on what a proxy or a client can see: HTTP
framing and headers, the fields of answers and chunks, the errors a client can cause, the usage
forced by --enable-force-include-usage, keep-alive, and /metrics around an abort. Generated text is
never compared: the fake writes "tok0 tok1 ...", the tiny model random words, and vLLM may merge
tokens into one event. Tool calling is in it only as vLLM refuses it without its flags.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest

from tests.helpers import free_port, http, stop_process, wait_until
from tests.integration.conftest import ROOT
from tests.vllm.conftest import sse_events
from tests.vllm.server import MAX_MODEL_LEN, VLLMServer, metric_sum

PROMPT = [{"role": "user", "content": "Say something"}]
KEEP_ALIVE_S = 5.0   # uvicorn's, in vLLM (VLLM_HTTP_TIMEOUT_KEEP_ALIVE)


@dataclass
class Target:
    """A server under contract: the real vLLM or the fake, serving the same model names."""
    kind: str
    url: str
    names: tuple[str, ...]

    @property
    def model(self) -> str:
        return self.names[0]

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.url + "/metrics", name, **labels)


def start_fake(names: tuple[str, ...], log_dir: Path, *flags: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    # Tokens 5 ms apart, so that a long stream is still running when the client hangs up.
    args = [sys.executable, "tests/fake_vllm.py", "--port", str(port), "--model", "tiny-llama",
            "--served-model-name", *names, "--max-model-len", str(MAX_MODEL_LEN), "--tpot-ms", "5", *flags]
    with open(log_dir / f"fake-{port}.log", "wb") as log_file:
        process = subprocess.Popen(args, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: process.poll() is None and http(url + "/health", timeout_s=1)[0] == 200, timeout_s=30,
               what="the fake vLLM")
    return process, url


@pytest.fixture(scope="module")
def fakes(vllm_server: VLLMServer, vllm_featured: VLLMServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, Target]]:
    """Fake vLLMs that stand for the two real servers: same names, and the forced usage of the second."""
    log_dir = tmp_path_factory.mktemp("fakes")
    plain, plain_url = start_fake(vllm_server.names, log_dir)
    forced, forced_url = start_fake(vllm_featured.names, log_dir, "--enable-force-include-usage")
    try:
        yield {"plain": Target("fake", plain_url, vllm_server.names),
               "forced": Target("fake", forced_url, vllm_featured.names)}
    finally:
        for process in (plain, forced):
            stop_process(process)


@pytest.fixture(params=["fake", "vllm"])
def server(request: pytest.FixtureRequest, vllm_server: VLLMServer, fakes: dict[str, Target]) -> Target:
    """A server with vLLM's default flags."""
    if request.param == "fake":
        return fakes["plain"]
    return Target("vllm", vllm_server.url, vllm_server.names)


@pytest.fixture(params=["fake", "vllm"])
def forced_usage(request: pytest.FixtureRequest, vllm_featured: VLLMServer, fakes: dict[str, Target]) -> Target:
    """A server started with --enable-force-include-usage."""
    if request.param == "fake":
        return fakes["forced"]
    return Target("vllm", vllm_featured.url, vllm_featured.names)


@dataclass
class Exchange:
    status: int
    headers: dict[str, str]
    body: bytes
    chunks: list[bytes]     # the body's HTTP chunks, as framed on the wire


def exchange(target: Target, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             content_type: str = "application/json", sock: socket.socket | None = None) -> Exchange:
    """One request over a raw socket, the body's HTTP chunks kept apart."""
    own = sock is None
    sock = sock or socket.create_connection(("127.0.0.1", int(target.url.rsplit(":", 1)[1])), timeout=60)
    data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", "test"), ("content-length", str(len(data)))]
    if body is not None or raw is not None:
        headers.append(("content-type", content_type))
    sock.sendall(conn.send(h11.Request(method=method, target=path, headers=headers)) + conn.send(h11.Data(data=data))
                 + conn.send(h11.EndOfMessage()))
    response, chunks, current = None, [], b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif type(event) is h11.Response:
                response = event
            elif type(event) is h11.Data:
                current += event.data
                if event.chunk_end:
                    chunks.append(current)
                    current = b""
            elif type(event) is h11.EndOfMessage:
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
    finally:
        if own:
            sock.close()
    assert response is not None
    return Exchange(response.status_code, {k.decode(): v.decode() for k, v in response.headers},
                    b"".join(chunks) + current, chunks)


# --- HTTP: framing and headers

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_each_sse_event_is_one_http_chunk(server: Target, path: str) -> None:
    body = ({"messages": PROMPT} if path == "/v1/chat/completions" else {"prompt": "Once"}) | {
        "model": server.model, "max_tokens": 5, "stream": True, "ignore_eos": True}
    answer = exchange(server, "POST", path, body)
    assert answer.status == 200 and answer.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert answer.headers["transfer-encoding"] == "chunked"
    assert answer.chunks[-1] == b"data: [DONE]\n\n"
    for chunk in answer.chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n\n") == 1, chunk


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/models", None), ("GET", "/health", None), ("GET", "/version", None),
    ("POST", "/v1/chat/completions", {"messages": []}), ("POST", "/nowhere", {}), ("GET", "/v1/completions", None),
], ids=["models", "health", "version", "error", "not-found", "wrong-method"])
def test_every_response_varies_on_origin(server: Target, method: str, path: str, body: Any) -> None:
    answer = exchange(server, method, path, None if body is None else body | {"model": server.model})
    assert answer.headers["vary"] == "Origin"
    assert answer.headers["server"] == "uvicorn"


def test_a_connection_that_never_sent_a_request_stays_open(server: Target) -> None:
    """vLLM's keep-alive timeout (5 s) starts after a response: a connection opened ahead of its first
    request (as a pool does) is still served past it. Waiting is the behaviour under test."""
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as sock:
        time.sleep(KEEP_ALIVE_S + 1)
        assert exchange(server, "GET", "/health", sock=sock).status == 200


# --- the fields of answers and chunks

CHAT_KEYS = {"id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
             "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params", "ec_transfer_params",
             "metrics"}
CHAT_CHOICE_KEYS = {"index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids", "routed_experts"}
MESSAGE_KEYS = {"role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"}
COMPLETION_KEYS = {"id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
                   "kv_transfer_params", "ec_transfer_params", "metrics"}
COMPLETION_CHOICE_KEYS = {"index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
                          "prompt_logprobs", "prompt_token_ids", "routed_experts"}
USAGE_KEYS = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
              "completion_tokens_details"}


def test_whole_answers_have_vllms_fields(server: Target) -> None:
    chat = json.loads(exchange(server, "POST", "/v1/chat/completions", {
        "model": server.model, "messages": PROMPT, "max_tokens": 3, "ignore_eos": True}).body)
    assert set(chat) == CHAT_KEYS and chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert set(chat["choices"][0]) == CHAT_CHOICE_KEYS and set(chat["choices"][0]["message"]) == MESSAGE_KEYS
    assert set(chat["usage"]) == USAGE_KEYS and chat["usage"]["completion_tokens"] == 3
    assert chat["system_fingerprint"].startswith("vllm-") and chat["choices"][0]["finish_reason"] == "length"
    completion = json.loads(exchange(server, "POST", "/v1/completions", {
        "model": server.model, "prompt": "Once", "max_tokens": 3, "ignore_eos": True}).body)
    assert set(completion) == COMPLETION_KEYS and completion["object"] == "text_completion"
    assert set(completion["choices"][0]) == COMPLETION_CHOICE_KEYS and set(completion["usage"]) == USAGE_KEYS


def test_stream_chunks_have_vllms_fields(server: Target) -> None:
    """The role chunk first, then content chunks, the last one with finish_reason, stop_reason and
    the fingerprint; then [DONE]. With include_usage, the fingerprint moves to the usage chunk."""
    events = sse_events(exchange(server, "POST", "/v1/chat/completions", {
        "model": server.model, "messages": PROMPT, "max_tokens": 4, "stream": True, "ignore_eos": True}).body)
    role, *content, last, done = events
    assert done == "[DONE]"
    assert set(role) == {"id", "object", "created", "model", "choices", "prompt_token_ids", "prompt_text"}
    assert role["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}
    for chunk in content:
        assert set(chunk) == {"id", "object", "created", "model", "choices"}
        assert set(chunk["choices"][0]) == {"index", "delta", "logprobs", "finish_reason", "token_ids"}
    assert set(last) == {"id", "object", "created", "model", "choices", "system_fingerprint"}
    assert set(last["choices"][0]) == {"index", "delta", "logprobs", "finish_reason", "stop_reason", "token_ids"}
    assert last["choices"][0]["finish_reason"] == "length"
    with_usage = sse_events(exchange(server, "POST", "/v1/completions", {
        "model": server.model, "prompt": "Once", "max_tokens": 4, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True}}).body)
    *texts, usage, done = with_usage
    for chunk in texts:
        assert set(chunk["choices"][0]) == {"index", "text", "logprobs", "finish_reason", "stop_reason",
                                            "prompt_token_ids", "token_ids"}
    assert "system_fingerprint" not in texts[-1] and texts[-1]["choices"][0]["finish_reason"] == "length"
    assert set(usage) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": usage["usage"]["prompt_tokens"],
                                                          "total_tokens": usage["usage"]["prompt_tokens"] + 4,
                                                          "completion_tokens": 4}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_forced_usage_is_on_every_chunk_and_at_the_end(forced_usage: Target, path: str) -> None:
    """--enable-force-include-usage: every chunk carries the usage so far, and a last chunk with no
    choices carries the total, whatever the request asks (here: include_usage false)."""
    chat = path == "/v1/chat/completions"
    body = ({"messages": PROMPT} if chat else {"prompt": "Once"}) | {
        "model": forced_usage.model, "max_tokens": 5, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": False}}
    *chunks, final, done = sse_events(exchange(forced_usage, "POST", path, body).body)
    assert done == "[DONE]"
    prompt_tokens = final["usage"]["prompt_tokens"]
    assert final["choices"] == [] and final["usage"] == {"prompt_tokens": prompt_tokens,
                                                         "total_tokens": prompt_tokens + 5, "completion_tokens": 5}
    assert set(final) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == 5
    assert counts[0] == 0 if chat else counts[0] >= 1  # the role chunk comes before any token
    for chunk in chunks:
        expected = {"prompt_tokens", "total_tokens", "completion_tokens"} | ({"completion_tokens_details"} if chat
                                                                             else set())
        assert set(chunk["usage"]) == expected and "system_fingerprint" not in chunk
        assert chunk["usage"]["total_tokens"] == prompt_tokens + chunk["usage"]["completion_tokens"]
    plain = json.loads(exchange(forced_usage, "POST", path, body | {"stream": False, "stream_options": None}).body)
    assert plain["usage"]["completion_tokens"] == 5  # whole answers are as without the flag


# --- what the engine does with lengths

def test_without_max_tokens_the_output_fills_the_context(server: Target) -> None:
    answer = json.loads(exchange(server, "POST", "/v1/completions", {
        "model": server.model, "prompt": [7] * (MAX_MODEL_LEN - 6), "ignore_eos": True}).body)
    assert answer["usage"] == {"prompt_tokens": MAX_MODEL_LEN - 6, "total_tokens": MAX_MODEL_LEN,
                               "completion_tokens": 6, "prompt_tokens_details": None,
                               "completion_tokens_details": None}
    assert answer["choices"][0]["finish_reason"] == "length"


def test_max_tokens_beyond_the_context_is_clamped(server: Target) -> None:
    answer = json.loads(exchange(server, "POST", "/v1/completions", {
        "model": server.model, "prompt": [7] * (MAX_MODEL_LEN - 10), "max_tokens": 100, "ignore_eos": True}).body)
    assert answer["usage"]["completion_tokens"] == 10 and answer["choices"][0]["finish_reason"] == "length"


# --- the errors a client can cause, byte for byte

def validation(kind: str, loc: str, msg: str, value: str, ctx: str = "") -> dict[str, Any]:
    detail = f"{{'type': '{kind}', 'loc': '{loc}', 'msg': '{msg}', 'input': '{value}'{ctx}}}"
    return {"error": {"message": f"1 validation error:\n  {detail}", "type": "Bad Request", "param": loc,
                      "code": 400}}


def refused(message: str, param: str | None = None, value: Any = None) -> dict[str, Any]:
    extras = [f"{name}={item}" for name, item in (("parameter", param), ("value", value)) if item is not None]
    suffix = f" ({', '.join(extras)})" if extras else ""
    return {"error": {"message": message + suffix, "type": "BadRequestError", "param": param, "code": 400}}


TOO_LONG = (f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your prompt contains at least "
            f"{MAX_MODEL_LEN + 1} input tokens, which exceeds this limit even without any output tokens. Please "
            f"reduce the length of the input prompt.")
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
ERROR_CASES = [
    pytest.param(CHAT, {"messages": PROMPT, "max_tokens": MAX_MODEL_LEN + 1}, 400, refused(
        f"max_tokens={MAX_MODEL_LEN + 1} cannot be greater than max_model_len={MAX_MODEL_LEN}. Please request fewer "
        "output tokens.", "max_tokens", MAX_MODEL_LEN + 1), id="max-tokens-beyond-max-model-len"),
    pytest.param(CHAT, {"messages": PROMPT, "max_tokens": 0}, 400,
                 refused("max_tokens must be at least 1, got 0.", "max_tokens", 0), id="max-tokens-zero"),
    pytest.param(CHAT, {"messages": PROMPT, "max_tokens": "many"}, 400, validation(
        "int_parsing", "body.max_tokens", "Input should be a valid integer, unable to parse string as an integer",
        "many"), id="max-tokens-not-a-number"),
    pytest.param(CHAT, {"messages": []}, 400, refused(
        "Cannot apply chat template to an empty conversation. Provide at least one message."), id="messages-empty"),
    pytest.param(CHAT, {}, 400, validation("missing", "body.messages", "Field required", "<dict of 1 items>"),
                 id="messages-missing"),
    pytest.param(CHAT, {"messages": "hi"}, 400, validation("list_type", "body.messages",
                                                           "Input should be a valid list", "hi"),
                 id="messages-not-a-list"),
    pytest.param(CHAT, {"messages": PROMPT, "stream_options": {"include_usage": True}}, 400, refused(
        "Stream options can only be defined when `stream=True`.", "stream_options"), id="stream-options-alone"),
    pytest.param(COMPLETIONS, {"prompt": "hi " * (MAX_MODEL_LEN + 100)}, 400,
                 refused(TOO_LONG, "input_tokens", MAX_MODEL_LEN + 1), id="text-prompt-too-long"),
    pytest.param(COMPLETIONS, {"prompt": [7] * (MAX_MODEL_LEN + 1)}, 400,
                 refused(TOO_LONG, "input_tokens", MAX_MODEL_LEN + 1), id="token-prompt-too-long"),
    pytest.param(COMPLETIONS, {"prompt": [7] * MAX_MODEL_LEN}, 400,
                 refused("max_tokens must be at least 1, got 0.", "max_tokens", 0), id="prompt-fills-the-context"),
    pytest.param(COMPLETIONS, {}, 400, refused("Either prompt or prompt_embeds must be provided and non-empty.",
                                               "prompt"), id="prompt-missing"),
    # Tools without tool calling enabled (vLLM's default flags; vllm/renderers/online_renderer.py).
    pytest.param(CHAT, {"messages": PROMPT, "tools": [TOOL]}, 400, refused(
        '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'),
                 id="tools-auto-without-tool-calling"),
    pytest.param(CHAT, {"messages": PROMPT, "tools": [TOOL], "tool_choice": "required"}, 400, refused(
        'tool_choice="required" requires --tool-call-parser to be set'), id="tools-required-without-a-parser"),
    pytest.param(CHAT, {"messages": PROMPT, "tools": [TOOL], "tool_choice": {"type": "function",
                                                                            "function": {"name": "f"}}}, 400,
                 refused('tool_choice=function "f" requires --tool-call-parser to be set'),
                 id="tools-named-without-a-parser"),
    pytest.param("/nowhere", {}, 404, {"detail": "Not Found"}, id="unknown-route"),
]


@pytest.mark.parametrize(("path", "body", "status", "expected"), ERROR_CASES)
def test_client_errors_are_vllms(server: Target, path: str, body: dict[str, Any], status: int,
                                 expected: dict[str, Any]) -> None:
    answer = exchange(server, "POST", path, {"model": server.model} | body)
    assert (answer.status, json.loads(answer.body)) == (status, expected)
    assert answer.headers["content-type"] == "application/json"


def test_unknown_model_is_404_naming_the_served_ones(server: Target) -> None:
    answer = exchange(server, "POST", CHAT, {"model": "nobody", "messages": PROMPT})
    assert (answer.status, json.loads(answer.body)) == (404, {"error": {
        "message": f"The model `nobody` does not exist. Valid aliases: {', '.join(server.names)}.",
        "type": "NotFoundError", "param": "model", "code": 404}})


@pytest.mark.parametrize(("raw", "content_type", "expected"), [
    pytest.param(b"{not json", "application/json", validation(
        "json_invalid", "body.1", "JSON decode error", "<dict of 0 items>",
        ", 'ctx': {'error': 'Expecting property name enclosed in double quotes'}"), id="invalid-json"),
    pytest.param(b"[1, 2]", "application/json", validation(
        "model_attributes_type", "body", "Input should be a valid dictionary or object to extract fields from",
        "<list of 2 items>"), id="not-an-object"),
    pytest.param(b"{}", "text/plain", {"error": {
        "message": "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
        "type": "Bad Request", "param": None, "code": 400}}, id="wrong-content-type"),
])
def test_bodies_that_are_not_json_objects_are_400(server: Target, raw: bytes, content_type: str,
                                                  expected: dict[str, Any]) -> None:
    answer = exchange(server, "POST", CHAT, raw=raw, content_type=content_type)
    assert (answer.status, json.loads(answer.body)) == (400, expected)


# --- /metrics

def test_metrics_names_and_labels(server: Target) -> None:
    text = http(server.url + "/metrics")[1].decode()
    labels = f'engine="0",model_name="{server.model}"'
    for sample in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert f"{sample}{{{labels}}} " in text, sample
    for reason in ("stop", "length", "abort", "error", "repetition"):
        assert f'vllm:request_success_total{{engine="0",finished_reason="{reason}",model_name="{server.model}"}} ' \
               in text, reason


def test_an_aborted_request_leaves_running_and_is_not_counted(server: Target) -> None:
    """A client that hangs up aborts its request: `running` goes back to 0 (after a short lag, as the
    gauges follow engine steps), and no finished reason counts it, not even "abort"."""
    finished_before = server.metric("vllm:request_success_total")
    body = json.dumps({"model": server.model, "prompt": "Once", "max_tokens": 3000, "ignore_eos": True,
                       "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        wait_until(lambda: server.metric("vllm:num_requests_running") == 1, timeout_s=10,
                   what="the request to run")
    wait_until(lambda: server.metric("vllm:num_requests_running") == 0, timeout_s=10, what="the abort")
    assert server.metric("vllm:request_success_total") == finished_before
