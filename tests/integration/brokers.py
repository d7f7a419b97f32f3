"""A RabbitMQ node of the test's own, which a test may stop and start like an operator would.

The machine's shared broker (port 5672) is never stopped: other test runs and programs use it.
This node runs the same `rabbitmq-server`, as its own Erlang node (`dt<random>@localhost`), on free
ports, with its data under a temporary directory. `rabbitmqctl stop_app` closes every client
connection with `320 CONNECTION_FORCED`, which is what a broker restart looks like to a client,
and which a cut TCP link does not reproduce.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.helpers import free_port, wait_until

START_TIMEOUT_S = 90


class PrivateBroker:
    def __init__(self) -> None:
        self.node = f"dt{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="dispatcher-broker-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def ctl(self, *args: str, timeout_s: float = 60) -> None:
        subprocess.run(["rabbitmqctl", "-q", "-n", self.node, *args], env=self._env(), check=True,
                       capture_output=True, timeout=timeout_s)

    def start(self) -> None:
        (self.base / "rabbitmq-env.conf").write_text(f"NODENAME={self.node}\n")
        (self.base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
                                                 "loopback_users = none\n")
        (self.base / "enabled_plugins").write_text("[].\n")
        # The Debian wrapper runs the server as the `rabbitmq` user when started by root.
        if os.geteuid() == 0:
            shutil.chown(self.base, "rabbitmq", "rabbitmq")
            for path in self.base.iterdir():
                shutil.chown(path, "rabbitmq", "rabbitmq")
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=True, timeout=30)
        self.await_startup()

    def await_startup(self) -> None:
        """Returns once the node accepts connections (`await_startup` fails at once while the new node
        has not registered with epmd yet, hence the polling)."""
        def started() -> bool:
            try:
                self.ctl("await_startup", "--timeout", "10", timeout_s=20)
            except subprocess.CalledProcessError:
                return False
            return True

        wait_until(started, timeout_s=START_TIMEOUT_S, interval_s=0.5, what=f"RabbitMQ node {self.node} to start")

    def stop_app(self) -> None:
        """Stops RabbitMQ on the node (clients get CONNECTION_FORCED; the port closes)."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        """Starts it again; returns once it accepts connections."""
        self.ctl("start_app")
        self.await_startup()

    def shutdown(self) -> None:
        try:
            self.ctl("shutdown", timeout_s=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            subprocess.run(["pkill", "-f", f"-sname {self.node}"], check=False)
        shutil.rmtree(self.base, ignore_errors=True)
