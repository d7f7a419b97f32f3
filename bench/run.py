"""The benchmark: the dispatcher against its physical limits, on this machine, in one command.

    python bench/run.py            # full run (about 2 minutes), rewrites the tables in bench/RESULTS.md
    python bench/run.py --short    # a few seconds per workload (CI), writes bench/out/RESULTS.md

It starts the fake vLLM in its fastest mode (no time per token), one consumer and one sender with
bench/tokens.yaml on the local RabbitMQ, then runs each workload against the fake vLLM directly
and through the sender, one after the other, with wrk (HTTP load in C, with bench/chat.lua) or
bench/clients.py (many waiting requests, a slow reader). It also measures the floor: a bare RPC
round trip through RabbitMQ (bench/floor.py), which is what global priority costs, both through
the services' own AMQP path (the verdicts use this one, the faster) and through aiormq's own API.
CPU seconds of every process are recorded per workload.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PY = sys.executable
MODEL = "bench-model"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def chat_body(max_tokens: int, stream: bool) -> str:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Say something short"}],
                            "max_tokens": max_tokens}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def rss_kb(self) -> int:
        return int(Path(f"/proc/{self.popen.pid}/statm").read_text().split()[1]) * PAGE_KB


@dataclass
class Row:
    workload: str
    target: str
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    cpu_s: dict[str, float] = field(default_factory=dict)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""
    except OSError:
        return 0, b""


def post(url: str, payload: dict[str, Any]) -> None:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"content-type": "application/json"})
    urllib.request.urlopen(request, timeout=5).read()


def wait_for(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: timed out waiting for {what}")


def ensure_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, capture_output=True)
        if shutil.which("wrk") is None:
            subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, capture_output=True)
        wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("bench: wrk is needed (Debian/Ubuntu: apt-get install wrk)")
    return wrk


def rabbitmq_cpu_s() -> float:
    """CPU seconds of the local RabbitMQ (its Erlang VM, all threads); 0 when it runs elsewhere."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(beam.smp)" in text:
            fields = text.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


class Bench:
    def __init__(self, short: bool, database_url: str | None = None) -> None:
        self.short = short
        self.database_url = database_url
        self.duration_s = 2 if short else 10
        self.processes: dict[str, Process] = {}
        self.ports = {"fake": 18000, "sender": 18080, "probe": 18081, "metrics": 19090}
        self.rows: list[Row] = []
        self.extra: dict[str, Any] = {}
        self.wrk = ensure_wrk()

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING"}
        logs = ROOT / "bench" / "out"
        logs.mkdir(exist_ok=True)

        def spawn(name: str, args: list[str], extra: dict[str, str]) -> Process:
            log = open(logs / f"{name}.log", "wb")
            process = Process(name, subprocess.Popen([PY, *args], cwd=ROOT, env={**env, **extra},
                                                     stdout=log, stderr=subprocess.STDOUT))
            self.processes[name] = process
            return process

        spawn("fake-vllm", ["tests/fake_vllm.py", "--port", str(self.ports["fake"]), "--model", MODEL,
                            "--default-max-tokens", "16"], {})
        wait_for(lambda: get(self.fake_url + "/health")[0] == 200, "the fake vLLM")
        spawn("consumer", ["consumer.py"], {
            "MODEL": MODEL, "VLLM_URL": self.fake_url, "PROBE_PORT": str(self.ports["probe"]),
            "MAX_PARALLEL_REQUESTS": "1024", "MIN_TOKENS_PER_SECOND_PER_USER": "0"})
        wait_for(lambda: get(self.probe_url + "/ready")[0] == 200, "the consumer")
        if self.database_url:  # the token store and the usage totals in the database, as deployed
            for command in (["migrate"], ["load", str(BENCH / "tokens.yaml")]):
                subprocess.run([PY, "admin.py", *command], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                               env={**env, "DATABASE_URL": self.database_url})
            tokens = {"DATABASE_URL": self.database_url}
        else:
            tokens = {"TOKENS_FILE": str(BENCH / "tokens.yaml")}
        spawn("sender", ["sender.py"], {
            "SENDER_PORT": str(self.ports["sender"]), "METRICS_PORT": str(self.ports["metrics"]), **tokens})
        wait_for(lambda: MODEL.encode() in self.authorized_get(self.sender_url + "/v1/models"), "the model")

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.popen.terminate()
        for process in self.processes.values():
            try:
                process.popen.wait(10)
            except subprocess.TimeoutExpired:
                process.popen.kill()

    @property
    def fake_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['fake']}"

    @property
    def sender_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['sender']}"

    @property
    def probe_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['probe']}"

    @staticmethod
    def authorized_get(url: str) -> bytes:
        request = urllib.request.Request(url, headers={"authorization": "Bearer sk-bench"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.read()
        except OSError:
            return b""

    def cpu(self) -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {**{name: p.cpu_s() for name, p in self.processes.items()},
                "client": usage.ru_utime + usage.ru_stime, "rabbitmq": rabbitmq_cpu_s()}

    def wrk_run(self, workload: str, target: str, connections: int, threads: int, body: str) -> Row:
        url = (self.fake_url if target == "direct" else self.sender_url) + "/v1/chat/completions"
        env = {**os.environ, "BENCH_BODY": body, "BENCH_TOKEN": "sk-bench"}
        before = self.cpu()
        result = subprocess.run([self.wrk, f"-t{threads}", f"-c{connections}", f"-d{self.duration_s}s",
                                 "--timeout", "10s", "-s", str(BENCH / "chat.lua"), url],
                                env=env, capture_output=True, text=True, check=True)
        after = self.cpu()
        line = next(line for line in result.stdout.splitlines() if line.startswith("BENCH "))
        stats = json.loads(line[6:])
        row = Row(workload, target, stats["requests"] / (stats["duration_us"] / 1e6),
                  stats["p50_us"] / 1000, stats["p90_us"] / 1000, stats["p99_us"] / 1000,
                  stats["errors"] + stats["non_2xx"], {k: after[k] - before[k] for k in after})
        self.rows.append(row)
        print(f"  {workload:<28} {target:<8} {row.rps:9.0f} req/s  p50 {row.p50_ms:7.2f} ms  "
              f"p99 {row.p99_ms:7.2f} ms  errors {row.errors}", flush=True)
        return row

    def floor(self, concurrency: int, client: str) -> dict[str, Any]:
        before = self.cpu()
        result = subprocess.run([PY, str(BENCH / "floor.py"), "--concurrency", str(concurrency), "--client", client,
                                 "--duration", str(self.duration_s)], capture_output=True, text=True, check=True)
        floor = json.loads(result.stdout.strip().splitlines()[-1])
        floor["client_cpu_s"] = self.cpu()["client"] - before["client"]
        print(f"  floor ({client:<10}) c={concurrency:<3}         {floor['per_s']:9.0f} rt/s   "
              f"p50 {floor['p50_ms']:7.2f} ms  p99 {floor['p99_ms']:7.2f} ms", flush=True)
        return floor

    def waiting_requests(self, count: int) -> dict[str, float]:
        """(d): `count` requests wait for a grant at once; sender memory per waiting request; drain rate."""
        sender = self.processes["sender"]
        post(self.fake_url + "/_fake/control", {"healthy": False})  # the consumer stops granting
        wait_for(lambda: get(self.probe_url + "/ready")[0] == 503, "the consumer to stop granting")
        time.sleep(0.5)  # let the sender's RSS settle after the previous workload
        rss_before = sender.rss_kb()
        client = subprocess.Popen([PY, str(BENCH / "clients.py"), "waiters", "--port", str(self.ports["sender"]),
                                   "--model", MODEL, "--count", str(count)], stdout=subprocess.PIPE, text=True)
        assert client.stdout is not None
        json.loads(client.stdout.readline())  # sent
        metric = f'dispatcher_queue_waiting{{model="{MODEL}"}} {float(count)}'.encode()
        wait_for(lambda: metric in get(f"http://127.0.0.1:{self.ports['metrics']}/metrics")[1],
                 f"{count} requests to wait in the queue", timeout_s=60)
        rss_waiting = sender.rss_kb()
        grants_before = self.consumer_grants()
        opened = time.monotonic()
        post(self.fake_url + "/_fake/control", {"healthy": True})
        answered = json.loads(client.stdout.readline())
        client.wait()
        grants = self.consumer_grants() - grants_before
        drain_s = answered["last"] - answered["first"]
        result = {"count": count, "rss_before_kb": rss_before, "rss_waiting_kb": rss_waiting,
                  "per_request_kb": (rss_waiting - rss_before) / count, "errors": answered["errors"],
                  "drain_s": drain_s, "drain_per_s": count / drain_s if drain_s else float("inf"),
                  "capacity_to_last_s": answered["last"] - opened, "grants": grants}
        print(f"  (d) {count} waiting: {result['per_request_kb']:.1f} KB each, drained in {drain_s:.2f} s "
              f"({result['drain_per_s']:.0f}/s), errors {answered['errors']}", flush=True)
        return result

    def consumer_grants(self) -> float:
        body = get(self.probe_url + "/metrics")[1].decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                   if re.match(r"^dispatcher_consumer_grants_total\b|^consumer_grants_total\b", line))

    def slow_reader(self, tokens: int) -> dict[str, Any]:
        """(e): a long stream read slowly; the sender's memory must stay flat (back-pressure)."""
        sender = self.processes["sender"]
        time.sleep(0.5)
        rss_before = sender.rss_kb()
        client = subprocess.Popen([PY, str(BENCH / "clients.py"), "slow-reader", "--port", str(self.ports["sender"]),
                                   "--model", MODEL, "--tokens", str(tokens), "--read-bytes", "4096",
                                   "--pause-ms", "10"], stdout=subprocess.PIPE, text=True)
        peak = rss_before
        while client.poll() is None:
            peak = max(peak, sender.rss_kb())
            time.sleep(0.02)
        assert client.stdout is not None
        done = json.loads(client.stdout.read().strip().splitlines()[-1])
        result = {"tokens": tokens, "bytes": done["bytes"], "seconds": done["seconds"], "complete": done["complete"],
                  "rss_before_kb": rss_before, "rss_peak_kb": peak, "growth_kb": peak - rss_before}
        print(f"  (e) {tokens}-token stream, slow reader: {done['bytes']} bytes in {done['seconds']:.1f} s, "
              f"sender RSS growth {result['growth_kb']} KB, complete={done['complete']}", flush=True)
        return result

    def run(self) -> None:
        chat16 = chat_body(16, False)
        stream64 = chat_body(64, True)
        print("floor:", flush=True)
        # "dispatcher": the AMQP path of the services (the verdicts use it: it is the faster floor);
        # "aiormq": the same RPC through aiormq's own API, for reference.
        self.extra["floors"] = [self.floor(concurrency, client)
                                for client in ("dispatcher", "aiormq") for concurrency in (1, 64)]
        print("workloads (direct = fake vLLM, through = sender):", flush=True)
        for target in ("direct", "through"):
            self.wrk_run("(a) 1 connection", target, 1, 1, chat16)
        for target in ("direct", "through"):
            self.wrk_run("(b) 64 connections", target, 64, 2, chat16)
        for target in ("direct", "through"):
            self.wrk_run("(c) 16 streams x 64 chunks", target, 16, 2, stream64)
        self.extra["waiting"] = self.waiting_requests(200 if self.short else 1000)
        self.extra["slow_reader"] = self.slow_reader(1000 if self.short else 4000)

    def floor_of(self, client: str, concurrency: int) -> dict[str, Any]:
        return next(f for f in self.extra["floors"] if f["client"] == client and f["concurrency"] == concurrency)

    def verdicts(self) -> list[tuple[str, str, bool]]:
        rows = {(r.workload[:3], r.target): r for r in self.rows}
        floor1, floor64 = self.floor_of("dispatcher", 1), self.floor_of("dispatcher", 64)
        a_direct, a_through = rows[("(a)", "direct")], rows[("(a)", "through")]
        added_p50 = a_through.p50_ms - a_direct.p50_ms
        added_p99 = a_through.p99_ms - a_direct.p99_ms
        b = rows[("(b)", "through")]
        c_direct, c_through = rows[("(c)", "direct")], rows[("(c)", "through")]
        waiting, slow = self.extra["waiting"], self.extra["slow_reader"]
        return [
            ("(a) p50 added ≤ floor p50 (c=1) + 0.3 ms",
             f"{added_p50:.2f} ms added vs {floor1['p50_ms'] + 0.3:.2f} ms", added_p50 <= floor1["p50_ms"] + 0.3),
            ("(a) p99 added ≤ 3 ms", f"{added_p99:.2f} ms", added_p99 <= 3),
            ("(b) ≥ 55 % of the floor's round trips/s (c=64), 0 errors",
             f"{b.rps:.0f} req/s = {100 * b.rps / floor64['per_s']:.0f} % of {floor64['per_s']:.0f} "
             f"({100 * b.rps / self.floor_of('aiormq', 64)['per_s']:.0f} % of the aiormq floor), {b.errors} errors",
             b.rps >= 0.55 * floor64["per_s"] and b.errors == 0),
            ("(c) ≥ 40 % of direct's requests/s, 0 errors",
             f"{c_through.rps:.0f} / {c_direct.rps:.0f} = {100 * c_through.rps / c_direct.rps:.0f} %, "
             f"{c_through.errors} errors", c_through.rps >= 0.4 * c_direct.rps and c_through.errors == 0),
            ("(d) ≤ 30 KB of sender memory per waiting request",
             f"{waiting['per_request_kb']:.1f} KB", waiting["per_request_kb"] <= 30 and waiting["errors"] == 0),
            ("(d) drains at the rate the consumer grants",
             f"{waiting['drain_per_s']:.0f} req/s drained, {waiting['grants']:.0f} grants for "
             f"{waiting['count']} requests; (b) through: {b.rps:.0f} req/s",
             waiting["errors"] == 0 and waiting["grants"] == waiting["count"]),
            ("(e) sender memory growth ≤ 5 MB over the stream", f"{slow['growth_kb'] / 1024:.2f} MB",
             slow["growth_kb"] <= 5 * 1024 and slow["complete"]),
        ]

    def report(self, command: str) -> str:
        lines = ["| workload | target | req/s | p50 ms | p90 ms | p99 ms | errors "
                 "| CPU s: fake / consumer / sender / RabbitMQ / wrk |",
                 "|---|---|---:|---:|---:|---:|---:|---|"]
        by_workload: dict[str, dict[str, Row]] = {}
        for row in self.rows:
            by_workload.setdefault(row.workload, {})[row.target] = row
            cpu = row.cpu_s
            lines.append(f"| {row.workload} | {row.target} | {row.rps:.0f} | {row.p50_ms:.2f} | {row.p90_ms:.2f} | "
                         f"{row.p99_ms:.2f} | {row.errors} | {cpu['fake-vllm']:.1f} / {cpu['consumer']:.1f} / "
                         f"{cpu['sender']:.1f} / {cpu['rabbitmq']:.1f} / {cpu['client']:.1f} |")
        lines += ["", "| workload | through / direct req/s | p50 added ms | p99 added ms "
                  "| CPU ms per request through: sender / consumer / RabbitMQ |", "|---|---:|---:|---:|---|"]
        for workload, pair in by_workload.items():
            direct, through = pair["direct"], pair["through"]
            count = through.rps * self.duration_s
            per_request = " / ".join(f"{through.cpu_s[name] * 1000 / count:.2f}"
                                     for name in ("sender", "consumer", "rabbitmq"))
            lines.append(f"| {workload} | {through.rps / direct.rps:.2f} | {through.p50_ms - direct.p50_ms:.2f} | "
                         f"{through.p99_ms - direct.p99_ms:.2f} | {per_request} |")
        lines += ["", "| floor: bare RPC through RabbitMQ | round trips/s | p50 ms | p90 ms | p99 ms |",
                  "|---|---:|---:|---:|---:|"]
        for floor in self.extra["floors"]:
            client = "services' AMQP path" if floor["client"] == "dispatcher" else "aiormq's own API"
            lines.append(f"| {client}, concurrency {floor['concurrency']} | {floor['per_s']:.0f} | "
                         f"{floor['p50_ms']:.2f} | {floor['p90_ms']:.2f} | {floor['p99_ms']:.2f} |")
        waiting, slow = self.extra["waiting"], self.extra["slow_reader"]
        lines += ["", f"(d) {waiting['count']} requests waiting at once: sender RSS {waiting['rss_before_kb']} KB → "
                  f"{waiting['rss_waiting_kb']} KB, {waiting['per_request_kb']:.1f} KB per waiting request; drained "
                  f"in {waiting['drain_s']:.2f} s ({waiting['drain_per_s']:.0f} req/s, first to last answer), "
                  f"{waiting['errors']} errors.",
                  "", f"(e) {slow['tokens']}-token stream ({slow['bytes']} bytes) read at about 4 KB per 10 ms: "
                  f"sender RSS {slow['rss_before_kb']} KB → peak {slow['rss_peak_kb']} KB "
                  f"(+{slow['growth_kb']} KB), stream complete: {slow['complete']}.",
                  "", "| target | measured | met |", "|---|---|---|"]
        for target, measured, met in self.verdicts():
            lines.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")
        versions = ", ".join(f"{name} {metadata.version(name)}" for name in
                             ("h11", "aiormq", "uvloop", "orjson", "asyncpg"))
        cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), platform.processor())
        rabbit = subprocess.run(["rabbitmqctl", "-q", "version"], capture_output=True, text=True).stdout.strip()
        wrk = subprocess.run([self.wrk, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        header = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{command}`.", "",
                  f"Machine: {os.cpu_count()} cores ({cpu_model}), {platform.system()} {platform.release()}; "
                  f"Python {platform.python_version()}; {versions}; RabbitMQ {rabbit or '?'}; {wrk.split(' Copyright')[0]}. "
                  f"Everything on one box: load generator, fake vLLM, consumer, sender and RabbitMQ share the "
                  f"cores. {self.duration_s} s per workload.", ""]
        return "\n".join(header + lines) + "\n"


def write_results(path: Path, table: str, section: str = "results") -> None:
    """Replaces what lies between the section's markers in `path` (appended when missing)."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = path.read_text() if path.exists() else f"# Benchmark results\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    path.write_text(f"{before}{start}\n{table}{end}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="a few seconds per workload, results in bench/out/")
    parser.add_argument("--database-url", help="tokens (and usage totals) in this database instead of bench/tokens.yaml "
                                               "(migrated and loaded by admin.py); results in bench/out/")
    args = parser.parse_args()
    bench = Bench(args.short, args.database_url)
    command = "python bench/run.py" + (" --short" if args.short else "") + (" --database-url ..." if args.database_url else "")
    try:
        bench.start()
        bench.run()
    finally:
        bench.stop()
    table = bench.report(command)
    path = BENCH / "out" / "RESULTS.md" if args.short or args.database_url else BENCH / "RESULTS.md"
    write_results(path, table)
    print(f"\n{table}\nwritten to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
