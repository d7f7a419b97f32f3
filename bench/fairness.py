"""Sharing a saturated model: waits by token and priority, with fair share on and off, and Retry-After against the truth.

    python bench/fairness.py                  # about 2 minutes; prints the tables, writes bench/fairness.png
    python bench/fairness.py --seconds 8      # shorter runs

Needs the local RabbitMQ, and matplotlib for the picture (bench/requirements-plot.txt). It starts, for each
run, the fake vLLM (2 slots, each request holding one for 0.3 s: 15 tokens at 20 ms), a consumer with
FAIR_SHARE_LEVELS=4 (fair share on) or 1 (off: first come, first served within a priority) and a sender
with the tokens below, then keeps a number of requests outstanding per token for a while:

- one priority: `heavy` keeps 16 outstanding, `light` 2, both at priority 5;
- three priorities: `interactive` (9) keeps 2, `app` (5) 4, `batch-a` and `batch-b` (1) 8 and 2.

Wait = a request's latency less its service time (0.3 s). The probe then measures Retry-After: requests with
`X-Queue-Timeout: 0` get a 429 whose Retry-After is the sender's estimate; the same request without the header
is then timed. The closing lines compare both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.conftest import Service, Stack  # noqa: E402 - the integration tests' process helpers

SERVICE_S = 0.3
TOKENS = {  # name: (priority, threshold)
    "heavy": (5, 1000), "light": (5, 1000),
    "interactive": (9, 1000), "app": (5, 1000), "batch-a": (1, 1000), "batch-b": (1, 1000),
}
SCENARIOS = {
    "one priority": {"heavy": 16, "light": 2},
    "three priorities": {"interactive": 2, "app": 4, "batch-a": 8, "batch-b": 2},
}


class Load:
    def __init__(self, sender: Service, token: str, model: str, outstanding: int, stop: threading.Event) -> None:
        self.waits: list[float] = []
        self._client = openai.OpenAI(base_url=sender.url + "/v1", api_key=token, max_retries=0, timeout=120)
        self._model, self._stop = model, stop
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(outstanding)]

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._client.chat.completions.create(model=self._model, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=15)
            except openai.APIError:
                continue
            self.waits.append(max(0.0, time.monotonic() - started - SERVICE_S))


def run(levels: int, scenario: dict[str, int], seconds: float, tmp: Path, probe: bool) -> tuple[dict, list]:
    model = f"bench-fair-{uuid.uuid4().hex[:6]}"
    tokens_file = tmp / "tokens.yaml"
    tokens_file.write_text("".join(f"- {{token: sk-{name}, name: {name}, priority: {p}, threshold: {t}}}\n"
                                   for name, (p, t) in TOKENS.items()))
    stack = Stack(tmp, "")
    try:
        fake = stack.fake_vllm(model, "--tpot-ms", "20", "--slowdown", "0")
        stack.consumer(model, fake.url, MAX_PARALLEL_REQUESTS="2", FAIR_SHARE_LEVELS=str(levels),
                       MIN_TOKENS_PER_SECOND_PER_USER="0")
        sender = stack.sender(DATABASE_URL="", TOKENS_FILE=str(tokens_file), GRANT_TIMEOUT="300")
        stack.served(sender, model, "sk-heavy")
        stop = threading.Event()
        loads = {name: Load(sender, f"sk-{name}", model, n, stop) for name, n in scenario.items()}
        for load in loads.values():
            for thread in load.threads:
                thread.start()
        time.sleep(seconds)  # the measurement window itself
        probes = measure_retry_after(sender, model) if probe else []
        stop.set()
        for load in loads.values():
            for thread in load.threads:
                thread.join(120)
        return {name: load.waits for name, load in loads.items()}, probes
    finally:
        stack.stop()


def measure_retry_after(sender: Service, model: str, count: int = 4) -> list[tuple[int, float]]:
    """(Retry-After advertised, wait measured) for a priority-5 request joining the saturated queue."""
    results = []
    for _ in range(count):
        hurried = openai.OpenAI(base_url=sender.url + "/v1", api_key="sk-app", max_retries=0,
                                default_headers={"X-Queue-Timeout": "0"})
        try:
            hurried.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=15)
            continue  # admitted: no estimate to compare
        except openai.RateLimitError as error:
            advertised = int(error.response.headers["retry-after"])
        patient = openai.OpenAI(base_url=sender.url + "/v1", api_key="sk-app", max_retries=0, timeout=300)
        started = time.monotonic()
        patient.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=15)
        results.append((advertised, time.monotonic() - started - SERVICE_S))
    return results


def summary(waits: dict[str, list[float]]) -> list[tuple[str, int, float, float, float]]:
    total = sum(len(w) for w in waits.values()) or 1
    rows = []
    for name, values in waits.items():
        if len(values) >= 2:
            p50, p90 = statistics.median(values), statistics.quantiles(values, n=10)[-1]
        else:
            p50 = p90 = float("nan")
        rows.append((name, TOKENS[name][0], p50, p90, len(values) / total))
    return rows


def plot(results: dict[tuple[str, str], list], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCENARIOS), figsize=(11, 4.2))
    for axis, scenario in zip(axes, SCENARIOS):
        names = list(SCENARIOS[scenario])
        width = 0.38
        for offset, mode in ((-width / 2, "fair share off"), (width / 2, "fair share on")):
            rows = {row[0]: row for row in results[scenario, mode]}
            p90s = [rows[name][3] for name in names]
            bars = axis.bar([i + offset for i in range(len(names))], p90s, width, label=f"{mode} (p90)")
            axis.scatter([i + offset for i in range(len(names))], [rows[name][2] for name in names], color="black",
                         s=12, zorder=3, label="median" if offset > 0 else None)
            del bars
        axis.set_xticks(range(len(names)),
                        [f"{n}\nprio {TOKENS[n][0]}, {SCENARIOS[scenario][n]} out" for n in names], fontsize=8)
        axis.set_ylabel("wait for a grant (s)")
        axis.set_title(f"{scenario}: 2 slots, 0.3 s per request", fontsize=10)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "fairness.png")
    args = parser.parse_args()
    results: dict[tuple[str, str], list] = {}
    probes: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for scenario, outstanding in SCENARIOS.items():
            for mode, levels in (("fair share off", 1), ("fair share on", 4)):
                run_dir = Path(tmp) / f"{len(results)}"
                run_dir.mkdir()
                waits, measured = run(levels, outstanding, args.seconds, run_dir,
                                      probe=scenario == "one priority" and levels == 1)
                probes += measured
                results[scenario, mode] = summary(waits)
                print(f"\n{scenario}, {mode}:")
                print(f"  {'token':<12} {'priority':>8} {'wait p50':>9} {'wait p90':>9} {'grants':>7}")
                for name, priority, p50, p90, share in results[scenario, mode]:
                    print(f"  {name:<12} {priority:>8} {p50:>8.2f}s {p90:>8.2f}s {share:>6.0%}", flush=True)
    print("\nRetry-After (429 on X-Queue-Timeout: 0) against the wait that followed:")
    for advertised, waited in probes:
        print(f"  advertised {advertised:>3} s, waited {waited:5.2f} s, ratio {advertised / max(waited, 0.01):.2f}")
    try:
        plot(results, args.plot)
        print(f"\npicture: {args.plot.relative_to(ROOT)}")
    except ImportError:
        print("\n(no picture: pip install -r bench/requirements-plot.txt)")


if __name__ == "__main__":
    main()
