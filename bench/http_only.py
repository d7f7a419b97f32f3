"""The sender without RabbitMQ: every request granted at once, to measure what HTTP alone costs.

    python tests/fake_vllm.py --port 28000 --model proxy-model &
    python bench/http_only.py --port 28085 --upstream http://127.0.0.1:28000 &
    BENCH_BODY='{"model":"proxy-model","messages":[{"role":"user","content":"x"}],"max_tokens":16}' \\
      BENCH_TOKEN=sk-high wrk -t1 -c1 -d5s -s bench/chat.lua http://127.0.0.1:28085/v1/chat/completions

Compare the CPU it uses per request (/proc/<pid>/stat) with the real sender's in bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sender  # noqa: E402
from tests.proxy.conftest import make_service  # noqa: E402


async def serve(port: int, upstream: str) -> None:
    service, _ = make_service(upstream)
    server = await sender.start_server(service, "127.0.0.1", port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.shut_down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=28085)
    parser.add_argument("--upstream", default="http://127.0.0.1:28000")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
