"""common/amqp.py against the real RabbitMQ: publishes written below aiormq are confirmed, returned and
delivered as aiormq's own would be."""

from __future__ import annotations

import asyncio
import uuid

import aiormq
import pytest

from common import amqp
from tests.integration.conftest import RABBITMQ_URL


async def test_confirmed_publish_is_confirmed_and_delivered_with_its_properties() -> None:
    connection = await amqp.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        queue = (await channel.aiormq.queue_declare("", exclusive=True, arguments={"x-max-priority": 10})).queue
        confirmation = channel.basic_publish(b'{"priority":7}', routing_key=queue, mandatory=True, priority=7,
                                             correlation_id="c-1", reply_to="dispatcher.test.replies",
                                             expiration="60000", message_id="c-1", delivery_mode=1)
        assert confirmation is not None
        assert isinstance(await asyncio.wait_for(confirmation, 5), aiormq.spec.Basic.Ack)
        message = await channel.aiormq.basic_get(queue, no_ack=True)
        assert message.body == b'{"priority":7}'
        properties = message.header.properties
        assert (properties.priority, properties.correlation_id, properties.reply_to, properties.expiration,
                properties.message_id) == (7, "c-1", "dispatcher.test.replies", "60000", "c-1")
    finally:
        await connection.aiormq.close()


async def test_mandatory_publish_to_a_missing_queue_fails_with_publish_error() -> None:
    connection = await amqp.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        missing = f"dispatcher.test.missing.{uuid.uuid4().hex}"
        confirmations = [channel.basic_publish(b"{}", routing_key=missing, mandatory=True, message_id=f"m-{index}")
                         for index in range(3)]
        for confirmation in confirmations:
            assert confirmation is not None
            with pytest.raises(aiormq.exceptions.PublishError):
                await asyncio.wait_for(confirmation, 5)
        assert channel.aiormq.message_id_delivery_tag == {}  # nothing left behind for returns
    finally:
        await connection.aiormq.close()


async def test_publish_on_a_closed_channel_is_refused() -> None:
    connection = await amqp.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel(publisher_confirms=False)
        await channel.aiormq.close()
        with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
            channel.basic_publish(b"{}", routing_key="anything")
        with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
            channel.basic_ack(1)
    finally:
        await connection.aiormq.close()
