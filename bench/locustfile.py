"""Load test of a real deployment: several priorities, streamed and whole chat completions.

    pip install -r bench/requirements-locust.txt
    DISPATCHER_TOKENS="sk-interactive:9,sk-batch:1" DISPATCHER_MODEL=my-model \\
        locust -f bench/locustfile.py --host https://llm.example.org --headless -u 50 -r 5 -t 5m

Each token gets its own user class (weighted by DISPATCHER_WEIGHTS, default equal), and every
request is reported under a name that carries its priority ("p9 chat stream", "p1 chat"), so
locust's table shows latency per priority: under saturation the high priority should keep a low
time to first token while the low priority waits or gets 429 (its threshold). A streamed
request is measured to its first chunk (`... stream ttft`) and to its end (`... stream`).
DISPATCHER_MAX_TOKENS (default 128) and DISPATCHER_STREAM_SHARE (default 0.5) shape the load.
"""

from __future__ import annotations

import os
import random
import time

from locust import HttpUser, between, task

MODEL = os.environ.get("DISPATCHER_MODEL", "fake-model")
MAX_TOKENS = int(os.environ.get("DISPATCHER_MAX_TOKENS", "128"))
STREAM_SHARE = float(os.environ.get("DISPATCHER_STREAM_SHARE", "0.5"))
TOKENS = [entry.split(":") for entry in os.environ.get(
    "DISPATCHER_TOKENS", "sk-local-interactive:9,sk-local-batch:1").split(",")]
WEIGHTS = [int(w) for w in os.environ.get("DISPATCHER_WEIGHTS", ",".join("1" for _ in TOKENS)).split(",")]


class DispatcherUser(HttpUser):
    abstract = True
    wait_time = between(0.5, 2.0)
    token = ""
    priority = ""

    def body(self, stream: bool) -> dict:
        body = {"model": MODEL, "max_tokens": MAX_TOKENS, "stream": stream,
                "messages": [{"role": "user", "content": f"Write about the number {random.randint(1, 10_000)}."}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    @task
    def chat(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        if random.random() >= STREAM_SHARE:
            self.client.post("/v1/chat/completions", json=self.body(False), headers=headers,
                             name=f"p{self.priority} chat")
            return
        name = f"p{self.priority} chat stream"
        started = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=self.body(True), headers=headers, name=name,
                              stream=True, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            first = None
            done = False
            for line in response.iter_lines():
                if first is None and line.startswith(b"data: "):
                    first = time.perf_counter()
                    self.environment.events.request.fire(
                        request_type="POST", name=f"{name} ttft", response_time=(first - started) * 1000,
                        response_length=0, exception=None, context={})
                done = done or line == b"data: [DONE]"
            if not done:
                response.failure("stream ended without [DONE]")


# One user class per token, so that locust reports and weights each priority on its own.
for index, ((token, priority), weight) in enumerate(zip(TOKENS, WEIGHTS, strict=True)):
    globals()[f"Priority{priority}User{index}"] = type(
        f"Priority{priority}User{index}", (DispatcherUser,), {"token": token, "priority": priority, "weight": weight})
