"""Runs the whole dispatcher on this machine without a GPU or a database.

Starts the fake vLLM from tests/ (model `fake-model`), one consumer beside it, and the sender
with `tokens.example.yaml`, on the local RabbitMQ; prints how to call it; Ctrl-C stops everything.
Ports and the model can be changed with SENDER_PORT, FAKE_VLLM_PORT, PROBE_PORT, METRICS_PORT, MODEL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NO_RABBITMQ = """\
RabbitMQ is not reachable at {host}:{port}. The dispatcher queues every request in RabbitMQ, so it
needs one. On Debian or Ubuntu: `sudo apt-get install rabbitmq-server` (it starts at once); with
Docker: `docker run -d --name rabbitmq -p 5672:5672 rabbitmq:3`. Then run this command again, or
point RABBITMQ_URL (amqp://user:password@host:5672/) at the RabbitMQ you have."""


def rabbitmq_address() -> tuple[str, int]:
    url = urllib.parse.urlsplit(os.environ.get("RABBITMQ_URL", "amqp://guest:guest@localhost:5672/"))
    return url.hostname or "localhost", url.port or 5672


def is_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_ready(name: str, url: str, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{name} stopped (exit code {process.returncode}); see its lines above.")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{name} was not ready after {timeout_s:.0f}s ({url}).")


def main() -> None:
    host, port = rabbitmq_address()
    if not is_open(host, port):
        print(NO_RABBITMQ.format(host=host, port=port), file=sys.stderr)
        sys.exit(1)
    model = os.environ.get("MODEL", "fake-model")
    sender_port = os.environ.get("SENDER_PORT", "8080")
    fake_port = os.environ.get("FAKE_VLLM_PORT", "8000")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str], extra: dict[str, str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**env, **extra})
        processes.append(process)
        return process

    try:
        # Tool calling on, as a real vLLM behind Open WebUI needs it (its chats all carry tools).
        fake = start("fake vLLM", ["tests/fake_vllm.py", "--host", "127.0.0.1", "--port", fake_port,
                                   "--model", model, "--ttft-ms", "50", "--tpot-ms", "20",
                                   "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                                   "--default-max-tokens", "64"], {})  # answers end, as at a real model's EOS
        wait_ready("fake vLLM", f"http://127.0.0.1:{fake_port}/health", fake)
        probe_port = os.environ.get("PROBE_PORT", "8081")
        consumer = start("consumer", ["consumer.py"], {
            "MODEL": model, "VLLM_URL": f"http://127.0.0.1:{fake_port}", "PROBE_PORT": probe_port,
            "MAX_PARALLEL_REQUESTS": os.environ.get("MAX_PARALLEL_REQUESTS", "4")})
        wait_ready("consumer", f"http://127.0.0.1:{probe_port}/ready", consumer)
        sender = start("sender", ["sender.py"], {
            "SENDER_PORT": sender_port, "TOKENS_FILE": str(ROOT / "tokens.example.yaml"),
            "METRICS_PORT": os.environ.get("METRICS_PORT", "9090")})
        wait_ready("sender", f"http://127.0.0.1:{sender_port}/health/readiness", sender)
        print(f"""
The dispatcher is ready on http://localhost:{sender_port}, serving `{model}` from a fake vLLM.

  curl http://localhost:{sender_port}/v1/chat/completions \\
    -H 'Authorization: Bearer sk-local-interactive' -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "stream": true}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='http://localhost:{sender_port}/v1', api_key='sk-local-interactive'); print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hello'}}]).choices[0].message.content)"

Tokens are in tokens.example.yaml (sk-local-interactive: priority 9; sk-local-batch: priority 1,
threshold 5). Metrics: http://localhost:{os.environ.get('METRICS_PORT', '9090')}/metrics. Ctrl-C stops everything.
""", flush=True)
        while all(process.poll() is None for process in processes):
            time.sleep(0.5)
        print("a service stopped; stopping the others", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    main()
