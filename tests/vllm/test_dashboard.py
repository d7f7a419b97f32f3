"""The Grafana dashboard (chart/dashboards/dispatcher.json) asks only for metrics that exist: every metric name in
its queries is exported by the sender, a consumer, or the real vLLM, as scraped here from running processes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.helpers import http
from tests.vllm.conftest import Dispatcher
from tests.vllm.server import VLLMServer

DASHBOARD = Path(__file__).resolve().parents[2] / "chart" / "dashboards" / "dispatcher.json"
# A metric name in PromQL: our families and vLLM's (with its colon); label names and functions never match.
METRIC = re.compile(r"\b(dispatcher_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("_sum", "_count", "_created"), "untyped": ("",)}


def exported_names(url: str) -> set[str]:
    """Every sample name a /metrics page can show, including families that have no sample yet."""
    status, body = http(url, timeout_s=5)
    assert status == 200, body
    names = set()
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            # prometheus_client names a counter's family with its _total already; vLLM's exporter too.
            names |= {family, *(family.removesuffix("_total") + suffix for suffix in SUFFIXES.get(kind, ("",)))}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_dashboard_query_names_an_exported_metric(dispatcher: Dispatcher, vllm_server: VLLMServer) -> None:
    exported = exported_names(dispatcher.sender.metrics_url) | exported_names(vllm_server.url + "/metrics")
    for consumer in dispatcher.consumers.values():
        exported |= exported_names(consumer.url + "/metrics")
    document = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in document["panels"] for target in panel["targets"]]
    queries += [variable["definition"] for variable in document["templating"]["list"] if "definition" in variable]
    named = {name for query in queries for name in METRIC.findall(query)}
    assert named, "no metric found in the dashboard's queries"
    assert named <= exported, f"queried but exported by nobody: {sorted(named - exported)}"
