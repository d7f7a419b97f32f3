"""The physical floor of the dispatcher: a bare aiormq RPC round trip through RabbitMQ.

The requester does what the sender does for each request (publish with a priority on a priority
queue, mandatory, with publisher confirms, reply through direct reply-to, matched by correlation
id); the responder, in another process like the consumer, answers at once and acks (no confirms,
prefetch 64). No HTTP, no vLLM: what is left is the broker and the client library, which is one of

- `--client aiormq`: aiormq's own API (`aiormq.connect`, `basic_publish`, `basic_ack`);
- `--client dispatcher` (default): the path the services take (`common/amqp.py`: the same aiormq
  connection with one socket write per event-loop turn, publish and ack encoded below aiormq).

    python bench/floor.py --concurrency 64 --duration 5 [--client aiormq]    # prints one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import aiormq
import uvloop
from pamqp import commands as spec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import amqp  # noqa: E402

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REPLY_TO = "amq.rabbitmq.reply-to"


async def open_channel(client: str, *, publisher_confirms: bool) -> tuple[Any, amqp.FastChannel | None]:
    """An aiormq channel; with client "dispatcher", opened like the services open theirs, plus its FastChannel."""
    if client == "aiormq":
        connection = await aiormq.connect(RABBITMQ_URL)
        return await connection.channel(publisher_confirms=publisher_confirms), None
    fast = await (await amqp.connect(RABBITMQ_URL)).channel(publisher_confirms=publisher_confirms)
    return fast.aiormq, fast


async def respond(queue: str, client: str) -> None:
    """Like the consumer: no publisher confirms, the reply then the ack, nothing awaited."""
    channel, fast = await open_channel(client, publisher_confirms=False)
    await channel.basic_qos(prefetch_count=64)
    await channel.queue_declare(queue, arguments={"x-max-priority": 10, "x-expires": 60000})

    async def on_request(message: aiormq.abc.DeliveredMessage) -> None:
        properties = message.header.properties
        if fast is not None:
            fast.basic_publish(b'{"lease":"x"}', routing_key=properties.reply_to,
                               correlation_id=properties.correlation_id, delivery_mode=1, message_id="x")
            fast.basic_ack(message.delivery.delivery_tag)
            return
        await channel.basic_publish(b'{"lease":"x"}', routing_key=properties.reply_to, wait=False,
                                    properties=spec.Basic.Properties(correlation_id=properties.correlation_id,
                                                                     delivery_mode=1, message_id="x"))
        await channel.basic_ack(message.delivery.delivery_tag, wait=False)

    await channel.basic_consume(queue, on_request)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def request(queue: str, concurrency: int, duration_s: float, client: str) -> dict[str, float]:
    """Like the sender: confirmed and mandatory, the confirm awaited, then the reply."""
    channel, fast = await open_channel(client, publisher_confirms=True)
    pending: dict[str, asyncio.Future[None]] = {}

    async def on_reply(message: aiormq.abc.DeliveredMessage) -> None:
        future = pending.pop(message.header.properties.correlation_id, None)
        if future is not None and not future.done():
            future.set_result(None)

    await channel.basic_consume(REPLY_TO, on_reply, no_ack=True)
    ids = itertools.count()
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + duration_s

    async def worker() -> None:
        while time.monotonic() < deadline:
            correlation_id = str(next(ids))
            future = loop.create_future()
            pending[correlation_id] = future
            started = time.perf_counter()
            properties = {"priority": 5, "correlation_id": correlation_id, "reply_to": REPLY_TO,
                          "expiration": "60000", "message_id": correlation_id, "delivery_mode": 1}
            if fast is not None:
                await fast.basic_publish(b'{"priority":5}', routing_key=queue, mandatory=True, **properties)
            else:
                await channel.basic_publish(b'{"priority":5}', routing_key=queue, mandatory=True, wait=False,
                                            properties=spec.Basic.Properties(**properties))
            await future
            latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    await channel.connection.close()
    latencies.sort()

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1000

    return {"round_trips": len(latencies), "per_s": len(latencies) / elapsed,
            "p50_ms": percentile(50), "p90_ms": percentile(90), "p99_ms": percentile(99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--client", choices=("dispatcher", "aiormq"), default="dispatcher",
                        help="dispatcher: the AMQP path of the services (common/amqp.py); aiormq: its plain API")
    parser.add_argument("--responder", metavar="QUEUE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.responder:
        uvloop.run(respond(args.responder, args.client))
        return
    queue = f"bench.floor.{uuid.uuid4().hex[:8]}"
    responder = subprocess.Popen([sys.executable, __file__, "--responder", queue, "--client", args.client],
                                 stdout=subprocess.PIPE)
    try:
        assert responder.stdout is not None and responder.stdout.readline().strip() == b"ready"
        result = uvloop.run(request(queue, args.concurrency, args.duration, args.client))
    finally:
        responder.terminate()
        responder.wait()
    print(json.dumps({"concurrency": args.concurrency, "client": args.client, **result}))


if __name__ == "__main__":
    main()
