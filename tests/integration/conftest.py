"""Fixtures for the integration tests: a real ketanode Node, in this process, on a free port.

The node gets its own spool and work directories under ``tmp_path`` and the database of
the ``db_url`` fixture (tests/conftest.py), so every test that uses ``node`` or
``node_factory`` runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ketanode.config import Settings, merge
from ketanode.db.models import (
    Association,
    Instance,
    Job,
    JobStep,
    Series,
    StoreFailure,
)
from ketanode.node import Node
from ketanode.roots import reports_root, spool_root
from tests.integration.dicomtools import TEST_AE
from tests.support import wait_for

#: Series states after selection chose the series for processing.
SELECTED_STATES = ("queued", "processing", "done")
FINAL_STATES = ("ignored", "done", "failed")


def build_settings(workdir: Path, db_url: str, overrides: dict[str, Any] | None = None) -> Settings:
    base: dict[str, Any] = {
        "node": {
            "ae_title": "KETANODE",
            "bind_address": "127.0.0.1",
            "port": 0,
            "allowed_callers": [
                {"ae_title": TEST_AE, "address": "127.0.0.1"},
                {"ae_title": "STORESCU", "address": "127.0.0.1"},
            ],
            "network_timeout_seconds": 30,
            "dimse_timeout_seconds": 30,
        },
        "spool": {"path": str(workdir / "spool"), "min_free_mb": 16},
        "database": {"url": db_url},
        "series": {"grace_seconds": 1.0, "check_interval_seconds": 0.25},
        # ingest tests: conversion only; the measurement tests switch it on
        "pipeline": {"work_dir": str(workdir / "work"), "workers": 1, "measure": False},
        "reports": {"path": str(workdir / "reports")},
    }
    return Settings.model_validate(merge(base, overrides or {}))


@dataclass
class RunningNode:
    """A started Node plus read helpers over its database (plain detached rows)."""

    node: Node
    host: str
    port: int
    workdir: Path

    @property
    def settings(self) -> Settings:
        return self.node.settings

    @property
    def spool_root(self) -> Path:
        return self.node.spool.root

    def spool_file(self, stored: str | None) -> Path:
        """The file of a stored spool path (``instance.spool_path``, ``quarantine_path``):
        relative to the spool root (ketanode/roots.py)."""
        assert stored, "no stored path"
        return spool_root(self.settings).resolve(stored)

    def report_file(self, stored: str) -> Path:
        """The file of a stored ``emitted_object.path`` (relative to the reports folder)."""
        return reports_root(self.settings).resolve(stored)

    def session(self) -> Session:
        return self.node.sessions()

    def all(self, model: Any, *where: Any, order: Any = None) -> list[Any]:
        with self.session() as s:
            stmt = select(model).where(*where).order_by(order if order is not None else model.id)
            return list(s.scalars(stmt).all())

    def series(self, series_uid: str | None = None) -> list[Series]:
        where = [Series.series_uid == series_uid] if series_uid else []
        return self.all(Series, *where)

    def one_series(self, series_uid: str) -> Series:
        rows = self.series(series_uid)
        assert len(rows) == 1, f"expected one series row for {series_uid}, found {len(rows)}"
        return rows[0]

    def instances(
        self, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[Instance]:
        where: list[Any] = []
        if sop_uid:
            where.append(Instance.sop_instance_uid == sop_uid)
        if series_uid:
            with self.session() as s:
                ids = s.scalars(select(Series.id).where(Series.series_uid == series_uid)).all()
            where.append(Instance.series_id.in_(ids))
        return self.all(Instance, *where)

    def failures(self) -> list[StoreFailure]:
        return self.all(StoreFailure)

    def associations(self) -> list[Association]:
        return self.all(Association)

    def jobs(self, series_id: int) -> list[Job]:
        return self.all(Job, Job.series_id == series_id)

    def steps(self, job_id: int) -> list[JobStep]:
        return self.all(JobStep, JobStep.job_id == job_id)

    def wait(
        self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition"
    ) -> Any:
        return wait_for(predicate, timeout, 0.1, what)

    def wait_state(self, series_uid: str, states: tuple[str, ...], timeout: float = 30.0) -> Series:
        def reached() -> Series | None:
            rows = self.series(series_uid)
            return rows[0] if rows and rows[0].state in states else None

        try:
            return self.wait(reached, timeout, f"series {series_uid} to reach {states}")
        except AssertionError:
            rows = self.series(series_uid)
            state = [(r.state, r.reason, r.n_instances) for r in rows]
            raise AssertionError(f"series {series_uid} did not reach {states}: {state}") from None

    def wait_association_ended(
        self, count: int | None = None, timeout: float = 15.0
    ) -> list[Association]:
        """Until every association row is closed (and at least ``count`` exist)."""

        def ended() -> list[Association] | None:
            rows = self.associations()
            if count is not None and len(rows) < count:
                return None
            return rows if rows and all(r.ended_at is not None for r in rows) else None

        return self.wait(ended, timeout, "association rows to be closed")

    def wait_job_done(self, series_uid: str, timeout: float = 120.0) -> tuple[Series, Job]:
        series = self.wait_state(series_uid, ("done", "failed"), timeout)
        jobs = [j for j in self.jobs(series.id) if j.series_generation == series.generation]
        assert series.state == "done", (
            f"series {series.id} failed: {series.reason}; jobs: "
            + "; ".join(f"{j.state} {j.failed_step} {j.error}" for j in jobs)
        )
        assert len(jobs) == 1, f"expected one job for the current generation, got {len(jobs)}"
        return series, jobs[0]


NodeFactory = Callable[..., RunningNode]


@pytest.fixture
def node_factory(tmp_path: Path, db_url: str) -> Iterator[NodeFactory]:
    """Start Node(settings) in this process; every node is stopped at teardown."""
    started: list[RunningNode] = []

    def start(overrides: dict[str, Any] | None = None, name: str = "node") -> RunningNode:
        workdir = tmp_path / name
        settings = build_settings(workdir, db_url, overrides)
        node = Node(settings)
        host, port = node.start()
        running = RunningNode(node, host, port, workdir)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        running.node.stop()
        assert running.node.stopped.is_set()


@pytest.fixture
def node(node_factory: NodeFactory) -> RunningNode:
    return node_factory()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs file systems under tmp_path (we run as root); unmounted at teardown.
    If mounting is not permitted the test fails: the ENOSPC path must really be exercised."""
    mounted: list[Path] = []

    def mount(name: str = "tmpfs", size: str = "4m", nr_inodes: int | None = None) -> Path:
        point = tmp_path / name
        point.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes else "")
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, f"cannot mount a tmpfs at {point}: {proc.stderr}"
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)
