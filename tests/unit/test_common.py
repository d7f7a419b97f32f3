"""Configuration helpers and the message contract shared by the sender and the consumer."""

from __future__ import annotations

import pytest

from common import config, messages


@pytest.mark.parametrize(("env", "expected"), [
    pytest.param({}, "amqp://guest:guest@localhost:5672/", id="default"),
    pytest.param({"RABBITMQ_URL": "amqp://u:p@broker:5673/vh"}, "amqp://u:p@broker:5673/vh", id="url-wins"),
    pytest.param({"RABBITMQ_HOST": "rmq", "RABBITMQ_PORT": "5671", "RABBITMQ_USER": "app",
                  "RABBITMQ_PASSWORD": "p@ss:/word"}, "amqp://app:p%40ss%3A%2Fword@rmq:5671/", id="from-parts-quoted"),
])
def test_rabbitmq_url_built_from_environment(env, expected) -> None:
    assert config.rabbitmq_url(env) == expected


@pytest.mark.parametrize(("env", "message"), [
    pytest.param({"RABBITMQ_URL": "http://x"}, "RABBITMQ_URL", id="bad-scheme"),
    pytest.param({"RABBITMQ_PORT": "abc"}, "RABBITMQ_PORT", id="port-not-int"),
    pytest.param({"RABBITMQ_PORT": "70000"}, "RABBITMQ_PORT", id="port-out-of-range"),
])
def test_rabbitmq_url_errors_name_the_variable(env, message) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.rabbitmq_url(env)


@pytest.mark.parametrize(("raw", "level"), [
    pytest.param("", 20, id="default"), pytest.param("10", 10, id="number"),
    pytest.param("warning", 30, id="name"), pytest.param("ERROR", 40, id="upper-name"),
])
def test_log_level_accepts_numbers_and_names(raw, level) -> None:
    assert config.log_level({"LOG_LEVEL": raw}) == level


@pytest.mark.parametrize("raw", ["5", "60", "loud"])
def test_log_level_rejects_other_values(raw) -> None:
    with pytest.raises(config.ConfigError, match="LOG_LEVEL"):
        config.log_level({"LOG_LEVEL": raw})


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("0", False), ("off", False), ("", False)])
def test_env_bool(raw, expected) -> None:
    assert config.env_bool({"X": raw}, "X", False) is expected


def test_env_float_rejects_nan() -> None:
    with pytest.raises(config.ConfigError, match="GRANT_TIMEOUT"):
        config.env_float({"GRANT_TIMEOUT": "nan"}, "GRANT_TIMEOUT", 1.0)


@pytest.mark.parametrize("message", [
    pytest.param(messages.GrantRequest(priority=7), id="grant-request"),
    pytest.param(messages.Grant(lease="l1", url="http://10.0.0.1:8000", api_key="k", release_to="q",
                                vllm_priority=3), id="grant"),
    pytest.param(messages.Grant(lease="l1", url="http://h", api_key=None, release_to="q", vllm_priority=None),
                 id="grant-no-key"),
    pytest.param(messages.Release(leases=("l1",)), id="release"),
    pytest.param(messages.Release(leases=("l1", "l2", "l3")), id="release-several"),
    pytest.param(messages.Announcement(model="m", consumer="c", card={"id": "m", "max_model_len": 4096}),
                 id="announcement"),
])
def test_messages_round_trip(message) -> None:
    decode = {messages.GrantRequest: messages.decode_grant_request, messages.Grant: messages.decode_grant,
              messages.Release: messages.decode_release, messages.Announcement: messages.decode_announcement}
    assert decode[type(message)](messages.encode(message)) == message


@pytest.mark.parametrize(("decoder", "body"), [
    pytest.param(messages.decode_grant, b"not json", id="not-json"),
    pytest.param(messages.decode_grant, b"[]", id="not-object"),
    pytest.param(messages.decode_grant, b'{"lease": 1, "url": "u", "release_to": "q"}', id="wrong-type"),
    pytest.param(messages.decode_grant_request, b'{"priority": true}', id="bool-is-not-int"),
    pytest.param(messages.decode_release, b"{}", id="missing-field"),
    pytest.param(messages.decode_release, b'{"leases": []}', id="no-lease"),
    pytest.param(messages.decode_release, b'{"leases": ["a", 2]}', id="lease-not-string"),
    pytest.param(messages.decode_grant, b'{"lease": "l", "url": "http://h", "release_to": "q", '
                 b'"api_key": "k\\r\\nX-Injected: 1", "vllm_priority": null}', id="header-injection-key"),
    pytest.param(messages.decode_announcement, b'{"model": "m", "consumer": "c", "card": {}, "alive": 1}',
                 id="alive-not-bool"),
])
def test_malformed_messages_raise_message_error(decoder, body) -> None:
    with pytest.raises(messages.MessageError):
        decoder(body)


@pytest.mark.parametrize(("model", "valid"), [
    ("meta-llama/Llama-3.1-8B-Instruct", True), ("qwen2.5:7b", True), ("", False), ("a*b", False),
    ("x" * 300, False), ("modèle", False),
])
def test_model_ids_that_can_name_a_queue(model, valid) -> None:
    assert messages.is_valid_model_id(model) is valid
