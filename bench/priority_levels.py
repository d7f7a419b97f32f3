"""What more priority levels cost RabbitMQ: a queue's publish and consume rate and its memory, by x-max-priority.

    python bench/priority_levels.py            # 20,000 messages per queue
    python bench/priority_levels.py --messages 5000

Fair share gives each priority FAIR_SHARE_LEVELS levels (x-max-priority = (MAX_PRIORITY + 1) x levels - 1:
10 without fair share, 43 with the default 4, 87 with 8, 252 at most with MAX_PRIORITY 10). Each size is
measured on a queue of its own on the local broker: publish the messages at random priorities in the
size's range (as the grant requests of many tokens and priorities spread), read the queue's memory from
the broker, then consume them all (prefetch 100, acks). The rates include this script's own client cost,
the same for every size: compare the rows, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import time

import aiormq

URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
SIZES = (10, 43, 87, 175, 252)


def queue_memory_kb(queue: str) -> float | None:
    try:
        out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "memory"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        name, _, memory = line.rpartition("\t")
        if name == queue:
            return int(memory) / 1024
    return None


async def measure(max_priority: int, messages: int) -> tuple[float, float, float | None, float | None]:
    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel(publisher_confirms=False)
        queue = f"bench.levels.{max_priority}.{os.getpid()}"
        await channel.queue_declare(queue, arguments={"x-max-priority": max_priority}, auto_delete=True)
        empty_kb = queue_memory_kb(queue)
        body = b'{"priority": 5}'
        started = time.perf_counter()
        for index in range(messages):
            await channel.basic_publish(body, routing_key=queue, properties=aiormq.spec.Basic.Properties(
                priority=random.randint(0, max_priority), delivery_mode=1))
            if index % 1000 == 999:
                await channel.queue_declare(queue, passive=True)  # a round trip: the broker has them all
        while (await channel.queue_declare(queue, passive=True)).message_count < messages:
            await asyncio.sleep(0.01)
        publish_rate = messages / (time.perf_counter() - started)
        full_kb = queue_memory_kb(queue)
        per_message_b = None if empty_kb is None or full_kb is None else (full_kb - empty_kb) * 1024 / messages

        consumer = await connection.channel()
        await consumer.basic_qos(prefetch_count=100)
        done = asyncio.get_running_loop().create_future()
        received = 0

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal received
            await consumer.basic_ack(message.delivery.delivery_tag)
            received += 1
            if received == messages and not done.done():
                done.set_result(None)

        started = time.perf_counter()
        await consumer.basic_consume(queue, on_message)
        await done
        consume_rate = messages / (time.perf_counter() - started)
        return publish_rate, consume_rate, empty_kb, per_message_b
    finally:
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args()
    print(f"{'x-max-priority':>14} {'publish/s':>10} {'consume/s':>10} {'empty queue KiB':>16} {'bytes/message':>14}")
    for size in SIZES:
        publish, consume, empty_kb, per_message = await measure(size, args.messages)
        empty = "?" if empty_kb is None else f"{empty_kb:.0f}"
        each = "?" if per_message is None else f"{per_message:.0f}"
        print(f"{size:>14} {publish:>10.0f} {consume:>10.0f} {empty:>16} {each:>14}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
