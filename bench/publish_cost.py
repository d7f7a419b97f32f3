"""CPU cost of one aiormq publish, as the sender makes them (confirmed and mandatory, or not).

    python bench/publish_cost.py     # prints µs of CPU and of wall time per publish, for each kind
"""

from __future__ import annotations

import os
import time

import aiormq
import uvloop
from pamqp import commands as spec

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


if __name__ == "__main__":
    uvloop.run(main())
