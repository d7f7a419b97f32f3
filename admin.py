"""The operator's command for the token database: schema migrations and token management.

    python admin.py migrate                                   create or upgrade the schema (idempotent)
    python admin.py create NAME --priority P --threshold T [--max-in-flight N]
                                                              print a new token once; store its hash
    python admin.py list [--json]                             names and settings, never a secret
    python admin.py revoke NAME                               the sender stops accepting it
    python admin.py update NAME [--priority P] [--threshold T] [--max-in-flight N (0: no cap)]
    python admin.py load FILE                                 upsert a YAML/JSON token list (Helm job)
    python admin.py usage [--since YYYY-MM-DD] [--token NAME] [--format table|csv|json]
                                                              totals per token, model and UTC day

The database is `DATABASE_URL` (or `--database-url`): `postgresql://...` or `mysql://...` (MySQL 8,
MariaDB 10.6+), through the database layer the sender uses (tokenstore.py), where each dialect's
schema and migrations live.

Invariants: only the SHA-256 hex digest of a token is stored; the only token ever printed is the
one `create` has just made, alone on stdout so that scripts can capture it. Errors are one line on
stderr with exit status 1; usage and configuration errors exit with 2.

The sender imports `load_token_entries` (its TOKENS_FILE mode) from here, so this module has no
side effect at import and reads the environment only in `main()` or when asked.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import yaml

from common.config import ConfigError, env_int
from tokenstore import (Database, DatabaseError, DatabaseUnavailable, NoSuchToken, SchemaMissing, TokenConflict,
                        database_class, hash_token, open_database)

DEFAULT_MAX_PRIORITY = 10
SQL_INTEGER_MAX = 2**31 - 1
NAME_MAX_CHARS = 200
TOKEN_MAX_CHARS = 4096
TOKEN_PREFIX = "sk-"
TOKEN_ENTRY_KEYS = frozenset({"token", "priority", "threshold", "name", "max_in_flight"})
USAGE_FIELDS = ("token", "model", "date", "requests", "prompt_tokens", "completion_tokens", "estimated_requests")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class AdminError(Exception):
    """A failure the operator can act on; `main()` prints it as one line and exits with 1."""


@dataclass(frozen=True, slots=True)
class Config:
    database_url: str
    max_priority: int


# ---------------------------------------------------------------------------------------------
# Tokens and their validation (shared with the sender's TOKENS_FILE mode)

def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def max_priority_from_env(env: Mapping[str, str]) -> int:
    # The same bounds as the services: RabbitMQ's x-max-priority is at most 255.
    return env_int(env, "MAX_PRIORITY", DEFAULT_MAX_PRIORITY, minimum=1, maximum=255)


def check_token(value: Any) -> str:
    # The message never repeats the value: it may be a secret.
    if not isinstance(value, str):
        raise ValueError("token must be a string (quote it in YAML)")
    if not value or len(value) > TOKEN_MAX_CHARS or not all("!" <= c <= "~" for c in value):
        # The sender compares the raw bytes after `Bearer `: spaces and non-ASCII could never match.
        raise ValueError(f"token must be 1 to {TOKEN_MAX_CHARS} visible ASCII characters, without spaces")
    return value


def check_name(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > NAME_MAX_CHARS:
        raise ValueError(f"name must be a string of 1 to {NAME_MAX_CHARS} characters")
    if value != value.strip() or not value.isprintable():
        raise ValueError(f"name {value!r} must be printable, without surrounding spaces")
    return value


def check_priority(value: Any, max_priority: int) -> int:
    # bool is an int in Python, and YAML reads `yes` as True.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= max_priority:
        raise ValueError(f"priority must be an integer from 0 to MAX_PRIORITY={max_priority}, got {value!r}")
    return value


def check_threshold(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SQL_INTEGER_MAX:
        raise ValueError(f"threshold must be an integer from 0 to {SQL_INTEGER_MAX}, got {value!r}")
    return value


def check_max_in_flight(value: Any) -> int | None:
    """A token's cap of requests per model (waiting or running, all senders); None: no cap."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= SQL_INTEGER_MAX:
        raise ValueError(f"max_in_flight must be an integer from 1 to {SQL_INTEGER_MAX} (or absent), got {value!r}")
    return value


def default_name(token: str) -> str:
    return f"token-{hash_token(token)[:8]}"


def load_token_entries(path: str | os.PathLike[str], max_priority: int | None = None) -> list[dict[str, Any]]:
    """Reads and validates a YAML or JSON list of `{token, priority, threshold, name, max_in_flight}`.

    The shape of the Helm chart's `tokens:` value; `name` defaults to `token-<first 8 hex of the
    hash>`, `max_in_flight` to none (no cap). Returns dicts with all five keys. Raises OSError when the file cannot be read and
    ValueError, naming the file and the entry (counted from 1), when it is not valid; neither
    message contains a token. `max_priority` defaults to MAX_PRIORITY from the environment.
    """
    if max_priority is None:
        max_priority = max_priority_from_env(os.environ)
    document = parse_token_file(Path(path))
    if document is None:  # an empty file, e.g. the chart rendering an empty list
        return []
    if not isinstance(document, list):
        raise ValueError(f"{path}: expected a list of {{token, priority, threshold, name}}, "
                         f"got {type(document).__name__}")
    entries: list[dict[str, Any]] = []
    names: dict[str, int] = {}
    digests: dict[str, int] = {}
    for number, raw in enumerate(document, start=1):
        try:
            entry = validate_token_entry(raw, max_priority)
        except ValueError as exc:
            raise ValueError(f"{path}: entry #{number}{describe(raw)}: {exc}") from None
        digest = hash_token(entry["token"])
        if entry["name"] in names:
            raise ValueError(f"{path}: entry #{number}: name {entry['name']!r} is already used by "
                             f"entry #{names[entry['name']]}")
        if digest in digests:
            raise ValueError(f"{path}: entry #{number}{describe(raw)}: same token as entry #{digests[digest]}")
        names[entry["name"]] = digests[digest] = number
        entries.append(entry)
    return entries


def parse_token_file(path: Path) -> Any:
    text = path.read_bytes()
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    except yaml.MarkedYAMLError as exc:
        # Only the problem and its position: PyYAML's full message quotes the line, maybe a token.
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{path}: not valid YAML{where}: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid YAML or JSON: {type(exc).__name__}") from None


def validate_token_entry(raw: Any, max_priority: int) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError("expected a mapping with token, priority, threshold and optionally name")
    unknown = sorted(str(key) for key in raw if key not in TOKEN_ENTRY_KEYS)
    if unknown:
        raise ValueError(f"unknown key {', '.join(unknown)} (expected token, priority, threshold, name, "
                         "max_in_flight)")
    for key in ("token", "priority", "threshold"):
        if key not in raw:
            raise ValueError(f"missing {key}")
    token = check_token(raw["token"])
    name = check_name(raw["name"]) if raw.get("name") is not None else default_name(token)
    return {"name": name, "token": token, "priority": check_priority(raw["priority"], max_priority),
            "threshold": check_threshold(raw["threshold"]), "max_in_flight": check_max_in_flight(raw.get("max_in_flight"))}


def describe(raw: Any) -> str:
    """` (name 'x')` for an entry that has a readable name, to help find it in a long file."""
    name = raw.get("name") if isinstance(raw, dict) else None
    return f" ({name!r})" if isinstance(name, str) and name else ""


# ---------------------------------------------------------------------------------------------
# The database

@asynccontextmanager
async def connect(database_url: str) -> AsyncIterator[Database]:
    try:
        database = await open_database(database_url, pool_size=1)
    except DatabaseUnavailable as exc:  # the URL is not repeated: it may hold a password
        raise AdminError(f"cannot connect to the database: {exc}") from None
    try:
        yield database
    finally:
        await database.close()


# ---------------------------------------------------------------------------------------------
# Commands: each validates its arguments before connecting, then does one thing

async def command_migrate(args: argparse.Namespace, config: Config) -> int:
    async with connect(config.database_url) as database:
        before, after = await database.migrate()
        latest = len(type(database).MIGRATIONS)
    if after > latest:
        print(f"schema at version {after}, newer than this admin.py ({latest}): left as is", file=sys.stderr)
    print(f"schema at version {after}" + (f" (was {before})" if before != after else " (up to date)"))
    return 0


async def command_create(args: argparse.Namespace, config: Config) -> int:
    name = check_argument(check_name, args.name)
    priority = check_argument(check_priority, args.priority, config.max_priority)
    threshold = check_argument(check_threshold, args.threshold)
    max_in_flight = check_argument(check_max_in_flight, args.max_in_flight)
    token = check_argument(check_token, args.token) if args.token is not None else generate_token()
    async with connect(config.database_url) as database:
        try:
            await database.create_token(name, hash_token(token), priority, threshold, max_in_flight)
        except TokenConflict as conflict:
            if conflict.name_revoked is None:
                raise AdminError("this token is already registered under another name") from None
            state = " (revoked)" if conflict.name_revoked else ""
            raise AdminError(f"a token named {name!r} already exists{state}; choose another name") from None
    print(token)
    cap = "" if max_in_flight is None else f", max_in_flight {max_in_flight}"
    print(f"created {name!r} (priority {priority}, threshold {threshold}{cap}); the token above is not stored "
          f"and will not be shown again", file=sys.stderr)
    return 0


async def command_list(args: argparse.Namespace, config: Config) -> int:
    async with connect(config.database_url) as database:
        rows = await database.list_tokens()
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2 | orjson.OPT_UTC_Z) + b"\n")
        return 0
    table = [("NAME", "PRIORITY", "THRESHOLD", "MAX_IN_FLIGHT", "CREATED", "REVOKED")]
    table += [(row.name, str(row.priority), str(row.threshold), "-" if row.max_in_flight is None else str(row.max_in_flight),
               format_time(row.created_at), format_time(row.revoked_at)) for row in rows]
    print_table(table)
    return 0


async def command_usage(args: argparse.Namespace, config: Config) -> int:
    """Totals per token, model and UTC day, as the sender wrote them (at most USAGE_FLUSH_SECONDS old)."""
    since = EPOCH if args.since is None else check_argument(check_date, args.since)
    async with connect(config.database_url) as database:
        rows = [row.as_dict() for row in await database.usage_rows(since, args.token)]
    if args.format == "json":
        sys.stdout.buffer.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2) + b"\n")
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=USAGE_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        print_table([tuple(field.upper() for field in USAGE_FIELDS),
                     *(tuple(str(row[field]) for field in USAGE_FIELDS) for row in rows)])
    return 0


def check_date(value: str) -> datetime:
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"--since must be a date, YYYY-MM-DD: {value!r}") from None


def print_table(table: Sequence[Sequence[str]]) -> None:
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


async def command_revoke(args: argparse.Namespace, config: Config) -> int:
    async with connect(config.database_url) as database:
        revoked_now = await database.revoke_token(args.name)
    print(f"revoked {args.name!r}" if revoked_now else f"{args.name!r} was already revoked")
    return 0


async def command_update(args: argparse.Namespace, config: Config) -> int:
    priority = None if args.priority is None else check_argument(check_priority, args.priority, config.max_priority)
    threshold = None if args.threshold is None else check_argument(check_threshold, args.threshold)
    max_in_flight = None
    if args.max_in_flight is not None:  # 0 removes the cap
        max_in_flight = args.max_in_flight and check_argument(check_max_in_flight, args.max_in_flight)
    async with connect(config.database_url) as database:
        row = await database.update_token(args.name, priority, threshold, max_in_flight)
    state = " (revoked)" if row.revoked_at else ""
    cap = "none" if row.max_in_flight is None else row.max_in_flight
    print(f"updated {args.name!r}: priority {row.priority}, threshold {row.threshold}, max_in_flight {cap}{state}")
    return 0


async def command_load(args: argparse.Namespace, config: Config) -> int:
    try:
        entries = load_token_entries(args.file, config.max_priority)
    except OSError as exc:
        raise AdminError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    rows = [(entry["name"], hash_token(entry["token"]), entry["priority"], entry["threshold"], entry["max_in_flight"])
            for entry in entries]
    async with connect(config.database_url) as database:
        try:
            created = await database.load_tokens(rows)
        except TokenConflict as conflict:
            name = entries[conflict.entry - 1]["name"]
            raise AdminError(f"{args.file}: entry #{conflict.entry} ({name!r}): its token is already "
                             f"registered under the name {conflict.owner!r}") from None
    print(f"loaded {len(entries)} tokens from {args.file}: {created} created, {len(entries) - created} updated")
    return 0


def check_argument(check: Any, *values: Any) -> Any:
    try:
        return check(*values)
    except ValueError as exc:
        raise AdminError(str(exc)) from None


def format_time(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    # Accepted before or after the subcommand; SUPPRESS keeps a subparser from erasing the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", default=argparse.SUPPRESS, metavar="URL",
                        help="postgresql://user:password@host:5432/db or mysql://user:password@host:3306/db "
                             "(default: $DATABASE_URL; prefer the variable, arguments are visible to other users)")
    parser = argparse.ArgumentParser(
        prog="admin.py", parents=[common],
        description="Manage the dispatcher's bearer tokens (stored as SHA-256 hashes only).",
        epilog="Priority: 0..MAX_PRIORITY (env, default 10), higher is served first. Threshold: the longest "
               "queue a token accepts to join (0 = only when nobody is waiting).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub = commands.add_parser("migrate", parents=[common], help="create or upgrade the schema (idempotent)")
    sub.set_defaults(run=command_migrate)

    sub = commands.add_parser("create", parents=[common], help="create a token and print it once")
    sub.add_argument("name")
    sub.add_argument("--priority", type=int, required=True)
    sub.add_argument("--threshold", type=int, required=True)
    sub.add_argument("--max-in-flight", type=int,
                     help="the token's requests per model, waiting or running, over all senders (default: no cap)")
    sub.add_argument("--token", help="use this token instead of a generated sk-... one")
    sub.set_defaults(run=command_create)

    sub = commands.add_parser("list", parents=[common], help="list tokens (never their secret)")
    sub.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    sub.set_defaults(run=command_list)

    sub = commands.add_parser("revoke", parents=[common], help="revoke a token by name")
    sub.add_argument("name")
    sub.set_defaults(run=command_revoke)

    sub = commands.add_parser("update", parents=[common], help="change a token's priority, threshold or cap")
    sub.add_argument("name")
    sub.add_argument("--priority", type=int)
    sub.add_argument("--threshold", type=int)
    sub.add_argument("--max-in-flight", type=int, help="a new cap; 0 removes it")
    sub.set_defaults(run=command_update)

    sub = commands.add_parser("load", parents=[common],
                              help="upsert tokens by name from a YAML or JSON list (the Helm chart's `tokens:`)")
    sub.add_argument("file")
    sub.set_defaults(run=command_load)

    sub = commands.add_parser("usage", parents=[common], help="usage totals per token, model and UTC day")
    sub.add_argument("--since", metavar="YYYY-MM-DD", help="from this UTC day on (default: all)")
    sub.add_argument("--token", metavar="NAME", help="this token's totals only")
    sub.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sub.set_defaults(run=command_usage)
    return parser


def read_config(args: argparse.Namespace, parser: argparse.ArgumentParser, env: Mapping[str, str]) -> Config:
    database_url = getattr(args, "database_url", None) or env.get("DATABASE_URL", "").strip()
    if not database_url:
        parser.error("set DATABASE_URL or pass --database-url (postgresql://... or mysql://...)")
    try:
        database_class(database_url)
        max_priority = max_priority_from_env(env)
    except ConfigError as exc:
        parser.error(str(exc))
    return Config(database_url=database_url, max_priority=max_priority)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "update" and args.priority is None and args.threshold is None and args.max_in_flight is None:
        parser.error("update: give --priority, --threshold, --max-in-flight, or several")
    config = read_config(args, parser, os.environ)
    try:
        return asyncio.run(args.run(args, config))
    except AdminError as exc:
        print(f"admin.py {args.command}: {exc}", file=sys.stderr)
    except NoSuchToken as exc:
        print(f"admin.py {args.command}: no token named {str(exc)!r}", file=sys.stderr)
    except SchemaMissing:
        print(f"admin.py {args.command}: the tokens table does not exist; run `python admin.py migrate` first",
              file=sys.stderr)
    except DatabaseError as exc:
        print(f"admin.py {args.command}: database error: {exc}", file=sys.stderr)
    except ConfigError as exc:  # a setting the driver refused when connecting
        print(f"admin.py {args.command}: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
