"""Load test of the dispatcher: several priorities, streamed and whole chat completions.

    make locust USERS=24 SECONDS=30          # against `make run`, in its own venv (.venv-locust)
    DISPATCHER_TOKENS="sk-interactive:9,sk-batch:1" DISPATCHER_MODEL=my-model \\
        .venv-locust/bin/locust -f bench/locustfile.py --host https://llm.example.org --headless -u 50 -r 5 -t 5m

Each token (DISPATCHER_TOKENS, "token:priority,...") gets its own user class, weighted by
DISPATCHER_WEIGHTS (default equal), and its rows in locust's table are named after its priority:

- "p9 chat": a whole answer, to its last byte;
- "p9 chat stream": a streamed answer, to its end (`data: [DONE]`);
- "p9 chat stream ttft": the time to its first token (the first chunk with content);
- "p1 shed (429)": requests refused with 429 and Retry-After because more requests were waiting
  than the token's threshold. That is the dispatcher shedding low-importance traffic as designed,
  so they count as successes on a row of their own, never as failures, and a summary per token
  follows the final tables. A 429 without Retry-After, any other error status, an error event
  inside a stream or a stream without its end are failures.

Under saturation the high priority should keep a short time to first token while the low priority
waits longer or is shed. DISPATCHER_MAX_TOKENS (default 128) and DISPATCHER_STREAM_SHARE (default
0.5) shape the load.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from locust import HttpUser, between, events, task

MODEL = os.environ.get("DISPATCHER_MODEL", "fake-model")
MAX_TOKENS = int(os.environ.get("DISPATCHER_MAX_TOKENS", "128"))
STREAM_SHARE = float(os.environ.get("DISPATCHER_STREAM_SHARE", "0.5"))
TOKENS = [entry.split(":") for entry in os.environ.get(
    "DISPATCHER_TOKENS", "sk-local-interactive:9,sk-local-batch:1").split(",")]
WEIGHTS = [int(w) for w in os.environ.get("DISPATCHER_WEIGHTS", ",".join("1" for _ in TOKENS)).split(",")]
SHED = "shed (429)"


def masked(token: str) -> str:
    """Enough of a token to tell which one it is, not enough to use it."""
    return f"{token[:4]}…{token[-4:]}" if len(token) > 12 else "…"


def labels() -> list[str]:
    """p<priority> per token; tokens of one priority are told apart by their place in the list."""
    priorities = [priority for _, priority in TOKENS]
    return [f"p{priority}" if priorities.count(priority) == 1 else f"p{priority}-{index}"
            for index, priority in enumerate(priorities)]


class DispatcherUser(HttpUser):
    abstract = True
    wait_time = between(0.5, 2.0)
    token = ""
    label = ""

    def body(self, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL, "max_tokens": MAX_TOKENS, "stream": stream,
            "messages": [{"role": "user", "content": f"Write about the number {random.randint(1, 10_000)}."}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    @task
    def chat(self) -> None:
        stream = random.random() < STREAM_SHARE
        name = f"{self.label} chat stream" if stream else f"{self.label} chat"
        started = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=self.body(stream), name=name, stream=stream,
                              headers={"Authorization": f"Bearer {self.token}"}, catch_response=True) as response:
            if response.status_code == 429 and response.headers.get("retry-after"):
                response.request_meta["name"] = f"{self.label} {SHED}"
                response.success()
            elif response.status_code != 200:
                response.failure(f"status {response.status_code}")
            elif stream:
                self.read_stream(response, name, started)

    def read_stream(self, response: Any, name: str, started: float) -> None:
        """Reads the stream to its end; the request's time is the whole stream's, and the time to the
        first token is reported on its own row."""
        first_token_at = None
        done = False
        length = 0
        for line in response.iter_lines(chunk_size=None):
            length += len(line) + 1
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                done = True
                continue
            if first_token_at is None or data.startswith(b'{"error"'):
                event = json.loads(data)
                if "error" in event:
                    response.failure(f"error in the stream: {event['error'].get('message')}")
                    return
                if any(choice.get("delta", {}).get("content") for choice in event.get("choices", [])):
                    first_token_at = time.perf_counter()
                    self.environment.events.request.fire(
                        request_type="POST", name=f"{name} ttft", response_time=(first_token_at - started) * 1000,
                        response_length=0, exception=None, context={})
        response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
        response.request_meta["response_length"] = length
        if not done:
            response.failure("stream ended without data: [DONE]")


# One user class per token, so that locust reports and weights each priority on its own.
for index, ((token, priority), label, weight) in enumerate(zip(TOKENS, labels(), WEIGHTS, strict=True)):
    globals()[f"Priority{priority}User{index}"] = type(
        f"Priority{priority}User{index}", (DispatcherUser,), {"token": token, "label": label, "weight": weight})


RUNNING: dict[str, Any] = {}   # the locust Environment, for the summary at the end


@events.init.add_listener
def remember_environment(environment: Any, **_: Any) -> None:
    RUNNING["environment"] = environment


@events.quit.add_listener
def print_shed_summary(**_: Any) -> None:
    """After locust's own tables; read from the aggregated stats, so a distributed run counts all workers."""
    environment = RUNNING.get("environment")
    if environment is None or environment.stats is None:
        return
    entries = environment.stats.entries
    print("\nShed: requests refused with 429 + Retry-After (more waiting than the token's threshold), not failures")
    for (token, priority), label in zip(TOKENS, labels(), strict=True):
        shed = sum(entry.num_requests for (name, _), entry in entries.items() if name == f"{label} {SHED}")
        answered = sum(entry.num_requests for (name, _), entry in entries.items()
                       if name in (f"{label} chat", f"{label} chat stream"))
        total = shed + answered
        share = f"{100 * shed / total:.0f} %" if total else "-"
        print(f"  {label:<6} token {masked(token)}  priority {priority}: {shed} shed of {total} requests ({share})")
