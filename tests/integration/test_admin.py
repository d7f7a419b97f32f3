"""`admin.py` as an operator runs it, against the real PostgreSQL and MariaDB, and its token-file parser.

Every database test runs on both servers, each time in a fresh database of its own (a PostgreSQL
schema, a MariaDB database: `empty_db` and `db` in conftest.py), dropped afterwards, so tests never
see each other's tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from admin import load_token_entries
from tests.helpers import free_port
from tests.integration.conftest import DATABASE_URL, ROOT, Database
from tokenstore import MySQLDatabase, PostgresDatabase, hash_token

pytestmark = pytest.mark.integration

SENDER_QUERY = "SELECT name, priority, threshold FROM tokens WHERE token_sha256 = $1 AND revoked_at IS NULL"
DIALECTS = {"postgresql": PostgresDatabase, "mariadb": MySQLDatabase}


def run_admin(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "admin.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=30)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


# ---------------------------------------------------------------------------------------------
# The command line against PostgreSQL

def test_help_lists_every_subcommand() -> None:
    result = subprocess.run([sys.executable, "admin.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("migrate", "create", "list", "revoke", "update", "load", "usage"):
        assert command in result.stdout


def test_migrate_twice_is_idempotent(empty_db: Database) -> None:
    latest = len(DIALECTS[empty_db.kind].MIGRATIONS)
    assert f"version {latest}" in empty_db.ok("migrate")
    assert "up to date" in empty_db.ok("migrate")
    assert [row["version"] for row in empty_db.fetch("SELECT version FROM schema_version ORDER BY version")] == list(
        range(1, latest + 1))
    token = empty_db.create("after-migrations")
    assert empty_db.fetch(SENDER_QUERY, hash_token(token))


def test_migrate_concurrently_is_safe(empty_db: Database) -> None:
    """Two install jobs may start at once: a lock (advisory in PostgreSQL, named in MySQL) serialises them."""
    processes = [subprocess.Popen([sys.executable, "admin.py", "migrate"], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, "DATABASE_URL": empty_db.url})
                 for _ in range(3)]
    for process in processes:
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
    assert [row["version"] for row in empty_db.fetch("SELECT version FROM schema_version ORDER BY version")] == list(
        range(1, len(DIALECTS[empty_db.kind].MIGRATIONS) + 1))


def test_migrate_adopts_a_table_created_from_the_first_migration(empty_db: Database) -> None:
    empty_db.fetch(DIALECTS[empty_db.kind].MIGRATIONS[0])
    empty_db.ok("migrate")
    assert empty_db.fetch("SELECT version FROM schema_version")[0]["version"] == 1


def test_create_prints_token_once_and_stores_only_its_hash(db: Database) -> None:
    result = db.admin("create", "alice", "--priority", "8", "--threshold", "50")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    assert token.startswith("sk-") and len(token) > 40
    assert token not in result.stderr

    row = db.fetch("SELECT * FROM tokens")[0]
    assert row["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(row)
    found = db.fetch(SENDER_QUERY, hash_token(token))
    assert [tuple(r.values()) for r in found] == [("alice", 8, 50)]


def test_create_with_given_token_stores_its_hash(db: Database) -> None:
    assert db.ok("create", "ci", "--priority", "0", "--threshold", "0", "--token", "sk-given-1") == "sk-given-1\n"
    assert [tuple(r.values()) for r in db.fetch(SENDER_QUERY, hash_token("sk-given-1"))] == [("ci", 0, 0)]


def test_create_tokens_are_unique(db: Database) -> None:
    assert db.create("one") != db.create("two")


def test_create_duplicate_name_fails(db: Database) -> None:
    db.create("alice")
    assert_one_line_error(db.admin("create", "alice", "--priority", "1", "--threshold", "1"), "'alice'", "exists")
    assert len(db.fetch("SELECT 1 FROM tokens")) == 1


def test_create_reused_token_fails(db: Database) -> None:
    db.ok("create", "first", "--priority", "1", "--threshold", "1", "--token", "sk-same")
    result = db.admin("create", "second", "--priority", "1", "--threshold", "1", "--token", "sk-same")
    assert_one_line_error(result, "already registered")
    assert "sk-same" not in result.stderr


@pytest.mark.parametrize(("args", "env", "fragment"), [
    pytest.param(["--priority", "11", "--threshold", "1"], {}, "priority", id="priority-above-default-max"),
    pytest.param(["--priority", "-1", "--threshold", "1"], {}, "priority", id="priority-negative"),
    pytest.param(["--priority", "4", "--threshold", "1"], {"MAX_PRIORITY": "3"}, "MAX_PRIORITY=3",
                 id="priority-above-env-max"),
    pytest.param(["--priority", "1", "--threshold", "-1"], {}, "threshold", id="threshold-negative"),
    pytest.param(["--priority", "1", "--threshold", "1", "--token", "sk with space"], {}, "token",
                 id="token-with-space"),
])
def test_create_bad_value_fails_naming_it(db: Database, args: list[str], env: dict[str, str], fragment: str) -> None:
    assert_one_line_error(db.admin("create", "bad", *args, **env), fragment)
    assert db.fetch("SELECT 1 FROM tokens") == []


def test_create_priority_up_to_max_priority_from_env(db: Database) -> None:
    token = db.ok("create", "urgent", "--priority", "20", "--threshold", "1", MAX_PRIORITY="20").strip()
    assert db.fetch(SENDER_QUERY, hash_token(token))[0]["priority"] == 20


def test_list_shows_settings_but_never_secret_or_hash(db: Database) -> None:
    token = db.create("alice", priority=8, threshold=50)
    db.create("bob", priority=1, threshold=0)
    db.ok("revoke", "bob")
    digest = hash_token(token)

    table = db.ok("list")
    assert token not in table and digest not in table
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "PRIORITY", "THRESHOLD", "MAX_IN_FLIGHT", "CREATED", "REVOKED"]
    assert lines[1].split()[:4] == ["alice", "8", "50", "-"] and lines[1].split()[5] == "-"
    assert lines[2].split()[:4] == ["bob", "1", "0", "-"] and lines[2].split()[5] != "-"

    listed = db.ok("list", "--json")
    assert token not in listed and digest not in listed
    rows = json.loads(listed)
    assert [(r["name"], r["priority"], r["threshold"], r["revoked_at"] is None) for r in rows] == [
        ("alice", 8, 50, True), ("bob", 1, 0, False)]
    assert set(rows[0]) == {"name", "priority", "threshold", "max_in_flight", "created_at", "revoked_at"}


def test_revoke_hides_token_from_sender_query(db: Database) -> None:
    token = db.create("alice")
    assert "revoked" in db.ok("revoke", "alice")
    assert db.fetch(SENDER_QUERY, hash_token(token)) == []
    revoked_at = db.fetch("SELECT revoked_at FROM tokens")[0]["revoked_at"]
    assert revoked_at is not None

    assert "already revoked" in db.ok("revoke", "alice")
    assert db.fetch("SELECT revoked_at FROM tokens")[0]["revoked_at"] == revoked_at


def test_revoke_unknown_name_fails(db: Database) -> None:
    assert_one_line_error(db.admin("revoke", "nobody"), "'nobody'")


def test_update_changes_only_given_values(db: Database) -> None:
    token = db.create("alice", priority=8, threshold=50)
    db.ok("update", "alice", "--threshold", "10")
    assert tuple(db.fetch(SENDER_QUERY, hash_token(token))[0].values()) == ("alice", 8, 10)
    db.ok("update", "alice", "--priority", "2", "--threshold", "0")
    assert tuple(db.fetch(SENDER_QUERY, hash_token(token))[0].values()) == ("alice", 2, 0)


@pytest.mark.parametrize(("args", "status", "fragment"), [
    pytest.param(["nobody", "--priority", "1"], 1, "'nobody'", id="unknown-name"),
    pytest.param(["alice", "--priority", "11"], 1, "priority", id="priority-above-max"),
    pytest.param(["alice", "--threshold", "-5"], 1, "threshold", id="threshold-negative"),
    pytest.param(["alice"], 2, "--priority", id="nothing-to-update"),
])
def test_update_bad_input_fails(db: Database, args: list[str], status: int, fragment: str) -> None:
    db.create("alice", priority=8, threshold=50)
    result = db.admin("update", *args)
    assert result.returncode == status, result.stderr
    assert fragment in result.stderr
    assert tuple(db.fetch("SELECT priority, threshold FROM tokens")[0].values()) == (8, 50)


def test_load_yaml_upserts_by_name(db: Database, tmp_path: Path) -> None:
    """Existing names get the file's token and values and are un-revoked; new ones are created."""
    old = db.create("alice", priority=9, threshold=100)
    db.ok("revoke", "alice")
    path = tmp_path / "tokens.yaml"
    path.write_text("- name: alice\n  token: sk-alice-2\n  priority: 3\n  threshold: 4\n"
                    "- token: sk-anonymous\n  priority: 1\n  threshold: 0\n")

    assert "1 created, 1 updated" in db.ok("load", str(path))
    assert "0 created, 2 updated" in db.ok("load", str(path))

    assert db.fetch(SENDER_QUERY, hash_token(old)) == []
    assert tuple(db.fetch(SENDER_QUERY, hash_token("sk-alice-2"))[0].values()) == ("alice", 3, 4)
    anonymous = f"token-{hash_token('sk-anonymous')[:8]}"
    assert tuple(db.fetch(SENDER_QUERY, hash_token("sk-anonymous"))[0].values()) == (anonymous, 1, 0)
    assert len(db.fetch("SELECT 1 FROM tokens")) == 2


def test_load_json_file(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps([{"name": "j", "token": "sk-json", "priority": 2, "threshold": 7}]))
    db.ok("load", str(path))
    assert tuple(db.fetch(SENDER_QUERY, hash_token("sk-json"))[0].values()) == ("j", 2, 7)


def test_load_bad_entry_fails_naming_it_and_changes_nothing(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("- {name: ok, token: sk-ok, priority: 1, threshold: 1}\n"
                    "- {name: bad, token: sk-bad-secret, priority: 99, threshold: 1}\n")
    result = db.admin("load", str(path))
    assert_one_line_error(result, str(path), "entry #2", "'bad'", "priority")
    assert "sk-bad-secret" not in result.stderr
    assert db.fetch("SELECT 1 FROM tokens") == []


def test_load_token_owned_by_another_name_fails_atomically(db: Database, tmp_path: Path) -> None:
    db.ok("create", "alice", "--priority", "1", "--threshold", "1", "--token", "sk-moved")
    path = tmp_path / "tokens.yaml"
    path.write_text("- {name: new, token: sk-fresh, priority: 1, threshold: 1}\n"
                    "- {name: alice2, token: sk-moved, priority: 1, threshold: 1}\n")
    result = db.admin("load", str(path))
    assert_one_line_error(result, "entry #2", "'alice'")
    assert "sk-moved" not in result.stderr
    assert [row["name"] for row in db.fetch("SELECT name FROM tokens")] == ["alice"]


def test_load_missing_file_fails(db: Database, tmp_path: Path) -> None:
    assert_one_line_error(db.admin("load", str(tmp_path / "absent.yaml")), "absent.yaml")


def test_commands_before_migrate_say_to_migrate(empty_db: Database) -> None:
    assert_one_line_error(empty_db.admin("list"), "migrate")


@pytest.mark.parametrize(("url", "fragment"), [
    pytest.param(f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/test", "cannot connect", id="pg-no-server"),
    pytest.param(f"mysql://root:hunter2@127.0.0.1:{free_port()}/test", "Can't connect", id="mysql-no-server"),
    pytest.param("mysql://root:hunter2@nosuchhost.invalid:3306/test", "nosuchhost.invalid", id="mysql-bad-host"),
    pytest.param("mysql://nobody-here:hunter2@127.0.0.1:3306/test", "Access denied", id="mysql-wrong-credentials"),
    pytest.param("mysql://root:@127.0.0.1:3306/no_such_database_here", "Unknown database", id="mysql-no-database"),
])
def test_unreachable_database_fails_in_one_line(url: str, fragment: str) -> None:
    result = run_admin("list", DATABASE_URL=url)
    assert_one_line_error(result, "cannot connect to the database", fragment)
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize(("env", "fragment"), [
    pytest.param({"DATABASE_URL": ""}, "DATABASE_URL", id="no-database-url"),
    pytest.param({"DATABASE_URL": "sqlite:///tokens.db"}, "postgresql:// or mysql://", id="unknown-scheme"),
    pytest.param({"DATABASE_URL": "mysql://root:hunter2@127.0.0.1:3306"}, "needs a user and a database",
                 id="mysql-without-database"),
    pytest.param({"DATABASE_URL": "mysql://root:hunter2@127.0.0.1:3306/test?ssl=1"}, "TLS", id="mysql-parameters"),
    pytest.param({"DATABASE_URL": "mysql://root:hunter2@127.0.0.1:99999/test"}, "Port", id="bad-port"),
    pytest.param({"MAX_PRIORITY": "many"}, "MAX_PRIORITY", id="bad-max-priority"),
])
def test_bad_configuration_is_a_usage_error(env: dict[str, str], fragment: str) -> None:
    result = run_admin("list", **{"DATABASE_URL": DATABASE_URL, **env})
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert "hunter2" not in result.stderr


def test_database_url_option_works_after_the_subcommand(db: Database) -> None:
    db.create("alice")
    result = subprocess.run([sys.executable, "admin.py", "list", "--database-url", db.url], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "DATABASE_URL": ""}, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "alice" in result.stdout


# ---------------------------------------------------------------------------------------------
# load_token_entries: the file format shared with the sender's TOKENS_FILE

def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_token_entries_reads_yaml_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "t.yaml", "- {name: a, token: sk-a, priority: 10, threshold: 0}\n"
                                     "- {token: sk-b, priority: 0, threshold: 3, name: null}\n")
    assert load_token_entries(path, max_priority=10) == [
        {"name": "a", "token": "sk-a", "priority": 10, "threshold": 0, "max_in_flight": None},
        {"name": f"token-{hash_token('sk-b')[:8]}", "token": "sk-b", "priority": 0, "threshold": 3, "max_in_flight": None},
    ]


def test_load_token_entries_reads_json_and_the_example_file(tmp_path: Path) -> None:
    path = write(tmp_path, "t.json", '[{"token": "sk-j", "priority": 1, "threshold": 2, "name": "j"}]')
    assert load_token_entries(path, max_priority=10)[0]["name"] == "j"
    assert [e["name"] for e in load_token_entries(ROOT / "tokens.example.yaml", max_priority=10)] == [
        "interactive", "batch"]


def test_load_token_entries_empty_file_is_an_empty_list(tmp_path: Path) -> None:
    assert load_token_entries(write(tmp_path, "t.yaml", ""), max_priority=10) == []


def test_load_token_entries_max_priority_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "t.yaml", "- {token: sk-a, priority: 12, threshold: 0}\n")
    monkeypatch.delenv("MAX_PRIORITY", raising=False)
    with pytest.raises(ValueError, match="MAX_PRIORITY=10"):
        load_token_entries(path)
    monkeypatch.setenv("MAX_PRIORITY", "12")
    assert load_token_entries(path)[0]["priority"] == 12


@pytest.mark.parametrize(("name", "text", "fragment"), [
    pytest.param("t.yaml", "token: sk-secret\n", "expected a list", id="not-a-list"),
    pytest.param("t.yaml", "- sk-secret\n", "entry #1: expected a mapping", id="entry-not-a-mapping"),
    pytest.param("t.yaml", "- {priority: 1, threshold: 1}\n", "entry #1: missing token", id="missing-token"),
    pytest.param("t.yaml", "- {token: sk-secret, threshold: 1}\n", "missing priority", id="missing-priority"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: 1}\n", "missing threshold", id="missing-threshold"),
    pytest.param("t.yaml", "- {token: '', priority: 1, threshold: 1}\n", "token must be", id="empty-token"),
    pytest.param("t.yaml", "- {token: 12345, priority: 1, threshold: 1}\n", "token must be a string",
                 id="token-not-a-string"),
    pytest.param("t.yaml", "- {token: 'sk secret', priority: 1, threshold: 1}\n", "without spaces",
                 id="token-with-space"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: 11, threshold: 1}\n", "priority", id="priority-above-max"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: -1, threshold: 1}\n", "priority", id="priority-negative"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: '5', threshold: 1}\n", "priority", id="priority-string"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: yes, threshold: 1}\n", "priority", id="priority-bool"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: 1, threshold: -1}\n", "threshold",
                 id="threshold-negative"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: 1, threshold: 1.5}\n", "threshold", id="threshold-float"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: 1, threshold: 2147483648}\n", "threshold",
                 id="threshold-too-large"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: 1, treshold: 1}\n", "unknown key treshold",
                 id="unknown-key"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: 1, threshold: 1, max_in_flight: 0}\n", "max_in_flight",
                 id="max-in-flight-zero"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: 1, threshold: 1, max_in_flight: '4'}\n", "max_in_flight",
                 id="max-in-flight-string"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: 1, threshold: 1, name: ''}\n", "name",
                 id="empty-name"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: 1, threshold: 1, name: ' x'}\n", "name",
                 id="name-with-surrounding-space"),
    pytest.param("t.yaml", "- {token: sk-a, priority: 1, threshold: 1, name: x}\n"
                           "- {token: sk-secret, priority: 1, threshold: 1, name: x}\n",
                 "entry #2: name 'x' is already used by entry #1", id="duplicate-name"),
    pytest.param("t.yaml", "- {token: sk-secret, priority: 1, threshold: 1, name: x}\n"
                           "- {token: sk-secret, priority: 1, threshold: 1, name: y}\n",
                 "entry #2 ('y'): same token as entry #1", id="duplicate-token"),
    pytest.param("t.yaml", "- {token: \"sk-secret, priority: 1\n", "not valid YAML", id="invalid-yaml"),
    pytest.param("t.json", '[{"token": "sk-secret", "priority": 1,}]', "not valid JSON", id="invalid-json"),
])
def test_load_token_entries_rejects_bad_file(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    """The message names the file, the entry and the problem, and never repeats a token."""
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError) as caught:
        load_token_entries(path, max_priority=10)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert fragment in message
    assert "sk-secret" not in message


def test_load_token_entries_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_token_entries(tmp_path / "absent.yaml", max_priority=10)


def test_max_in_flight_is_created_updated_removed_and_loaded(db: Database, tmp_path: Path) -> None:
    """The per-token cap: set at creation, changed, removed with 0, and set by `load` from the chart's
    tokens list; the sender's query returns it."""
    token = db.ok("create", "capped", "--priority", "5", "--threshold", "10", "--max-in-flight", "4").strip()
    caps = "SELECT max_in_flight FROM tokens WHERE name = 'capped'"
    assert db.fetch(caps)[0]["max_in_flight"] == 4
    assert "max_in_flight 2" in db.ok("update", "capped", "--max-in-flight", "2")
    assert db.fetch(caps)[0]["max_in_flight"] == 2
    assert "max_in_flight 2" in db.ok("update", "capped", "--priority", "6")  # other changes keep the cap
    assert "max_in_flight none" in db.ok("update", "capped", "--max-in-flight", "0")
    assert db.fetch(caps)[0]["max_in_flight"] is None
    assert db.admin("create", "bad", "--priority", "1", "--threshold", "1", "--max-in-flight", "-3").returncode == 1
    path = tmp_path / "tokens.yaml"
    path.write_text(f"- {{name: capped, token: {token}, priority: 5, threshold: 10, max_in_flight: 8}}\n")
    db.ok("load", str(path))
    assert db.fetch(caps)[0]["max_in_flight"] == 8
