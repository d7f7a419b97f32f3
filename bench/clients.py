"""Load clients that wrk cannot play: many waiting requests at once, and a deliberately slow reader.

    python bench/clients.py waiters --port 8080 --model M --count 1000    # opens N requests, reports when all answered
    python bench/clients.py slow-reader --port 8080 --model M --tokens 4000 --read-bytes 4096 --pause-ms 5

Each prints JSON lines on stdout, which bench/run.py reads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvloop


def chat_request(model: str, max_tokens: int, stream: bool, token: str = "sk-bench") -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "bench"}],
                       "max_tokens": max_tokens, "stream": stream}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\nConnection: close\r\n\r\n" + body)


async def waiters(port: int, model: str, count: int) -> None:
    """Opens `count` connections, each with one request; prints when all are sent and when all are answered."""
    statuses: list[bytes] = []
    finished: list[float] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chat_request(model, 1, False))
        await writer.drain()
        answer = await reader.read()  # Connection: close: the whole answer, then EOF
        statuses.append(answer[9:12])
        finished.append(time.monotonic())
        writer.close()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await asyncio.sleep(0)
    print(json.dumps({"event": "sent", "count": count}), flush=True)
    await asyncio.gather(*tasks)
    ok = sum(1 for status in statuses if status == b"200")
    print(json.dumps({"event": "answered", "ok": ok, "errors": count - ok,
                      "first": min(finished), "last": max(finished)}), flush=True)


async def slow_reader(port: int, model: str, tokens: int, read_bytes: int, pause_ms: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=read_bytes)
    writer.write(chat_request(model, tokens, True))
    await writer.drain()
    started = time.monotonic()
    received = 0
    tail = b""
    while True:
        data = await reader.read(read_bytes)
        if not data:
            break
        received += len(data)
        tail = (tail + data)[-64:]
        await asyncio.sleep(pause_ms / 1000)
    writer.close()
    print(json.dumps({"event": "done", "bytes": received, "seconds": time.monotonic() - started,
                      "complete": b"data: [DONE]" in tail}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("waiters")
    slow = sub.add_parser("slow-reader")
    for each in (wait, slow):
        each.add_argument("--port", type=int, required=True)
        each.add_argument("--model", required=True)
    wait.add_argument("--count", type=int, default=1000)
    slow.add_argument("--tokens", type=int, default=4000)
    slow.add_argument("--read-bytes", type=int, default=4096)
    slow.add_argument("--pause-ms", type=float, default=5.0)
    args = parser.parse_args()
    if args.command == "waiters":
        uvloop.run(waiters(args.port, args.model, args.count))
    else:
        uvloop.run(slow_reader(args.port, args.model, args.tokens, args.read_bytes, args.pause_ms))


if __name__ == "__main__":
    main()
