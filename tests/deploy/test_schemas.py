"""Every rendered object against its schema: Kubernetes' own (kubernetes-validate, strict: unknown
fields are errors), or, for the operators' custom resources, the schemas in tests/deploy/schemas."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.manifests import CASES, SCHEMAS_DIR

# A Kubernetes release still supported by the main distributions; the chart's kubeVersion is >=1.27.
KUBERNETES_VERSION = "1.32.0"

CUSTOM_RESOURCE_SCHEMAS = {
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): "rabbitmqcluster.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.json",
}


@cache
def custom_resource_validator(filename: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS_DIR / filename).read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(obj: dict[str, Any]) -> list[str]:
    where = f"{obj['kind']} {obj['metadata']['name']}"
    schema_file = CUSTOM_RESOURCE_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if schema_file is not None:
        return [f"{where}: {'/'.join(map(str, error.path))}: {error.message}"
                for error in custom_resource_validator(schema_file).iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{where}: {'/'.join(map(str, error.path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [(f"{where}: {obj['apiVersion']} {obj['kind']} is not a Kubernetes {KUBERNETES_VERSION} type "
                 "and has no schema under tests/deploy/schemas")]
    return []


@pytest.mark.parametrize("case_id", CASES)
def test_every_rendered_object_is_valid(rendered: dict[str, list[dict[str, Any]]], case_id: str) -> None:
    objects = rendered[case_id]
    assert objects, "nothing rendered"
    errors = [error for obj in objects for error in schema_errors(obj)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("case_id", CASES)
def test_object_names_are_unique_dns_labels(rendered: dict[str, list[dict[str, Any]]], case_id: str) -> None:
    seen: set[tuple[str, str]] = set()
    for obj in rendered[case_id]:
        name = obj["metadata"]["name"]
        assert len(name) <= 63 and name == name.lower(), name
        assert (obj["kind"], name) not in seen, f"two {obj['kind']} named {name}"
        seen.add((obj["kind"], name))


@pytest.mark.parametrize(("schema_file", "obj", "fragment"), [
    pytest.param("rabbitmqcluster.json",
                 {"apiVersion": "rabbitmq.com/v1beta1", "kind": "RabbitmqCluster", "metadata": {"name": "mq"},
                  "spec": {"replica": 1}}, "'replica' was unexpected", id="rabbitmq-typo"),
    pytest.param("servicemonitor.json",
                 {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "s"},
                  "spec": {"selector": {"matchLabels": {"a": "b"}}, "endpoints": [{"port": "m", "interval": "30"}]}},
                 "does not match", id="servicemonitor-interval"),
    pytest.param("podmonitor.json",
                 {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "p"},
                  "spec": {"selector": {"matchLabels": {"a": "b"}}}},
                 "'podMetricsEndpoints' is a required property", id="podmonitor-no-endpoints"),
])
def test_custom_resource_schemas_reject_mistakes(schema_file: str, obj: dict[str, Any], fragment: str) -> None:
    messages = [error.message for error in custom_resource_validator(schema_file).iter_errors(obj)]
    assert any(fragment in message for message in messages), messages
