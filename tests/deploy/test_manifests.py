"""What the rendered manifests must say: vLLM's arguments, the services' environment (the contract
of DESIGN.md, checked with the services' own configuration parsers), secrets, probes, security
contexts, the migration hook, the ingress, and the wiring between objects."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import admin
import consumer
import sender
from tests.deploy.manifests import (
    CASES,
    FULLNAME,
    POD_IP,
    ROOT,
    container,
    containers,
    dependent_references,
    env_names,
    find,
    labels_match,
    one,
    pod_template,
    resolve_env,
    secret_values,
    strings_under,
    workloads,
)

Objects = list[dict[str, Any]]
SENDER_IMAGE = "centralesupelec/aristote-dispatcher-sender"
CONSUMER_IMAGE = "centralesupelec/aristote-dispatcher-consumer"
POSTGRES_IMAGE = "postgres"
MYSQL_IMAGE = "mysql"

# DESIGN.md, "Configuration (environment variables)".
BOTH_ENV = {"RABBITMQ_HOST", "RABBITMQ_PORT", "RABBITMQ_USER", "RABBITMQ_PASSWORD", "LOG_LEVEL",
            "RPC_RECONNECT_ATTEMPTS", "MAX_PRIORITY"}
CONSUMER_ENV = BOTH_ENV | {"MODEL", "VLLM_URL", "VLLM_API_KEY", "MAX_PARALLEL_REQUESTS",
                           "MIN_TOKENS_PER_SECOND_PER_USER", "BURST_GRANTS", "FAIR_SHARE_LEVELS", "METRICS_REFRESH_SECONDS",
                           "RPC_QUEUE_EXPIRATION", "PROBE_PORT", "MAX_VLLM_CONNECTION_ATTEMPTS", "FORWARD_PRIORITY",
                           "LEASE_TIMEOUT_SECONDS"}
SENDER_ENV = BOTH_ENV | {"SENDER_HOST", "SENDER_PORT", "METRICS_PORT", "DATABASE_URL", "TOKEN_CACHE_SECONDS",
                         "GRANT_TIMEOUT", "PRIORITY_AGING_SECONDS", "UPSTREAM_TIMEOUT", "MAX_BODY_BYTES"}
# Variables that only exist for Kubernetes' $(VAR) expansion, not read by the services.
EXPANSION_HELPERS = {"POD_IP", "DB_USER", "DB_PASSWORD"}

SECRET_KEYS = frozenset({"password", "rootPassword", "token", "huggingface_token", "apiKey"})


def models_of(objects: Objects) -> dict[str, dict[str, Any]]:
    """Model name (the aristote-dispatcher/model label) -> its StatefulSet."""
    return {sts["metadata"]["labels"]["aristote-dispatcher/model"]: sts
            for sts in find(objects, "StatefulSet") if "aristote-dispatcher/model" in sts["metadata"]["labels"]}


def image_repository(c: dict[str, Any]) -> str:
    return c["image"].rsplit(":", 1)[0]


def consumer_containers(objects: Objects) -> list[dict[str, Any]]:
    return [container(sts, "consumer") for sts in models_of(objects).values()]


# ---------------------------------------------------------------------------------------------
# vLLM

@pytest.mark.parametrize(("case_id", "model", "args"), [
    pytest.param("default", "qwen2-5-7b-instruct", [
        "--model", "Qwen/Qwen2.5-7B-Instruct", "--served-model-name", "Qwen/Qwen2.5-7B-Instruct",
        "--port", "8000", "--gpu-memory-utilization", "0.9"], id="default"),
    pytest.param("two-models", "llama-3-1-8b", [
        "--model", "meta-llama/Llama-3.1-8B-Instruct", "--served-model-name", "llama-3.1-8b",
        "--port", "8000", "--gpu-memory-utilization", "0.85", "--dtype", "bfloat16",
        "--scheduling-policy", "priority",
        "--hf-overrides", '{"rope_scaling": {"rope_type":"dynamic","factor":4.0}, "rope_theta": 500000}',
        "--max-model-len", "32768", "--enable-prefix-caching"], id="served-name-dtype-rope-theta-extra-priority"),
    pytest.param("two-models", "qwen-72b-awq", [
        "--model", "Qwen/Qwen2.5-72B-Instruct-AWQ", "--served-model-name", "Qwen/Qwen2.5-72B-Instruct-AWQ",
        "--port", "8000", "--gpu-memory-utilization", "0.9", "--quantization", "awq",
        "--tensor-parallel-size", "2",
        "--hf-overrides",
        '{"rope_scaling": {"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":32768}}'],
        id="quantization-tensor-parallel-rope-without-theta"),
    pytest.param("gpus-from-inferenceserver", "qwen2-5-7b-instruct", [
        "--model", "Qwen/Qwen2.5-7B-Instruct", "--served-model-name", "Qwen/Qwen2.5-7B-Instruct",
        "--port", "8000", "--gpu-memory-utilization", "0.9", "--tensor-parallel-size", "4"],
        id="tensor-parallel-from-inferenceserver-gpus"),
    pytest.param("two-models-rope-flags", "llama-3-1-8b", [
        "--model", "meta-llama/Llama-3.1-8B-Instruct", "--served-model-name", "llama-3.1-8b",
        "--port", "8000", "--gpu-memory-utilization", "0.85", "--dtype", "bfloat16",
        "--scheduling-policy", "priority",
        "--rope-scaling", '{"rope_type":"dynamic","factor":4.0}', "--rope-theta", "500000",
        "--max-model-len", "32768", "--enable-prefix-caching"], id="rope-flags"),
    pytest.param("two-models-rope-flags", "qwen-72b-awq", [
        "--model", "Qwen/Qwen2.5-72B-Instruct-AWQ", "--served-model-name", "Qwen/Qwen2.5-72B-Instruct-AWQ",
        "--port", "8000", "--gpu-memory-utilization", "0.9", "--quantization", "awq",
        "--tensor-parallel-size", "2",
        "--rope-scaling", '{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":32768}'],
        id="rope-flags-without-theta"),
    pytest.param("tool-calling", "llama-tools", [
        "--model", "meta-llama/Llama-3.1-8B-Instruct", "--served-model-name", "llama-3.1-8b",
        "--port", "8000", "--gpu-memory-utilization", "0.9",
        "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json",
        "--chat-template", "/etc/vllm/chat-template/chat-template.jinja", "--max-model-len", "32768"],
        id="tool-calling-and-chat-template-before-extra-args"),
    pytest.param("tool-calling", "mistral-tools", [
        "--model", "mistralai/Mistral-7B-Instruct-v0.3", "--served-model-name", "mistralai/Mistral-7B-Instruct-v0.3",
        "--port", "8000", "--gpu-memory-utilization", "0.9",
        "--enable-auto-tool-choice", "--tool-call-parser", "mistral",
        "--chat-template", "/templates/tool_chat_template_mistral.jinja"], id="tool-calling-and-chat-template-path"),
    pytest.param("tool-calling", "qwen-tools", [
        "--model", "Qwen/Qwen2.5-7B-Instruct", "--served-model-name", "Qwen/Qwen2.5-7B-Instruct",
        "--port", "8000", "--gpu-memory-utilization", "0.9",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes"], id="tool-calling-alone"),
])
def test_vllm_arguments_come_from_the_model_values(rendered: dict[str, Objects], case_id: str, model: str,
                                                   args: list[str]) -> None:
    vllm = container(models_of(rendered[case_id])[model], "vllm")
    assert vllm["args"] == args
    for flag in ("--hf-overrides", "--rope-scaling"):
        if flag in args:
            json.loads(args[args.index(flag) + 1])  # vLLM parses it as JSON


@pytest.mark.parametrize(("case_id", "expected"), [("default", [False]), ("force-include-usage", [True, False])])
def test_force_include_usage_from_the_inferenceserver_value_or_the_model(rendered: dict[str, Objects], case_id: str,
                                                                          expected: list[bool]) -> None:
    """vLLM streams its usage on every answer only when asked: the sender's counts are then exact."""
    flags = ["--enable-force-include-usage" in container(sts, "vllm")["args"] for sts in models_of(rendered[case_id]).values()]
    assert flags == expected


def test_chat_template_content_reaches_vllm_through_a_config_map(rendered: dict[str, Objects]) -> None:
    """The template is mounted byte for byte at the path vLLM gets, and a new one restarts the pods
    (vLLM reads it at start); a path, or no template, mounts nothing."""
    objects = rendered["tool-calling"]
    values = {m["name"]: m for m in CASES["tool-calling"].value_documents()[0]["models"]}
    sts = models_of(objects)["llama-tools"]
    vllm = container(sts, "vllm")
    path = vllm["args"][vllm["args"].index("--chat-template") + 1]
    [mount] = [m for m in vllm["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in pod_template(sts)["spec"]["volumes"] if v["name"] == mount["name"]]
    config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    template = values["llama-tools"]["chatTemplate"]
    assert config_map["data"][path.removeprefix(mount["mountPath"] + "/")] == template
    assert "\t" in template and "{{ message['role'] }}" in template
    assert mount["readOnly"] is True
    assert pod_template(sts)["metadata"]["annotations"]["checksum/chat-template"] == \
        hashlib.sha256(template.encode()).hexdigest()
    for model in ("mistral-tools", "qwen-tools"):
        other = models_of(objects)[model]
        assert "chat-template" not in {v["name"] for v in pod_template(other)["spec"]["volumes"]}
        assert "annotations" not in pod_template(other)["metadata"]
    assert [c["metadata"]["name"] for c in find(objects, "ConfigMap") if "chat-template" in c["metadata"]["name"]] == \
        [volume["configMap"]["name"]]


@pytest.mark.parametrize(("case_id", "model", "replicas", "gpus", "cache_size", "storage_class"), [
    pytest.param("default", "qwen2-5-7b-instruct", 1, 1, None, None, id="default-no-pvc"),
    pytest.param("two-models", "llama-3-1-8b", 2, 1, "40Gi", "fast-ssd", id="pvc-with-class"),
    pytest.param("two-models", "qwen-72b-awq", 1, 2, "200Gi", None, id="pvc-two-gpus"),
    pytest.param("gpus-from-inferenceserver", "qwen2-5-7b-instruct", 1, 4, None, None, id="gpus-from-inferenceserver"),
])
def test_model_pods_have_gpus_shared_memory_and_a_model_cache(rendered: dict[str, Objects], case_id: str, model: str,
                                                             replicas: int, gpus: int, cache_size: str | None,
                                                             storage_class: str | None) -> None:
    sts = models_of(rendered[case_id])[model]
    assert sts["spec"]["replicas"] == replicas
    vllm = container(sts, "vllm")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] == gpus
    volumes = {v["name"]: v for v in pod_template(sts)["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["mountPath"]: m["name"] for m in vllm["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm"
    assert mounts["/root/.cache/huggingface"] == "hf-cache"
    claims = {c["metadata"]["name"]: c["spec"] for c in sts["spec"].get("volumeClaimTemplates", [])}
    if cache_size is None:
        assert "hf-cache" not in claims and "emptyDir" in volumes["hf-cache"]
    else:
        assert "hf-cache" not in volumes, "a PVC model cache must not also be an emptyDir"
        assert claims["hf-cache"]["resources"]["requests"]["storage"] == cache_size
        assert claims["hf-cache"].get("storageClassName") == storage_class


@pytest.mark.parametrize(("case_id", "model", "secret", "key"), [
    pytest.param("two-models", "llama-3-1-8b", f"{FULLNAME}-inference", "hf-token-llama-3-1-8b", id="from-values"),
    pytest.param("external-services", "mistral-7b", "hf-credentials", "token", id="existing-secret"),
])
def test_hugging_face_token_comes_from_a_secret(rendered: dict[str, Objects], case_id: str, model: str, secret: str,
                                                key: str) -> None:
    vllm = container(models_of(rendered[case_id])[model], "vllm")
    refs = {var["name"]: var["valueFrom"]["secretKeyRef"] for var in vllm["env"] if "valueFrom" in var}
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        assert refs[name] == {"name": secret, "key": key}


# ---------------------------------------------------------------------------------------------
# The environment contract (DESIGN.md), checked against the services' own parsers

@pytest.mark.parametrize("case_id", CASES)
def test_consumer_environment_is_the_design_contract(rendered: dict[str, Objects], case_id: str) -> None:
    objects = rendered[case_id]
    for sts in models_of(objects).values():
        c = container(sts, "consumer")
        names = env_names(c)
        assert len(names) == len(set(names)), f"duplicate variables: {names}"
        assert set(names) - EXPANSION_HELPERS == CONSUMER_ENV


@pytest.mark.parametrize("case_id", CASES)
def test_sender_environment_is_the_design_contract(rendered: dict[str, Objects], case_id: str) -> None:
    c = container(one(rendered[case_id], "Deployment", f"{FULLNAME}-sender"), "sender")
    names = env_names(c)
    assert len(names) == len(set(names)), f"duplicate variables: {names}"
    assert set(names) - EXPANSION_HELPERS == SENDER_ENV


@pytest.mark.parametrize(("source", "names"), [
    pytest.param(["consumer.py", "common/config.py"], CONSUMER_ENV, id="consumer"),
    pytest.param(["sender.py", "common/config.py"], SENDER_ENV, id="sender"),
])
def test_every_variable_the_chart_sets_is_read_by_the_service(source: list[str], names: set[str]) -> None:
    code = "".join((ROOT / path).read_text() for path in source)
    unread = sorted(name for name in names if f'"{name}"' not in code)
    assert not unread, f"the chart sets variables no service reads: {unread}"


@pytest.mark.parametrize("case_id", CASES)
def test_consumer_configuration_parses_and_points_at_its_own_vllm(rendered: dict[str, Objects], case_id: str) -> None:
    objects = rendered[case_id]
    secrets = secret_values(objects)
    for sts in models_of(objects).values():
        vllm = container(sts, "vllm")
        env = resolve_env(container(sts, "consumer"), secrets)
        config = consumer.Config.from_env(env)
        served = vllm["args"][vllm["args"].index("--served-model-name") + 1]
        assert config.model == served, "MODEL must be vLLM's served model name"
        # The sender connects to the URL in the grant: the pod's IP, never localhost.
        port = vllm["ports"][0]["containerPort"]
        assert [server.url for server in config.servers] == [f"http://{POD_IP}:{port}"]
        vllm_key = resolve_env(vllm, secrets)["VLLM_API_KEY"]
        assert config.servers[0].api_key == vllm_key, "the consumer must hand out the key vLLM checks"
        assert config.forward_priority == ("--scheduling-policy" in vllm["args"])
        assert config.rabbitmq_url.startswith("amqp://")


@pytest.mark.parametrize(("case_id", "model", "parallel", "min_speed", "burst", "forward"), [
    pytest.param("default", "qwen2-5-7b-instruct", 64, 10.0, 4, False, id="chart-defaults"),
    pytest.param("two-models", "llama-3-1-8b", 32, 10.0, 4, True, id="model-overrides-parallel-and-priority"),
    pytest.param("two-models", "qwen-72b-awq", 64, 12.5, 2, False, id="model-overrides-speed-floor-and-burst"),
])
def test_consumer_capacity_settings(rendered: dict[str, Objects], case_id: str, model: str, parallel: int,
                                    min_speed: float, burst: int, forward: bool) -> None:
    objects = rendered[case_id]
    env = resolve_env(container(models_of(objects)[model], "consumer"), secret_values(objects))
    config = consumer.Config.from_env(env)
    assert config.servers[0].max_parallel == parallel
    assert config.min_tokens_per_second_per_user == min_speed
    assert config.burst_grants == burst
    assert config.forward_priority is forward
    assert config.max_vllm_connection_attempts >= 3600, "the consumer must outwait a model download"


@pytest.mark.parametrize(("case_id", "database_url", "rabbitmq_url"), [
    pytest.param("default", f"postgresql://dispatcher:<password>@{FULLNAME}-postgresql:5432/dispatcher",
                 f"amqp://from-{FULLNAME}-rabbitmq-default-user-username:from-{FULLNAME}-rabbitmq-default-user-password"
                 f"@{FULLNAME}-rabbitmq:5672/", id="internal"),
    pytest.param("two-models", f"postgresql://dispatcher:test-user-password-456@{FULLNAME}-postgresql:5432/dispatcher",
                 None, id="internal-with-passwords"),
    pytest.param("external-services",
                 "postgresql://dispatcher_app:from-dispatcher-db-credentials-password@postgres.db.svc.cluster.local:6432"
                 "/tokens",
                 "amqp://from-dispatcher-rabbitmq-credentials-username:from-dispatcher-rabbitmq-credentials-password"
                 "@rabbitmq.messaging.svc.cluster.local:5671/", id="external-existing-secrets"),
    pytest.param("external-inline-credentials",
                 "postgresql://dispatcher:test-external-db-password-def@pg.example.internal:5432/dispatcher",
                 "amqp://dispatcher:test-rabbit-password-abc@10.0.0.10:5672/", id="external-inline"),
    pytest.param("mysql", f"mysql://dispatcher:test-mysql-user-password-654@{FULLNAME}-mysql:3306/dispatcher",
                 None, id="internal-mysql"),
    pytest.param("mysql-external",
                 "mysql://dispatcher_app:from-dispatcher-db-credentials-password@mysql.db.svc.cluster.local:3306/tokens",
                 None, id="external-mysql"),
])
def test_sender_configuration_parses_with_the_database_and_broker(rendered: dict[str, Objects], case_id: str,
                                                                  database_url: str, rabbitmq_url: str | None) -> None:
    objects = rendered[case_id]
    secrets = secret_values(objects)
    env = resolve_env(container(one(objects, "Deployment", f"{FULLNAME}-sender"), "sender"), secrets)
    config = sender.Config.from_env(env)
    password = secrets.get((f"{FULLNAME}-database", "password"), "")
    assert config.database_url == database_url.replace("<password>", password)
    if rabbitmq_url is not None:
        assert config.rabbitmq_url == rabbitmq_url
    assert (config.port, config.metrics_port) == (8080, 9090)


@pytest.mark.parametrize("case_id", CASES)
def test_dependent_variables_are_defined_before_use(rendered: dict[str, Objects], case_id: str) -> None:
    for workload in workloads(rendered[case_id]):
        for c in containers(workload):
            defined: set[str] = set()
            for var in c.get("env", []):
                for reference in dependent_references(str(var.get("value", ""))):
                    assert reference in defined, f"{c['name']}: {var['name']} uses $({reference}) before it is set"
                defined.add(var["name"])


# ---------------------------------------------------------------------------------------------
# Secrets

@pytest.mark.parametrize("case_id", CASES)
def test_secrets_are_referenced_never_inlined(rendered: dict[str, Objects], case_id: str) -> None:
    objects = rendered[case_id]
    secrets = secret_values(objects)
    from_values = set().union(*(strings_under(doc, SECRET_KEYS) for doc in CASES[case_id].value_documents()))
    rendered_secrets = {value for (_, key), value in secrets.items()
                        if key != "username" and len(value) >= 8 and "\n" not in value}
    tokens = {entry["token"] for (_, key), value in secrets.items() if key == "tokens.yaml"
              for entry in yaml.safe_load(value) or []}
    sensitive = from_values | rendered_secrets | tokens
    for value in from_values:
        assert any(value in stored for stored in secrets.values()), f"{value!r} from the values is in no Secret"
    for obj in objects:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        leaked = sorted(value for value in sensitive if value in text)
        assert not leaked, f"{obj['kind']} {obj['metadata']['name']} contains secret values {leaked}"


@pytest.mark.parametrize("case_id", CASES)
def test_sensitive_variables_come_from_secret_key_refs(rendered: dict[str, Objects], case_id: str) -> None:
    objects = rendered[case_id]
    for workload in workloads(objects):
        for c in containers(workload):
            for var in c.get("env", []):
                if re.search(r"PASSWORD|TOKEN$|API_KEY", var["name"]):
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{c['name']}: {var['name']} is inlined"


@pytest.mark.parametrize(("case_id", "external"), [
    pytest.param("default", {f"{FULLNAME}-rabbitmq-default-user": {"username", "password"}}, id="default"),
    pytest.param("two-models", {f"{FULLNAME}-rabbitmq-default-user": {"username", "password"}}, id="two-models"),
    pytest.param("external-services", {
        "dispatcher-rabbitmq-credentials": {"username", "password"},
        "dispatcher-db-credentials": {"password"},
        "dispatcher-vllm-key": {"api-key"},
        "dispatcher-tokens": {"tokens.yaml"},
        "hf-credentials": {"token"}}, id="external-services"),
    pytest.param("external-inline-credentials", {}, id="external-inline-credentials"),
])
def test_every_secret_reference_resolves(rendered: dict[str, Objects], case_id: str,
                                         external: dict[str, set[str]]) -> None:
    """A reference names a key of a Secret the chart renders, or of one documented as the user's
    (existingSecret) or the RabbitMQ operator's (`<cluster>-default-user`)."""
    objects = rendered[case_id]
    available: dict[str, set[str]] = {name: set(keys) for name, keys in external.items()}
    for (name, key) in secret_values(objects):
        available.setdefault(name, set()).add(key)
    used: dict[str, set[str]] = {}
    for workload in workloads(objects):
        spec = pod_template(workload)["spec"]
        for c in containers(workload):
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.setdefault(ref["name"], set()).add(ref["key"])
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                used.setdefault(volume["secret"]["secretName"], set()).update(
                    item["key"] for item in volume["secret"]["items"])
    for name, keys in used.items():
        assert keys <= available.get(name, set()), f"Secret {name}: keys {keys - available.get(name, set())} missing"
    assert set(external) <= set(used), f"documented Secrets never used: {set(external) - set(used)}"


def test_tokens_secret_is_what_admin_load_reads(rendered: dict[str, Objects], tmp_path: Path) -> None:
    secrets = secret_values(rendered["two-models"])
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(secrets[(f"{FULLNAME}-tokens", "tokens.yaml")])
    entries = admin.load_token_entries(tokens_file, max_priority=10)
    batch_name = admin.default_name("sk-test-batch-0123456789")
    assert entries == [
        {"name": "interactive", "token": "sk-test-interactive-0123456789", "priority": 9, "threshold": 100,
         "max_in_flight": None},
        {"name": batch_name, "token": "sk-test-batch-0123456789", "priority": 1, "threshold": 10,
         "max_in_flight": None},
        {"name": "background", "token": "sk-test-background-0123456789", "priority": 0, "threshold": 0,
         "max_in_flight": 2},
    ]


# ---------------------------------------------------------------------------------------------
# Probes, resources, security

@pytest.mark.parametrize("case_id", CASES)
def test_long_running_containers_have_probes(rendered: dict[str, Objects], case_id: str) -> None:
    for workload in workloads(rendered[case_id]):
        if workload["kind"] == "Job":
            continue
        for c in containers(workload, init=False):
            where = f"{workload['metadata']['name']}/{c['name']}"
            assert "livenessProbe" in c and "readinessProbe" in c, f"{where} lacks probes"
            named_ports = {port["name"] for port in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in named_ports, f"{where}: {probe} on unknown port {port}"


@pytest.mark.parametrize(("case_id", "workload", "container_name", "probes"), [
    pytest.param("default", f"{FULLNAME}-sender", "sender",
                 {"livenessProbe": "/health/liveness", "readinessProbe": "/health/readiness"}, id="sender"),
    pytest.param("default", f"{FULLNAME}-qwen2-5-7b-instruct", "consumer",
                 {"livenessProbe": "/health", "readinessProbe": "/ready"}, id="consumer"),
    pytest.param("default", f"{FULLNAME}-qwen2-5-7b-instruct", "vllm",
                 {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/health"}, id="vllm"),
])
def test_probe_paths(rendered: dict[str, Objects], case_id: str, workload: str, container_name: str,
                     probes: dict[str, str]) -> None:
    objects = rendered[case_id]
    owner = next(w for w in workloads(objects) if w["metadata"]["name"] == workload)
    c = container(owner, container_name)
    assert {probe: c[probe]["httpGet"]["path"] for probe in probes} == probes


def test_vllm_startup_probe_allows_a_long_model_download(rendered: dict[str, Objects]) -> None:
    vllm = container(models_of(rendered["default"])["qwen2-5-7b-instruct"], "vllm")
    startup = vllm["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600


@pytest.mark.parametrize("case_id", CASES)
def test_every_container_requests_cpu_and_memory(rendered: dict[str, Objects], case_id: str) -> None:
    for workload in workloads(rendered[case_id]):
        for c in containers(workload):
            requests = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{workload['metadata']['name']}/{c['name']}: {requests}"


@pytest.mark.parametrize("case_id", CASES)
def test_our_containers_run_as_non_root_on_a_read_only_root(rendered: dict[str, Objects], case_id: str) -> None:
    checked = 0
    for workload in workloads(rendered[case_id]):
        pod_spec = pod_template(workload)["spec"]
        assert pod_spec.get("automountServiceAccountToken") is False
        pod_context = pod_spec.get("securityContext", {})
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        for c in containers(workload):
            context = c.get("securityContext", {})
            where = f"{workload['metadata']['name']}/{c['name']}"
            assert context.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in context.get("capabilities", {}).get("drop", []), where
            if image_repository(c) not in (SENDER_IMAGE, CONSUMER_IMAGE, POSTGRES_IMAGE, MYSQL_IMAGE):
                continue  # vLLM's image runs as root and writes its caches where it likes
            checked += 1
            assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, where
            assert context.get("readOnlyRootFilesystem") is True, where
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp must be a writable emptyDir"
            if image_repository(c) in (SENDER_IMAGE, CONSUMER_IMAGE):
                uid = context.get("runAsUser", pod_context.get("runAsUser"))
                assert uid == 10001, f"{where}: the images' user is 10001, got {uid}"
    assert checked >= 3


# ---------------------------------------------------------------------------------------------
# The migration hook

@pytest.mark.parametrize(("case_id", "tokens_secret", "host", "port"), [
    pytest.param("default", f"{FULLNAME}-tokens", f"{FULLNAME}-postgresql", "5432", id="internal-database"),
    pytest.param("external-services", "dispatcher-tokens", "postgres.db.svc.cluster.local", "6432",
                 id="external-database"),
    pytest.param("mysql", f"{FULLNAME}-tokens", f"{FULLNAME}-mysql", "3306", id="internal-mysql"),
    pytest.param("mysql-external", f"{FULLNAME}-tokens", "mysql.db.svc.cluster.local", "3306", id="external-mysql"),
])
def test_hook_job_waits_for_the_database_then_migrates_and_loads_tokens(rendered: dict[str, Objects], case_id: str,
                                                                      tokens_secret: str, host: str,
                                                                      port: str) -> None:
    job = one(rendered[case_id], "Job", f"{FULLNAME}-migrate")
    annotations = job["metadata"]["annotations"]
    # The internal database is part of the release: it exists only after install, never before.
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    spec = pod_template(job)["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["wait-for-database", "migrate"]
    wait, migrate = spec["initContainers"]
    assert wait["command"][-3:-1] == [host, port]
    assert migrate["command"] == ["python", "admin.py", "migrate"]
    (load,) = spec["containers"]
    assert load["command"] == ["python", "admin.py", "load", "/tokens/tokens.yaml"]
    for c in (wait, migrate, load):
        assert image_repository(c) == SENDER_IMAGE, "admin.py ships in the sender image"
    for c in (migrate, load):
        assert "DATABASE_URL" in env_names(c)
    tokens_mount = next(m for m in load["volumeMounts"] if m["mountPath"] == "/tokens")
    volume = next(v for v in spec["volumes"] if v["name"] == tokens_mount["name"])
    assert volume["secret"]["secretName"] == tokens_secret


def test_database_wait_script_is_valid_python(rendered: dict[str, Objects]) -> None:
    job = one(rendered["default"], "Job", f"{FULLNAME}-migrate")
    wait = pod_template(job)["spec"]["initContainers"][0]
    assert wait["command"][:2] == ["python", "-c"]
    compile(wait["command"][2], "wait-for-database", "exec")


# ---------------------------------------------------------------------------------------------
# Internal services, ingress, monitoring, wiring

@pytest.mark.parametrize(("case_id", "kinds"), [
    pytest.param("default", {"Deployment": 1, "StatefulSet": 2, "RabbitmqCluster": 1, "Job": 1, "Ingress": 0,
                             "ServiceMonitor": 0, "PodMonitor": 0, "Secret": 3, "ConfigMap": 1}, id="default"),
    pytest.param("two-models", {"StatefulSet": 3, "Ingress": 1, "Service": 4}, id="two-models"),
    pytest.param("external-services", {"StatefulSet": 1, "RabbitmqCluster": 0, "Secret": 0, "ConfigMap": 0,
                                       "Job": 1}, id="external-services"),
    pytest.param("external-inline-credentials", {"RabbitmqCluster": 0, "Secret": 4}, id="external-inline"),
    pytest.param("monitoring", {"ServiceMonitor": 1, "PodMonitor": 3}, id="monitoring"),
    pytest.param("mysql", {"StatefulSet": 2, "Service": 3, "Secret": 3, "ConfigMap": 0}, id="mysql"),
    pytest.param("mysql-external", {"StatefulSet": 1, "Service": 2, "Secret": 2, "ConfigMap": 0}, id="mysql-external"),
])
def test_rendered_object_counts(rendered: dict[str, Objects], case_id: str, kinds: dict[str, int]) -> None:
    counts = {kind: len(find(rendered[case_id], kind)) for kind in kinds}
    assert counts == kinds


def test_internal_database_creates_the_application_user_from_secrets(rendered: dict[str, Objects]) -> None:
    objects = rendered["default"]
    db = one(objects, "StatefulSet", f"{FULLNAME}-postgresql")
    env = {var["name"]: var for var in container(db, "postgresql")["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-database",
                                                                     "key": "postgres-password"}
    assert env["APP_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-database", "key": "password"}
    assert env["APP_USER"]["value"] == "dispatcher" and env["POSTGRES_DB"]["value"] == "dispatcher"
    script = one(objects, "ConfigMap", f"{FULLNAME}-postgresql-initdb")["data"]["00-create-app-user.sh"]
    assert ':"app_user" LOGIN PASSWORD :\'app_password\'' in script, "psql variables, never interpolated SQL"
    assert db["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"


def test_internal_mysql_creates_the_application_user_from_secrets(rendered: dict[str, Objects]) -> None:
    """The official image's entrypoint makes the user and the database from these variables."""
    objects = rendered["mysql"]
    db = one(objects, "StatefulSet", f"{FULLNAME}-mysql")
    (mysql,) = containers(db)
    assert mysql["image"] == "mysql:8.4"
    env = {var["name"]: var for var in mysql["env"]}
    assert env["MYSQL_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-database",
                                                                       "key": "mysql-root-password"}
    assert env["MYSQL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-database", "key": "password"}
    assert env["MYSQL_USER"]["value"] == "dispatcher" and env["MYSQL_DATABASE"]["value"] == "dispatcher"
    secrets = secret_values(objects)
    assert secrets[(f"{FULLNAME}-database", "mysql-root-password")] == "test-mysql-root-password-321"
    assert (f"{FULLNAME}-database", "postgres-password") not in secrets
    assert not find(objects, "StatefulSet", f"{FULLNAME}-postgresql")

    mounts = {m["mountPath"]: m for m in mysql["volumeMounts"]}
    assert mounts["/var/lib/mysql"]["subPath"], "MySQL initialises only an empty directory, not a volume's root"
    volumes = {v["name"]: v for v in pod_template(db)["spec"]["volumes"]}
    assert volumes[mounts["/docker-entrypoint-initdb.d"]["name"]]["configMap"]["name"] == "dispatcher-mysql-init"
    assert db["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert mysql[probe]["exec"]["command"][:2] == ["mysqladmin", "ping"]
    service = one(objects, "Service", f"{FULLNAME}-mysql")
    assert service["spec"]["ports"][0]["port"] == 3306
    assert labels_match(service["spec"]["selector"], pod_template(db)["metadata"]["labels"])


def test_internal_rabbitmq_is_a_cluster_of_the_operator(rendered: dict[str, Objects]) -> None:
    cluster = one(rendered["default"], "RabbitmqCluster", f"{FULLNAME}-rabbitmq")
    assert cluster["spec"]["replicas"] == 1
    assert cluster["spec"]["persistence"]["storage"] == "10Gi"


@pytest.mark.parametrize(("annotation", "expected"), [
    pytest.param("nginx.ingress.kubernetes.io/proxy-buffering", "off", id="no-response-buffering"),
    pytest.param("nginx.ingress.kubernetes.io/proxy-request-buffering", "off", id="no-request-buffering"),
    pytest.param("nginx.ingress.kubernetes.io/proxy-read-timeout", "3600", id="read-timeout"),
    pytest.param("nginx.ingress.kubernetes.io/proxy-send-timeout", "3600", id="send-timeout"),
    pytest.param("nginx.ingress.kubernetes.io/proxy-body-size", "64m", id="body-size"),
])
def test_ingress_has_the_annotations_of_a_streaming_endpoint(rendered: dict[str, Objects], annotation: str,
                                                            expected: str) -> None:
    ingress = one(rendered["two-models"], "Ingress", FULLNAME)
    assert ingress["metadata"]["annotations"][annotation] == expected


def test_ingress_limits_are_above_the_senders(rendered: dict[str, Objects]) -> None:
    objects = rendered["two-models"]
    annotations = one(objects, "Ingress", FULLNAME)["metadata"]["annotations"]
    env = resolve_env(container(one(objects, "Deployment", f"{FULLNAME}-sender"), "sender"), {})
    read_timeout_s = int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"])
    # nginx must not cut a request that waits for a grant, or a silent vLLM, before the sender does.
    assert read_timeout_s > max(float(env["GRANT_TIMEOUT"]), float(env["UPSTREAM_TIMEOUT"]))
    body_mib = int(annotations["nginx.ingress.kubernetes.io/proxy-body-size"].removesuffix("m"))
    assert body_mib * 2**20 >= int(env["MAX_BODY_BYTES"]), "the sender, not nginx, answers 413"


def test_ingress_routes_to_the_sender_with_tls(rendered: dict[str, Objects]) -> None:
    ingress = one(rendered["two-models"], "Ingress", FULLNAME)
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["llm.example.org"], "secretName": "llm-tls"}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.org"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": f"{FULLNAME}-sender", "port": {"name": "http"}}


@pytest.mark.parametrize("case_id", CASES)
def test_selectors_find_pods_and_named_ports(rendered: dict[str, Objects], case_id: str) -> None:
    """Every Service and monitor selects pods rendered here, on ports those pods name."""
    objects = rendered[case_id]
    pods = [(pod_template(w)["metadata"]["labels"], containers(w, init=False))
            for w in workloads(objects) if w["kind"] != "Job"]
    for w in workloads(objects):
        if w["kind"] != "Job":
            assert labels_match(w["spec"]["selector"]["matchLabels"], pod_template(w)["metadata"]["labels"])
        if w["kind"] == "StatefulSet":
            one(objects, "Service", w["spec"]["serviceName"])

    def named_ports(selector: dict[str, str]) -> set[str]:
        selected = [cs for labels, cs in pods if labels_match(selector, labels)]
        assert selected, f"selector {selector} matches no pod"
        return {port["name"] for cs in selected for c in cs for port in c.get("ports", [])}

    for service in find(objects, "Service"):
        ports = named_ports(service["spec"]["selector"])
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {service['metadata']['name']}: {port}"
    for monitor in find(objects, "ServiceMonitor"):
        service_ports = {port["name"] for s in find(objects, "Service")
                         if labels_match(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
                         for port in s["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    for monitor in find(objects, "PodMonitor"):
        if monitor["metadata"]["labels"]["app.kubernetes.io/component"] == "rabbitmq":
            continue  # the operator's pods are not rendered here
        ports = named_ports(monitor["spec"]["selector"]["matchLabels"])
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports


def test_monitors_scrape_metrics_with_the_prometheus_labels(rendered: dict[str, Objects]) -> None:
    objects = rendered["monitoring"]
    endpoints = {m["metadata"]["name"]: (m["spec"].get("endpoints") or m["spec"]["podMetricsEndpoints"])[0]
                 for m in [*find(objects, "ServiceMonitor"), *find(objects, "PodMonitor")]}
    assert {name: (e["port"], e["path"], e["interval"]) for name, e in endpoints.items()} == {
        f"{FULLNAME}-sender": ("metrics", "/metrics", "15s"),
        f"{FULLNAME}-consumer": ("probe", "/metrics", "15s"),
        f"{FULLNAME}-vllm": ("vllm", "/metrics", "15s"),
        f"{FULLNAME}-rabbitmq": ("prometheus", "/metrics", "15s"),
    }
    for monitor in [*find(objects, "ServiceMonitor"), *find(objects, "PodMonitor")]:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_grafana_dashboard_ships_with_monitoring(rendered: dict[str, Objects]) -> None:
    """With monitoring on, the dashboard of chart/dashboards/dispatcher.json is a ConfigMap labelled for Grafana's
    dashboard sidecar; every panel has a unit and a description, and queries Prometheus through the
    dashboard's data source variable."""
    [dashboard] = [c for c in find(rendered["monitoring"], "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    document = json.loads(dashboard["data"]["vllm-dispatcher.json"])
    assert document == json.loads((ROOT / "chart" / "dashboards" / "dispatcher.json").read_text())
    for panel in document["panels"]:
        assert panel["description"] and panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["targets"] and all(target["expr"] for target in panel["targets"]), panel["title"]
    assert not [c for c in find(rendered["default"], "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
