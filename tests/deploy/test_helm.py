"""helm itself: getting it, `helm lint`, and the configurations the chart refuses at render time."""

from __future__ import annotations

import subprocess

import pytest

from tests.deploy.manifests import CASES, CHART, HELM_SCRIPT, Case, run_helm, template


def test_helm_script_prints_a_cached_helm_v4(helm: str) -> None:
    again = subprocess.run(["bash", str(HELM_SCRIPT)], capture_output=True, text=True, timeout=60, check=True)
    assert again.stdout.strip() == helm, "the second run must reuse the cached binary"
    version = run_helm(helm, "version", "--short")
    assert version.returncode == 0 and version.stdout.startswith("v4."), version.stdout + version.stderr


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_helm_lint_passes(helm: str, case: Case) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), *case.helm_args())
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("case", "message"), [
    pytest.param(Case("unknown-db", sets=("database.type=sqlite",)),
                 "values don't meet the specifications of the schema", id="unknown-database-type"),
    pytest.param(Case("external-db-no-host", sets=("database.internal=false", "database.auth.password=x")),
                 "database.host is required when database.internal=false", id="external-database-without-host"),
    pytest.param(Case("external-db-no-password", sets=("database.internal=false", "database.host=db")),
                 "database.auth.password or database.existingSecret is required", id="external-database-no-password"),
    pytest.param(Case("external-mq-no-host", sets=("rabbitmq.internal=false", "rabbitmq.existingSecret=s")),
                 "rabbitmq.host is required when rabbitmq.internal=false", id="external-rabbitmq-without-host"),
    pytest.param(Case("external-mq-no-auth", sets=("rabbitmq.internal=false", "rabbitmq.host=mq")),
                 "rabbitmq.auth.user and rabbitmq.auth.password, or rabbitmq.existingSecret", id="external-rabbitmq-no-auth"),
    pytest.param(Case("consumers", sets=("consumer.replicaCount=2",)),
                 "consumer.replicaCount must be 1", id="consumer-replicas"),
    pytest.param(Case("postgres-user", sets=("database.auth.username=postgres",)),
                 "database.auth.username must not be postgres", id="app-user-is-superuser"),
    pytest.param(Case("mysql-root-user", sets=("database.type=mysql", "database.auth.username=root")),
                 "database.auth.username must not be root", id="mysql-app-user-is-superuser"),
    pytest.param(Case("bad-db-port", sets=("database.port=0",)),
                 "values don't meet the specifications of the schema", id="database-port-out-of-range"),
    pytest.param(Case("duplicate", sets=("models[0].name=a", "models[0].model=x/y", "models[1].name=a",
                                         "models[1].model=x/z")),
                 "the name a is used twice", id="duplicate-model-name"),
    pytest.param(Case("long-name", sets=("models[0].name=a-long-model-name-of-thirty-two",
                                         "models[0].model=x/y")),
                 "longer than 52 characters", id="model-name-too-long"),
    pytest.param(Case("bad-rope", sets=("models[0].name=a", "models[0].model=x/y", "models[0].ropeScaling.enabled=true",
                                        "models[0].ropeScaling.jsonConfiguration=factor: 4")),
                 "ropeScaling.jsonConfiguration is not a JSON object", id="rope-json-invalid"),
    pytest.param(Case("typo", sets=("models[0].name=a", "models[0].model=x/y", "models[0].gpuMemoryUtilization=0.8")),
                 "additional properties 'gpuMemoryUtilization' not allowed", id="model-key-misspelt"),
    pytest.param(Case("not-kebab", sets=("models[0].name=Llama_3", "models[0].model=x/y")),
                 "/models/0/name", id="model-name-not-kebab-case"),
    pytest.param(Case("two-templates", sets=("models[0].name=a", "models[0].model=x/y",
                                             "models[0].chatTemplate=template",
                                             "models[0].chatTemplatePath=/t.jinja")),
                 "set chatTemplate (the template itself) or chatTemplatePath (a file in the vLLM container), not both",
                 id="chat-template-twice"),
    pytest.param(Case("parser-with-flag", sets=("models[0].name=a", "models[0].model=x/y",
                                                "models[0].toolCallParser=hermes --trust-remote-code")),
                 "/models/0/toolCallParser", id="tool-call-parser-not-a-name"),
    pytest.param(Case("relative-template", sets=("models[0].name=a", "models[0].model=x/y",
                                                 "models[0].chatTemplatePath=t.jinja")),
                 "/models/0/chatTemplatePath", id="chat-template-path-not-absolute"),
])
def test_unsupported_configurations_fail_at_render_time(helm: str, case: Case, message: str) -> None:
    result = template(helm, case)
    assert result.returncode != 0, f"{case.id} rendered, but must be refused"
    assert message in result.stderr, result.stderr
