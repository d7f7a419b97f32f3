"""The README's run command (`make run` → scripts/run_local.py) serves requests with the example tokens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import openai

from tests.helpers import free_port, wait_until
from tests.integration.conftest import ROOT, RABBITMQ_URL, http_get


def test_run_command_serves_the_fake_model_with_the_example_tokens(tmp_path) -> None:
    ports = {name: str(free_port()) for name in ("SENDER_PORT", "FAKE_VLLM_PORT", "PROBE_PORT", "METRICS_PORT")}
    log = open(tmp_path / "run.log", "wb")
    process = subprocess.Popen([sys.executable, "scripts/run_local.py"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **ports, "RABBITMQ_URL": RABBITMQ_URL, "MODEL": "run-command-model"})
    try:
        sender = f"http://127.0.0.1:{ports['SENDER_PORT']}"
        wait_until(lambda: http_get(sender + "/health/readiness")[0] == 200, timeout_s=60, what="the sender")
        wait_until(lambda: b"curl http://localhost" in (tmp_path / "run.log").read_bytes(), what="the usage lines")
        client = openai.OpenAI(base_url=sender + "/v1", api_key="sk-local-interactive", max_retries=0)
        wait_until(lambda: "run-command-model" in [m.id for m in client.models.list().data], what="the model")
        answer = client.chat.completions.create(model="run-command-model", max_tokens=3,
                                                messages=[{"role": "user", "content": "Hello"}])
        assert answer.choices[0].message.content == "tok0 tok1 tok2"
        # Open WebUI attaches tools to every chat: the fake runs as a vLLM with tool calling on.
        tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
        answer = client.chat.completions.create(model="run-command-model", max_tokens=3, tools=tools,  # type: ignore[arg-type]
                                                messages=[{"role": "user", "content": "Hello"}])
        assert answer.choices[0].message.content == "tok0 tok1 tok2"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (tmp_path / "run.log").read_text()


def test_run_command_explains_a_missing_rabbitmq(tmp_path) -> None:
    closed = free_port()
    result = subprocess.run([sys.executable, "scripts/run_local.py"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{closed}/"}, timeout=30)
    assert result.returncode == 1
    assert "RabbitMQ is not reachable" in result.stderr and "apt-get install rabbitmq-server" in result.stderr
    assert "Traceback" not in result.stderr
