"""When the sender loses RabbitMQ, or a queue: clients get 503 or 404, never left hanging; readiness turns red.

Broker restarts, and what waiting requests see through them, are in test_faults.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import threading
import time
import urllib.parse

import aiormq
import openai
import pytest

from tests.helpers import http, wait_until
from tests.integration.conftest import RABBITMQ_URL, Stack, Tokens, consumer_queue, http_get, queue_ready_count

PROMPT = [{"role": "user", "content": "hello"}]


class CuttableLink:
    """A TCP relay between the sender and RabbitMQ that the test can cut, like a network failure."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.is_cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.is_cut:
                client.close()
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.is_cut = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close() alone does not)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def test_broker_loss_keeps_waiting_requests_until_their_deadline_and_refuses_new_ones(
        stack: Stack, tokens: Tokens, unique_model: str) -> None:
    """The link to the broker is cut for good: a request that was waiting keeps waiting (it would be
    published again if the broker came back) and gets 503 when its own grant timeout runs out, never
    before and never later; a new request gets 503 at once; readiness turns red; liveness stays green."""
    url = urllib.parse.urlsplit(RABBITMQ_URL)
    link = CuttableLink(url.hostname or "127.0.0.1", url.port or 5672)
    linked_url = url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{link.port}").geturl()
    fake = stack.fake_vllm(unique_model, "--tpot-ms", "20")
    stack.consumer(unique_model, fake.url, MAX_PARALLEL_REQUESTS="1")
    sender = stack.sender(RABBITMQ_URL=linked_url, RPC_RECONNECT_ATTEMPTS="2", GRANT_TIMEOUT="3")
    stack.served(sender, unique_model, tokens.high)
    client = openai.OpenAI(base_url=sender.url + "/v1", api_key=tokens.high, max_retries=0, timeout=60)

    held = client.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=500, stream=True)
    next(iter(held))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        waiting = pool.submit(client.chat.completions.create, model=unique_model, messages=PROMPT, max_tokens=1)
        wait_until(lambda: queue_ready_count(unique_model) == 1, what="a request to be waiting")
        link.cut()
        try:
            waiting.result(20)
            raise AssertionError("a request waiting when the broker was lost was served")
        except openai.InternalServerError as error:
            assert error.status_code == 503 and error.body["code"] == "grant_timeout"
            assert int(error.response.headers["retry-after"]) >= 1
        assert time.monotonic() - started >= 2.5  # its own 3 s deadline, not the moment of the cut

    try:
        client.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1)
        raise AssertionError("served without a broker")
    except openai.InternalServerError as error:
        assert error.status_code == 503 and error.body["code"] == "queue_unavailable"
    wait_until(lambda: http_get(sender.url + "/health/readiness")[0] == 503, timeout_s=20,
               what="readiness to turn red")
    assert http_get(sender.url + "/health/liveness")[0] == 200
    held.close()


def test_queue_gone_while_the_model_is_still_listed_is_404_at_once(stack: Stack, tokens: Tokens,
                                                                   unique_model: str) -> None:
    """The sender lists a model for a few seconds after its consumer's last announcement; if the queue is
    gone by then, the grant request comes back from the broker (mandatory) and the client gets 404
    at once, not a 503 after the grant timeout."""
    fake = stack.fake_vllm(unique_model)
    consumer = stack.consumer(unique_model, fake.url)
    sender = stack.sender()
    stack.served(sender, unique_model, tokens.high)
    consumer.kill()  # no goodbye: the sender keeps the model listed until its announcement expires
    asyncio.run(delete_queue(consumer_queue(unique_model)))
    status, body = http(sender.url + "/v1/models", token=tokens.high)
    assert status == 200 and unique_model in [model["id"] for model in json.loads(body)["data"]]

    client = openai.OpenAI(base_url=sender.url + "/v1", api_key=tokens.high, max_retries=0, timeout=10)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=unique_model, messages=PROMPT, max_tokens=1)
    assert caught.value.body["code"] == "model_not_found"


async def delete_queue(queue: str) -> None:
    connection = await aiormq.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
    finally:
        await connection.close()
