"""compose.yml, read with PyYAML (no container engine here): the services, their order, and the
variables the sender and consumer get, which must be the ones DESIGN.md defines; and
compose.mariadb.yml laid over it, as `docker compose -f compose.yml -f compose.mariadb.yml` merges
them, for a token database on MariaDB."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.fake_vllm import parse_args
from tests.images.dockerfile import parse_dockerfile, parse_expose

ROOT = Path(__file__).resolve().parents[2]

# The configuration of DESIGN.md ("Configuration (environment variables)").
BOTH_VARIABLES = {"RABBITMQ_URL", "RABBITMQ_HOST", "RABBITMQ_PORT", "RABBITMQ_USER", "RABBITMQ_PASSWORD",
                  "LOG_LEVEL", "RPC_RECONNECT_ATTEMPTS", "MAX_PRIORITY"}
SENDER_VARIABLES = BOTH_VARIABLES | {"SENDER_HOST", "SENDER_PORT", "METRICS_PORT", "DATABASE_URL", "TOKENS_FILE",
                                     "TOKEN_CACHE_SECONDS", "GRANT_TIMEOUT", "UPSTREAM_TIMEOUT", "MAX_BODY_BYTES"}
CONSUMER_VARIABLES = BOTH_VARIABLES | {"MODEL", "VLLM_URL", "VLLM_API_KEY", "VLLM_SERVERS", "MAX_PARALLEL_REQUESTS",
                                       "MIN_TOKENS_PER_SECOND_PER_USER", "BURST_GRANTS", "METRICS_REFRESH_SECONDS",
                                       "RPC_QUEUE_EXPIRATION", "PROBE_PORT", "MAX_VLLM_CONNECTION_ATTEMPTS",
                                       "FORWARD_PRIORITY"}
ADMIN_VARIABLES = {"DATABASE_URL", "MAX_PRIORITY"}
ALLOWED = {"sender": SENDER_VARIABLES, "consumer": CONSUMER_VARIABLES, "migrate": ADMIN_VARIABLES}
IMAGES = {"sender": ("Dockerfile.sender", "centralesupelec/aristote-dispatcher-sender"),
          "migrate": ("Dockerfile.sender", "centralesupelec/aristote-dispatcher-sender"),
          "consumer": ("Dockerfile.consumer", "centralesupelec/aristote-dispatcher-consumer")}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yml").read_text())


def merged(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, for what ours holds: mappings key by key, the rest replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {key: merged(base[key], value) if key in base else value for key, value in
                {**base, **override}.items()}
    return override


@pytest.fixture(scope="module")
def compose_mariadb(compose: dict[str, Any]) -> dict[str, Any]:
    return merged(compose, yaml.safe_load((ROOT / "compose.mariadb.yml").read_text()))


def started(compose: dict[str, Any]) -> set[str]:
    """The services `docker compose up` starts, with no profile given."""
    return {name for name, service in compose["services"].items() if not service.get("profiles")}


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    assert all(isinstance(v, str) for v in env.values()), "quote every value: compose wants strings"
    return env


def depends(service: dict[str, Any]) -> dict[str, str]:
    return {name: spec["condition"] for name, spec in service.get("depends_on", {}).items()}


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return command if isinstance(command, str) else " ".join(command)


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"rabbitmq", "postgres", "migrate", "fake-vllm", "consumer", "sender",
                                        "open-webui"}
    assert started(compose) == {"rabbitmq", "postgres", "migrate", "fake-vllm", "consumer", "sender"}


def test_brokers_have_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert re.fullmatch(r"rabbitmq:3(\.\d+)*-management", services["rabbitmq"]["image"])
    assert services["postgres"]["image"] == "postgres:16"
    for name in ("rabbitmq", "postgres", "fake-vllm", "consumer", "sender"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name


def test_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert depends(services["migrate"]) == {"postgres": "service_healthy"}
    assert depends(services["consumer"]) == {"rabbitmq": "service_healthy", "fake-vllm": "service_healthy"}
    assert depends(services["sender"]) == {"migrate": "service_completed_successfully",
                                           "rabbitmq": "service_healthy", "postgres": "service_healthy"}
    assert services["migrate"]["restart"] == "no"


@pytest.mark.parametrize("name", IMAGES)
def test_our_services_build_from_our_dockerfiles(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    dockerfile, image = IMAGES[name]
    assert service["build"] == {"context": ".", "dockerfile": dockerfile}
    assert service["image"].split(":")[0] == image
    # The images must work on a read-only root file system, as in the Helm chart.
    assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]


@pytest.mark.parametrize("name", ALLOWED)
def test_variables_are_those_of_the_design(compose: dict[str, Any], name: str) -> None:
    unknown = set(env_of(compose["services"][name])) - ALLOWED[name]
    assert not unknown, f"{name}: not in DESIGN.md: {sorted(unknown)}"


def test_migrate_loads_the_example_tokens(compose: dict[str, Any]) -> None:
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["sh", "-c", "python admin.py migrate && python admin.py load /tokens/tokens.yaml"]
    assert "./tokens.example.yaml:/tokens/tokens.yaml:ro" in migrate["volumes"]
    assert (ROOT / "tokens.example.yaml").is_file()
    assert env_of(migrate)["DATABASE_URL"] == env_of(compose["services"]["sender"])["DATABASE_URL"]


def test_fake_vllm_runs_the_test_stand_in(compose: dict[str, Any]) -> None:
    fake = compose["services"]["fake-vllm"]
    base = parse_dockerfile((ROOT / "Dockerfile.consumer").read_text())[-1].base
    assert fake["image"] == base
    assert "./tests/fake_vllm.py:/srv/fake_vllm.py:ro" in fake["volumes"]
    words = shlex.split(command_text(fake).replace("&&", " && "))
    assert words[words.index("fake_vllm.py") - 1] == "python"
    options = parse_args(words[words.index("fake_vllm.py") + 1:], {})
    assert (options.host, options.port, options.model) == ("0.0.0.0", 8000, "fake-model")
    # Open WebUI attaches tools to every chat: without tool calling, vLLM (and the fake) refuse them.
    assert options.enable_auto_tool_choice and options.tool_call_parser
    # Its dependencies, pinned as in requirements.txt.
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    installed = {w.split("==")[0]: w.split("==")[1] for w in words if "==" in w}
    assert installed == {name: pins[name] for name in ("h11", "orjson", "uvloop")}


def test_consumer_talks_to_the_fake_and_the_broker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = env_of(services["consumer"])
    assert env["MODEL"] == "fake-model"
    assert env["VLLM_URL"] == "http://fake-vllm:8000"
    exposed = parse_expose(" ".join(i.args for i in parse_dockerfile(
        (ROOT / "Dockerfile.consumer").read_text())[-1].all("EXPOSE")))
    assert int(env["PROBE_PORT"]) in exposed
    assert f":{env['PROBE_PORT']}/ready" in " ".join(services["consumer"]["healthcheck"]["test"])


@pytest.mark.parametrize("name", ["consumer", "sender"])
def test_broker_credentials_match(compose: dict[str, Any], name: str) -> None:
    rabbitmq = env_of(compose["services"]["rabbitmq"])
    env = env_of(compose["services"][name])
    assert env["RABBITMQ_HOST"] == "rabbitmq" and env["RABBITMQ_PORT"] == "5672"
    assert (env["RABBITMQ_USER"], env["RABBITMQ_PASSWORD"]) == (
        rabbitmq["RABBITMQ_DEFAULT_USER"], rabbitmq["RABBITMQ_DEFAULT_PASS"])
    assert env["RABBITMQ_USER"] != "guest", "RabbitMQ's guest user may only log in from localhost"


def test_sender_serves_on_8080_with_the_database(compose: dict[str, Any]) -> None:
    services = compose["services"]
    sender = services["sender"]
    env = env_of(sender)
    assert "8080:8080" in sender["ports"] and env["SENDER_PORT"] == "8080"
    postgres = env_of(services["postgres"])
    url = urlsplit(env["DATABASE_URL"])
    assert url.scheme == "postgresql" and url.hostname == "postgres"
    assert (url.username, url.password, url.path.lstrip("/")) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])
    assert f":{env['SENDER_PORT']}/health/readiness" in " ".join(sender["healthcheck"]["test"])


def test_a_real_vllm_is_shown_commented(compose: dict[str, Any]) -> None:
    text = (ROOT / "compose.yml").read_text()
    commented = "\n".join(line.strip()[1:] for line in text.splitlines() if line.strip().startswith("#"))
    assert "image: vllm/vllm-openai:" in commented
    assert "driver: nvidia" in commented and "capabilities: [gpu]" in commented


# ---------------------------------------------------------------------------------------------
# Open WebUI (the optional `webui` profile)

def test_open_webui_is_optional_and_pinned(compose: dict[str, Any]) -> None:
    webui = compose["services"]["open-webui"]
    assert webui["profiles"] == ["webui"]
    image, _, tag = webui["image"].rpartition(":")
    assert image == "ghcr.io/open-webui/open-webui" and re.fullmatch(r"v\d+\.\d+\.\d+", tag)
    assert any(port.endswith(":8080") for port in webui["ports"])   # Open WebUI listens on 8080 in its image
    assert depends(webui) == {"sender": "service_healthy"}


def test_open_webui_talks_to_the_sender_with_tokens_it_knows(compose: dict[str, Any]) -> None:
    """Every connection is the sender's /v1 with a token of tokens.example.yaml (which `migrate`
    loads); Ollama is off, so Open WebUI looks for models nowhere else."""
    services = compose["services"]
    env = env_of(services["open-webui"])
    urls, keys = env["OPENAI_API_BASE_URLS"].split(";"), env["OPENAI_API_KEYS"].split(";")
    assert len(urls) == len(keys) >= 1
    assert set(urls) == {f"http://sender:{env_of(services['sender'])['SENDER_PORT']}/v1"}
    assert set(keys) <= set(example_tokens())
    assert env["ENABLE_OLLAMA_API"] == "False"


def test_open_webui_background_tasks_use_a_lower_priority_token(compose: dict[str, Any]) -> None:
    """Chats go through the first connection; titles, tags and follow-ups through the task model,
    a model of a connection whose token has a lower priority and a lower threshold."""
    services = compose["services"]
    env = env_of(services["open-webui"])
    keys = env["OPENAI_API_KEYS"].split(";")
    configs = json.loads(env["OPENAI_API_CONFIGS"])
    prefix, _, model = env["TASK_MODEL_EXTERNAL"].partition(".")
    [task_index] = [int(index) for index, config in configs.items() if config.get("prefix_id") == prefix]
    assert model == env_of(services["consumer"])["MODEL"]
    tokens = example_tokens()
    chat, task = tokens[keys[0]], tokens[keys[task_index]]
    assert task["priority"] < chat["priority"] and task["threshold"] < chat["threshold"]
    assert not configs.get("0", {}).get("prefix_id"), "chats must see the model under its own name"


def example_tokens() -> dict[str, dict[str, Any]]:
    return {entry["token"]: entry for entry in yaml.safe_load((ROOT / "tokens.example.yaml").read_text())}


# compose.mariadb.yml: the same stack with its tokens in MariaDB

def test_mariadb_override_replaces_postgres(compose_mariadb: dict[str, Any]) -> None:
    services = compose_mariadb["services"]
    assert started(compose_mariadb) == {"rabbitmq", "mariadb", "migrate", "fake-vllm", "consumer", "sender"}
    assert re.fullmatch(r"mariadb:1[0-9](\.\d+)*", services["mariadb"]["image"])
    assert services["mariadb"]["healthcheck"]["test"][0] == "CMD"
    assert "mariadbdata" in compose_mariadb["volumes"]


@pytest.mark.parametrize("name", ["migrate", "sender"])
def test_mariadb_override_points_the_services_at_mariadb(compose_mariadb: dict[str, Any], name: str) -> None:
    services = compose_mariadb["services"]
    mariadb = env_of(services["mariadb"])
    url = urlsplit(env_of(services[name])["DATABASE_URL"])
    assert url.scheme == "mysql" and url.hostname == "mariadb" and url.port == 3306
    assert (url.username, url.password, url.path.lstrip("/")) == (
        mariadb["MARIADB_USER"], mariadb["MARIADB_PASSWORD"], mariadb["MARIADB_DATABASE"])
    assert depends(services[name])["mariadb"] == "service_healthy"
    # postgres is left out by its profile: a dependency on it must not be required any more.
    assert services[name]["depends_on"]["postgres"]["required"] is False
    assert not set(env_of(services[name])) - ALLOWED[name]


def test_mariadb_override_keeps_the_rest_of_the_stack(compose: dict[str, Any], compose_mariadb: dict[str, Any]) -> None:
    for name in ("rabbitmq", "fake-vllm", "consumer"):
        assert compose_mariadb["services"][name] == compose["services"][name]
    for name in ("migrate", "sender"):
        base, over = env_of(compose["services"][name]), env_of(compose_mariadb["services"][name])
        assert {**over, "DATABASE_URL": ""} == {**base, "DATABASE_URL": ""}
    assert compose_mariadb["services"]["migrate"]["command"] == compose["services"]["migrate"]["command"]
