"""CPU cost of one publish, as the sender makes them (confirmed and mandatory, or not), through
aiormq's basic_publish and through the services' own path (common/amqp.py FastChannel).

    python bench/publish_cost.py     # prints µs of CPU and of wall time per publish, for each kind
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import aiormq
import uvloop
from pamqp import commands as spec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import amqp  # noqa: E402

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
COUNT = 3000


async def main() -> None:
    connection = await aiormq.connect(RABBITMQ_URL)
    confirmed = await connection.channel()
    unconfirmed = await connection.channel(publisher_confirms=False)
    queue = (await confirmed.queue_declare("", exclusive=True, arguments={"x-max-priority": 10})).queue
    kinds = (("confirmed, mandatory (grant request)", confirmed, {"mandatory": True}),
             ("confirmed, mandatory, wait=False", confirmed, {"mandatory": True, "wait": False}),
             ("unconfirmed", unconfirmed, {}),
             ("unconfirmed, wait=False (release)", unconfirmed, {"wait": False}))
    for label, channel, options in kinds:
        cpu, wall = time.process_time(), time.perf_counter()
        for index in range(COUNT):
            await channel.basic_publish(b'{"priority":5}', routing_key=queue, **options, properties=spec.Basic.Properties(
                priority=5, correlation_id=str(index), expiration="60000", message_id=str(index), delivery_mode=1))
        print(f"{label:<40} {(time.process_time() - cpu) / COUNT * 1e6:6.0f} µs CPU "
              f"{(time.perf_counter() - wall) / COUNT * 1e6:6.0f} µs wall")
        await confirmed.queue_purge(queue)
    await connection.close()

    # The same publishes as the services make them (common/amqp.py: encoded here, written in the turn)
    ours = await amqp.connect(RABBITMQ_URL)
    fast_confirmed = await ours.channel()
    fast_unconfirmed = await ours.channel(publisher_confirms=False)
    queue = (await fast_confirmed.aiormq.queue_declare("", exclusive=True, arguments={"x-max-priority": 10})).queue
    for label, channel in (("FastChannel, confirmed, mandatory", fast_confirmed),
                           ("FastChannel, unconfirmed", fast_unconfirmed)):
        cpu, wall = time.process_time(), time.perf_counter()
        for index in range(COUNT):
            confirmation = channel.basic_publish(
                b'{"priority":5}', routing_key=queue, mandatory=channel is fast_confirmed, priority=5,
                correlation_id=str(index), expiration="60000", message_id=str(index), delivery_mode=1)
            if confirmation is not None:
                await confirmation
            else:
                await asyncio.sleep(0)  # let the turn end, so the write happens inside the measurement
        print(f"{label:<40} {(time.process_time() - cpu) / COUNT * 1e6:6.0f} µs CPU "
              f"{(time.perf_counter() - wall) / COUNT * 1e6:6.0f} µs wall")
        await fast_confirmed.aiormq.queue_purge(queue)
    await ours.aiormq.close()


if __name__ == "__main__":
    uvloop.run(main())
