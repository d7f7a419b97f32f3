"""Rendering the Helm chart and reading what it rendered: helpers for tests/deploy.

`render()` runs `helm template` on chart/ with value files from tests/deploy/values and returns the
objects as dicts (yaml.safe_load_all). The other functions walk those objects: pod specs, their
containers, and container environments resolved the way the kubelet resolves them.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "chart"
VALUES_DIR = Path(__file__).resolve().parent / "values"
SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
HELM_SCRIPT = ROOT / "scripts" / "helm.sh"

RELEASE = "disp"
NAMESPACE = "llm"
FULLNAME = f"{RELEASE}-aristote-dispatcher"
HELM_TIMEOUT_S = 60
POD_IP = "10.1.2.3"

WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "Job"})
_DEPENDENT_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass(frozen=True, slots=True)
class Case:
    """One `helm template` run: value files (under tests/deploy/values) and --set arguments."""

    id: str
    values: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()

    def helm_args(self) -> list[str]:
        args: list[str] = []
        for name in self.values:
            args += ["--values", str(VALUES_DIR / name)]
        for assignment in self.sets:
            args += ["--set", assignment]
        return args

    def value_documents(self) -> list[Any]:
        return [yaml.safe_load((VALUES_DIR / name).read_text()) for name in self.values]


# Every value set the tests render; test modules parametrize over these ids.
CASES: dict[str, Case] = {case.id: case for case in (
    Case("default"),
    Case("two-models", ("two-models.yaml",)),
    Case("two-models-rope-flags", ("two-models.yaml",), ("inferenceserver.ropeScalingArgs=rope-flags",)),
    Case("external-services", ("external-services.yaml",)),
    Case("external-inline-credentials", ("external-inline-credentials.yaml",)),
    Case("monitoring", ("monitoring.yaml",)),
    Case("mysql", ("mysql.yaml",)),
    Case("mysql-external", ("mysql-external.yaml",)),
    Case("gpus-from-inferenceserver", sets=("inferenceserver.resources.limits.nvidia\\.com/gpu=4",)),
    Case("tool-calling", ("tool-calling.yaml",)),
    Case("force-include-usage", ("force-include-usage.yaml",)),
)}


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=HELM_TIMEOUT_S, check=False)


def template(helm: str, case: Case) -> subprocess.CompletedProcess[str]:
    return run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *case.helm_args())


def render(helm: str, case: Case) -> list[dict[str, Any]]:
    result = template(helm, case)
    assert result.returncode == 0, f"helm template ({case.id}) failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# ---------------------------------------------------------------------------------------------
# Walking the objects

def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]


def workloads(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (o for o in objects if o["kind"] in WORKLOAD_KINDS)


def containers(workload: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    spec = pod_template(workload)["spec"]
    return [*(spec.get("initContainers", []) if init else []), *spec["containers"]]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in containers(workload) if c["name"] == name]
    assert len(matches) == 1, f"{workload['metadata']['name']} has no single container {name}"
    return matches[0]


def env_names(c: dict[str, Any]) -> list[str]:
    return [var["name"] for var in c.get("env", [])]


def secret_values(objects: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(secret name, key) -> value, for every Secret the chart renders."""
    values: dict[tuple[str, str], str] = {}
    for secret in find(objects, "Secret"):
        for key, value in secret.get("stringData", {}).items():
            values[(secret["metadata"]["name"], key)] = value
    return values


def resolve_env(c: dict[str, Any], secrets: Mapping[tuple[str, str], str]) -> dict[str, str]:
    """The container's environment as the process sees it.

    Like the kubelet: `$(VAR)` expands to a variable defined earlier in the list and is left as is
    otherwise. A secretKeyRef to a Secret the chart does not render (an existingSecret, the
    operator's) becomes a URL-safe placeholder naming it; status.podIP becomes POD_IP.
    """
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = _DEPENDENT_VAR.sub(
                lambda match: env.get(match.group(1), match.group(0)), str(var["value"]))
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = secrets.get((ref["name"], ref["key"]), f"from-{ref['name']}-{ref['key']}")
        elif source.get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[var["name"]] = POD_IP
        else:
            raise AssertionError(f"unexpected env source {source}")
    return env


def dependent_references(value: str) -> list[str]:
    return _DEPENDENT_VAR.findall(value)


def strings_under(document: Any, keys: frozenset[str]) -> set[str]:
    """Every string value in a values document whose key is one of `keys` (at any depth)."""
    found: set[str] = set()
    if isinstance(document, dict):
        for key, value in document.items():
            if key in keys and isinstance(value, str) and value:
                found.add(value)
            else:
                found |= strings_under(value, keys)
    elif isinstance(document, list):
        for item in document:
            found |= strings_under(item, keys)
    return found


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())
