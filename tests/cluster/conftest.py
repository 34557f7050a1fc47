"""A cluster on loopback for tests: role processes (``ketanode serve --role ...``,
``ketanode worker``) on one PostgreSQL database and one RabbitMQ queue of their own.

Each test gets a fresh database and a queue name no other test uses (RabbitMQ at
127.0.0.1:5672, guest/guest, default vhost), deleted at teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ketanode.cluster.engine import make_celery, queue_depth
from ketanode.config import load_settings
from tests.e2e.conftest import Db
from tests.support import free_port, postgres_database, wait_for, write_config

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"


def rabbitmq_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class RoleProcess:
    """One role process with its own log file."""

    name: str
    args: list[str]
    config: Path
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> RoleProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ketanode", "--config", str(self.config), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, **self.env},
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def check_alive(self) -> None:
        if not self.alive():
            code = None if self.proc is None else self.proc.returncode
            raise AssertionError(f"{self.name} exited with {code}:\n{self.log_text()[-3000:]}")

    def listening(self) -> bool:
        self.check_alive()
        assert self.port is not None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)
            if sig == signal.SIGKILL:
                self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class Cluster:
    """Role processes on one configuration; the test starts what it needs."""

    def __init__(
        self, workdir: Path, db_url: str, queue: str, overrides: dict[str, Any] | None = None
    ) -> None:
        self.workdir = workdir
        self.db_url = db_url
        self.queue = queue
        workdir.mkdir(parents=True, exist_ok=True)
        sections: dict[str, Any] = {
            "node": {"ae_title": "KETANODE", "bind_address": "127.0.0.1", "port": 11112},
            "spool": {"path": str(workdir / "spool"), "min_free_mb": 64},
            "database": {"url": db_url},
            "pipeline": {
                "work_dir": str(workdir / "work"),
                "measure": True,
                "lease_seconds": 15.0,
            },
            "reports": {"path": str(workdir / "reports")},
            "series": {"grace_seconds": 1.0, "check_interval_seconds": 0.5},
            "logging": {"level": "INFO"},
            "cluster": {
                "enabled": True,
                "broker_url": BROKER_URL,
                "queue": queue,
                "heartbeat_seconds": 1.0,
                "standby_poll_seconds": 1.0,
                "recovery_interval_seconds": 2.0,
                "publish_interval_seconds": 0.5,
                "republish_idle_seconds": 5.0,
                "republish_seconds": 120.0,
            },
        }
        for key, values in (overrides or {}).items():
            if isinstance(values, dict) and isinstance(sections.get(key), dict):
                sections[key] = {**sections[key], **values}
            else:
                sections[key] = values
        self.config = write_config(workdir / "ketanode.toml", sections)
        self.settings = load_settings(self.config, environ={})
        self.db = Db(db_url)
        self.processes: list[RoleProcess] = []
        self._n = 0

    def _role(self, kind: str, args: list[str], **kw: Any) -> RoleProcess:
        self._n += 1
        proc = RoleProcess(f"{kind}-{self._n}", args, self.config, self.workdir, **kw)
        self.processes.append(proc)
        return proc.start()

    def listener(self, port: int | None = None) -> RoleProcess:
        port = port or free_port()
        proc = self._role(
            "listener",
            ["serve", "--role", "listener"],
            env={"KETANODE__NODE__PORT": str(port)},
            port=port,
        )
        wait_for(proc.listening, 60, what=f"{proc.name} to listen")
        return proc

    def scheduler(self) -> RoleProcess:
        return self._role("scheduler", ["serve", "--role", "scheduler"])

    def worker(self) -> RoleProcess:
        return self._role("worker", ["worker"])

    def web(self, port: int | None = None) -> RoleProcess:
        """``ketanode serve --role web`` on loopback (``web_url``: its address)."""
        port = port or free_port()
        proc = self._role(
            "web",
            ["serve", "--role", "web"],
            env={"KETANODE__WEB__PORT": str(port), "KETANODE__WEB__BIND_ADDRESS": "127.0.0.1"},
            port=port,
        )
        wait_for(proc.listening, 120, what=f"{proc.name} to listen")
        return proc

    def active_schedulers(self) -> list[str]:
        """Member names of the schedulers that say they are active (heartbeat fresh). A
        scheduler SIGKILLed a moment ago still counts until its heartbeat is 3 s old."""
        rows = self.db.rows(
            "SELECT name, detail FROM cluster_member "
            "WHERE role = 'scheduler' AND stopped_at IS NULL "
            "AND heartbeat_at > now() - interval '3 seconds'"
        )
        return [r["name"] for r in rows if (r["detail"] or {}).get("active")]

    def active_scheduler(self) -> str | None:
        """The active scheduler when exactly one says so."""
        active = self.active_schedulers()
        return active[0] if len(active) == 1 else None

    def consumers(self) -> int | None:
        return queue_depth(make_celery(self.settings), self.settings).consumers

    def depth(self) -> int | None:
        return queue_depth(make_celery(self.settings), self.settings).messages

    def wait_workers(self, n: int, timeout: float = 600.0) -> None:
        wait_for(
            lambda: self.consumers() == n,
            timeout,
            interval=0.5,
            what=f"{n} workers consuming {self.queue}",
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "ketanode", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise AssertionError(f"ketanode {' '.join(args)} failed: {proc.stderr[-2000:]}")
        return proc

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.log_text()[-4000:]}" for p in self.processes)

    def stop_all(self) -> None:
        for p in self.processes:
            with contextlib.suppress(Exception):
                p.kill()
        self.db.close()


def delete_queue(name: str) -> None:
    from kombu import Connection

    with contextlib.suppress(Exception), Connection(BROKER_URL) as conn:
        channel = conn.channel()
        channel.queue_delete(name)
        channel.exchange_delete(name)


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(overrides)``: a cluster configuration on a fresh database and queue."""
    if not rabbitmq_up():
        pytest.skip("RabbitMQ is not running at 127.0.0.1:5672")
    made: list[Cluster] = []
    with contextlib.ExitStack() as stack:

        def make(overrides: dict[str, Any] | None = None) -> Cluster:
            url = stack.enter_context(postgres_database())
            queue = f"ketanode.test.{uuid.uuid4().hex[:12]}"
            stack.callback(delete_queue, queue)
            c = Cluster(tmp_path / f"cluster-{len(made)}", url, queue, overrides)
            made.append(c)
            return c

        try:
            yield make
        finally:
            for c in made:
                c.stop_all()
