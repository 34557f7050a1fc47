"""Shared helpers for tests: real peers (DCMTK, the node as a subprocess), ports, databases."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GE_DIR = SHARED / "data" / "dicom" / "ge-mp-rage-3t"

# Debian's DCMTK lives in /usr/bin; pynetdicom installs Python apps with the same names.
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
DCMODIFY = "/usr/bin/dcmodify"
CHROMIUM = "/usr/bin/chromium"  # Debian's, driven by Playwright
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    """DCMTK leaves Nagle on unless TCP_NODELAY=1 is in its environment."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    port: int,
    files: list[Path] | list[str],
    called_ae: str = "KETANODE",
    calling_ae: str = "STORESCU",
    extra: list[str] | None = None,
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    cmd = [
        STORESCU,
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        *(extra or []),
        "127.0.0.1",
        str(port),
        *[str(f) for f in files],
    ]
    proc = subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"storescu failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped afterwards)."""
    name = f"ketanode_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 60.0,
    interval: float = 0.1,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a TOML file from {"node": {...}, "series.selection": {...}}; lists of tables as
    {"node.allowed_callers": [{...}, ...]} are written as [[...]]."""
    lines: list[str] = []
    for section, values in sections.items():
        if isinstance(values, list):
            for item in values:
                lines.append(f"[[{section}]]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
            continue
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class NodeProcess:
    """``ketanode serve`` as a subprocess with its own config, data directory and log file."""

    workdir: Path
    db_url: str
    port: int = field(default_factory=free_port)
    ae_title: str = "KETANODE"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    config: Path | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "node.log"

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    def write_config(self) -> Path:
        sections: dict[str, Any] = {
            "node": {"ae_title": self.ae_title, "bind_address": "127.0.0.1", "port": self.port},
            "spool": {"path": str(self.spool), "min_free_mb": 64},
            "database": {"url": self.db_url},
            # conversion only unless a test overrides it (ingest and crash tests)
            "pipeline": {"work_dir": str(self.workdir / "work"), "measure": False},
            "logging": {"level": "DEBUG"},
        }
        for key, values in self.overrides.items():
            if isinstance(values, dict) and isinstance(sections.get(key), dict):
                sections[key] = {**sections[key], **values}
            else:
                sections[key] = values
        self.config = write_config(self.workdir / "ketanode.toml", sections)
        return self.config

    def start(self, timeout: float = 60.0) -> NodeProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.config is None:
            self.write_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ketanode", "--config", str(self.config), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        wait_for(self._listening, timeout, what="the node to listen")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"node exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.config is not None
        proc = subprocess.run(
            [sys.executable, "-m", "ketanode", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"ketanode {' '.join(args)} failed: {proc.stderr[-2000:]}")
        return proc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError("node did not stop within the timeout after SIGTERM") from None
        return int(self.proc.returncode or 0)


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (a ``playwright`` Browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, chromium_sandbox=False, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            browser.close()


# ---------------------------------------------------------------- the job queue, as tests use it


def claim(sessions: Any, owner: str, lease_seconds: float) -> int | None:
    """The id of the job :func:`ketanode.db.jobqueue.claim_next` took, or None."""
    from ketanode.db.jobqueue import claim_next

    taken = claim_next(sessions, owner, lease_seconds)
    return None if taken is None else taken[0]


def claim_job(sessions: Any, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Whether :func:`ketanode.db.jobqueue.claim_job_attempt` took job ``job_id``."""
    from ketanode.db.jobqueue import claim_job_attempt

    return claim_job_attempt(sessions, job_id, owner, lease_seconds) is not None
