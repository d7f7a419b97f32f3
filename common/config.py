"""Reading the environment: one helper per type, each failing with a line that names the variable.

Both services call these from `main()` to fill their frozen `Config`; a `ConfigError` stops
start-up with its message and exit status 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from urllib.parse import quote

_LEVEL_NAMES = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40, "CRITICAL": 50}


class ConfigError(Exception):
    """A bad environment variable; the message names it and says what is expected."""


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    _check_range(name, raw, value, minimum, maximum)
    return value


def env_float(env: Mapping[str, str], name: str, default: float, *, minimum: float | None = None,
              maximum: float | None = None) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name}={raw!r} is not a finite number")
    _check_range(name, raw, value, minimum, maximum)
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1 or 0)")


def _check_range(name: str, raw: str, value: float, minimum: float | None,
                 maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={raw!r} must be at most {maximum}")


def log_level(env: Mapping[str, str]) -> int:
    """LOG_LEVEL as a number 10-50 or a level name; default 20 (INFO)."""
    raw = env.get("LOG_LEVEL", "").strip()
    if not raw:
        return logging.INFO
    if raw.upper() in _LEVEL_NAMES:
        return _LEVEL_NAMES[raw.upper()]
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"LOG_LEVEL={raw!r} is not a level (10-50, or DEBUG, INFO, WARNING, ERROR, CRITICAL)") from None
    _check_range("LOG_LEVEL", raw, value, 10, 50)
    return value


def rabbitmq_url(env: Mapping[str, str]) -> str:
    """RABBITMQ_URL, or one built from RABBITMQ_HOST/PORT/USER/PASSWORD (how the Helm chart passes secrets)."""
    url = env.get("RABBITMQ_URL", "").strip()
    if url:
        if not url.startswith(("amqp://", "amqps://")):
            raise ConfigError("RABBITMQ_URL must start with amqp:// or amqps://")
        return url
    host = env_str(env, "RABBITMQ_HOST", "localhost")
    port = env_int(env, "RABBITMQ_PORT", 5672, minimum=1, maximum=65535)
    user = quote(env_str(env, "RABBITMQ_USER", "guest"), safe="")
    password = quote(env.get("RABBITMQ_PASSWORD", "guest"), safe="")
    return f"amqp://{user}:{password}@{host}:{port}/"


def setup_logging(level: int) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # aiormq logs every reconnect attempt with a traceback at WARNING; our wrappers log one line.
    logging.getLogger("aiormq").setLevel(max(level, logging.ERROR))
