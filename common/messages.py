"""The messages the sender and the consumers exchange through RabbitMQ, and where they go.

- Grant request: the sender publishes `GrantRequest` on the model's priority queue (the `queue` its
  consumers announce), with the AMQP properties `priority` (`queue_priority`: the token's priority,
  then a fair-share sub-level), `correlation_id`, `reply_to` (the sender's reply address) and
  `expiration` (milliseconds left before the sender gives up).
- Grant: the consumer answers with `Grant` to `reply_to`, with the same `correlation_id`.
- Release: when the response has ended (or failed, or the client left), the sender publishes
  `Release` to the consumer's own queue, named in the grant (`release_to`); the releases of a
  few milliseconds for one consumer travel in one message.
- Announcement: each consumer publishes `Announcement` on the fanout exchange
  `ANNOUNCE_EXCHANGE` every `ANNOUNCE_INTERVAL_S`; senders list a model while an announcement
  for it is younger than `ttl_s`, and drop it at once on an announcement with `alive=False`.

Bodies are JSON (orjson encodes the dataclasses directly). Decoders raise `MessageError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

MODEL_QUEUE_PREFIX = "dispatcher.model."  # the queues of consumers that announce none (before fair share)
ANNOUNCE_EXCHANGE = "dispatcher.models"
ANNOUNCE_INTERVAL_S = 2.0
ANNOUNCE_TTL_S = 10.0

# AMQP short strings are 255 bytes at most, and pamqp checks queue names against this pattern
# before sending; a model id that cannot name a queue cannot be served.
_QUEUE_NAME = re.compile(r"^[a-zA-Z0-9\-_.:@#,/+ ]*$")
_MAX_QUEUE_NAME_BYTES = 255
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: no space, no CR/LF


class MessageError(ValueError):
    """A message body that does not decode into the expected message."""


def model_queue(model: str, max_queue_priority: int | None = None) -> str:
    """The name of the priority queue where requests for `model` wait.

    The name carries the queue's `x-max-priority`: RabbitMQ refuses (PRECONDITION_FAILED) to declare a
    queue again with other arguments, so consumers started with another MAX_PRIORITY or
    FAIR_SHARE_LEVELS (an upgrade, a configuration change) use a queue of their own instead of
    wedging on the old one, which expires once its last consumer has gone. None: the name used by
    consumers that announce no queue (the layout before fair share)."""
    if max_queue_priority is None:
        return MODEL_QUEUE_PREFIX + model
    return f"dispatcher.p{max_queue_priority}.{model}"


def is_valid_model_id(model: str) -> bool:
    names = (model_queue(model), model_queue(model, 255))
    return bool(model) and all(len(name.encode()) <= _MAX_QUEUE_NAME_BYTES and _QUEUE_NAME.match(name) is not None
                               for name in names)


# Fair share within a priority: each priority owns `levels` consecutive queue priorities, and a
# request's sub-level says how many requests its token had outstanding for the model when it came
# (fewer: higher). Any request of priority p + 1 still goes before every request of priority p.

def max_queue_priority(max_priority: int, levels: int) -> int:
    return (max_priority + 1) * levels - 1


def share_bucket(outstanding: int) -> int:
    """0 for a token's first outstanding request, 1 for its 2nd-3rd, 2 for its 4th-7th, 3 for its 8th-15th..."""
    return max(1, outstanding).bit_length() - 1


def queue_priority(priority: int, bucket: int, levels: int) -> int:
    return priority * levels + levels - 1 - min(bucket, levels - 1)


@dataclass(frozen=True, slots=True)
class GrantRequest:
    priority: int


@dataclass(frozen=True, slots=True)
class Grant:
    lease: str                 # the consumer's id of this slot; the release names it
    url: str                   # base URL of the vLLM server, e.g. "http://10.0.0.5:8000"
    api_key: str | None        # sent to vLLM as "Authorization: Bearer <api_key>" when set
    release_to: str            # routing key (queue) of the consumer's releases
    vllm_priority: int | None  # when set, the sender adds "X-Vllm-Priority: <value>"


@dataclass(frozen=True, slots=True)
class Release:
    leases: tuple[str, ...]    # a sender gathers the releases of a few milliseconds per consumer


@dataclass(frozen=True, slots=True)
class Announcement:
    model: str
    consumer: str              # the consumer's id (one model may have several consumers)
    card: dict[str, Any]       # the model's entry as vLLM gives it in /v1/models
    alive: bool = True
    ttl_s: float = ANNOUNCE_TTL_S
    slots: int = 0             # the parallel-request cap of the consumer's healthy servers, summed
    queue: str | None = None   # where the model's requests wait (None: `model_queue(model)`)
    levels: int = 1            # fair-share sub-levels per priority in that queue


def encode(message: GrantRequest | Grant | Release | Announcement) -> bytes:
    return orjson.dumps(message)


def _fields(body: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MessageError("not a JSON object")
    return value


def _typed(fields: dict[str, Any], name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    value = fields.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise MessageError(f"field {name!r} is missing or has the wrong type")
    return value


def decode_grant_request(body: bytes) -> GrantRequest:
    return GrantRequest(priority=_typed(_fields(body), "priority", int))


def decode_grant(body: bytes) -> Grant:
    f = _fields(body)
    grant = Grant(
        lease=_typed(f, "lease", str),
        url=_typed(f, "url", str),
        api_key=_typed(f, "api_key", str, optional=True),
        release_to=_typed(f, "release_to", str),
        vllm_priority=_typed(f, "vllm_priority", int, optional=True),
    )
    # The sender writes these into an HTTP head: nothing that could end a header line.
    if not _HEADER_SAFE.match(grant.url) or (grant.api_key is not None and not _HEADER_SAFE.match(grant.api_key)):
        raise MessageError("url or api_key holds characters not allowed in an HTTP header")
    return grant


def decode_release(body: bytes) -> Release:
    leases = _typed(_fields(body), "leases", list)
    if not leases or not all(isinstance(lease, str) for lease in leases):
        raise MessageError("field 'leases' must be a non-empty list of strings")
    return Release(leases=tuple(leases))


def decode_announcement(body: bytes) -> Announcement:
    f = _fields(body)
    alive = f.get("alive", True)
    if not isinstance(alive, bool):
        raise MessageError("field 'alive' has the wrong type")
    ttl_s = _typed(f, "ttl_s", (int, float), optional=True)
    slots = _typed(f, "slots", int, optional=True)
    queue = _typed(f, "queue", str, optional=True)
    levels = _typed(f, "levels", int, optional=True)
    if levels is not None and not 1 <= levels <= 256:
        raise MessageError("field 'levels' is out of range")
    return Announcement(
        model=_typed(f, "model", str),
        consumer=_typed(f, "consumer", str),
        card=_typed(f, "card", dict),
        alive=alive,
        ttl_s=float(ttl_s) if ttl_s is not None else ANNOUNCE_TTL_S,
        slots=max(0, slots or 0),
        queue=queue,
        levels=levels or 1,
    )
