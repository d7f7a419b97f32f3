"""The real sender, in-process on port 0, in front of an upstream the test controls.

The capacity layer is replaced by `GrantAtOnce`, which grants every request immediately and
records releases: these tests are about the HTTP proxy (streaming, keep-alive, limits,
failures). The broker path is tested in tests/integration against the real RabbitMQ.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import hypothesis
import prometheus_client as prom
import pytest

import sender
from common.messages import Grant
from tokenstore import TokenTable, hash_token

TOKENS = {
    "sk-high": sender.TokenInfo("high", 9, 100),
    "sk-low": sender.TokenInfo("low", 1, 0),
}
MODEL = "proxy-model"


class GrantAtOnce:
    """Stands in for `sender.CapacityClient`: every request is granted at once, to `url`."""

    def __init__(self, url: str, *, api_key: str | None = None, vllm_priority: int | None = None) -> None:
        self.url = url
        self.api_key = api_key
        self.vllm_priority = vllm_priority
        self.granted: list[tuple[str, int]] = []
        self.released: list[str] = []

    def is_ready(self) -> bool:
        return True

    def is_live(self, model: str) -> bool:
        return model == MODEL

    def live_models(self) -> dict[str, dict[str, Any]]:
        return {MODEL: {"id": MODEL, "object": "model"}}

    def slots(self, model: str) -> int:
        return 1

    async def acquire_grant(self, model: str, priority: int, share_bucket: int, deadline: float) -> Grant:
        lease = f"lease-{len(self.granted)}"
        self.granted.append((model, priority))
        return Grant(lease=lease, url=self.url, api_key=self.api_key, release_to="none",
                     vllm_priority=self.vllm_priority)

    def release_soon(self, grant: Grant) -> None:
        self.released.append(grant.lease)


def make_config(**overrides: Any) -> sender.Config:
    config = sender.Config.from_env({"TOKENS_FILE": "unused.yaml"})
    return dataclasses.replace(config, **overrides)


def make_tokens() -> sender.TokenStore:
    return sender.TokenStore(30, TokenTable({hash_token(token): info for token, info in TOKENS.items()}))


@dataclasses.dataclass
class Proxy:
    port: int
    capacity: GrantAtOnce
    server: sender.Server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def make_service(upstream_url: str, *, api_key: str | None = None, vllm_priority: int | None = None,
                 **overrides: Any) -> tuple[sender.Service, GrantAtOnce]:
    """The sender's request path, granting every request at once to `upstream_url` (also bench/http_only.py's)."""
    capacity = GrantAtOnce(upstream_url, api_key=api_key, vllm_priority=vllm_priority)
    service = sender.Service(make_config(**overrides), make_tokens(), capacity,  # type: ignore[arg-type]
                             sender.UpstreamPool(), sender.Metrics.create(prom.CollectorRegistry()),
                             sender.QueueState("proxy-test"), sender.UsageRecorder(keep_memory=True))
    return service, capacity


async def start_sender(upstream_url: str, **options: Any) -> Proxy:
    """The sender on port 0 (`make_service`); stop it with `stop_sender`."""
    service, capacity = make_service(upstream_url, **options)
    server = await sender.start_server(service, "127.0.0.1", 0)
    return Proxy(server.port, capacity, server)


async def stop_sender(proxy: Proxy) -> None:
    server = proxy.server
    server.server.close()
    for task in list(server.connections):
        task.cancel()
    await asyncio.gather(*server.connections, return_exceptions=True)
    server.service.upstream.close()


@pytest.fixture
async def start_proxy() -> AsyncIterator[Callable[..., Any]]:
    """Returns `start(upstream_url, **config_overrides) -> Proxy`; everything is shut down after the test."""
    started: list[Proxy] = []

    async def start(upstream_url: str, **options: Any) -> Proxy:
        proxy = await start_sender(upstream_url, **options)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await stop_sender(proxy)


@pytest.fixture
def fuzz_settings(request: pytest.FixtureRequest) -> hypothesis.settings:
    """A seeded run of 60 inputs (a few seconds, for CI); with `--fuzz-examples=N` (tests/conftest.py), N
    inputs from a new seed each time (pytest prints it with a failure; `--hypothesis-seed` replays it)."""
    examples = request.config.getoption("--fuzz-examples")
    return hypothesis.settings(max_examples=examples or 60, derandomize=examples is None, deadline=None,
                               database=None, print_blob=True, suppress_health_check=list(hypothesis.HealthCheck))
