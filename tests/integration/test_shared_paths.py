"""Paths in the database are relative to the configured roots (issue 16): two nodes on one
database, the shared spool mounted at another path on each, read the same rows' files.

Node A receives a series and processes it; then the spool is found at another path (host
B mounts the shared filesystem elsewhere: A's path no longer exists) and node B, on the
same database, runs the series again from its own mount and its retention sweep removes
the files there. Stored absolute paths would point B at A's mount and fail. On SQLite and
PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

from pydicom import dcmread

from ketanode.admin.retention import sweep
from ketanode.db.jobqueue import enqueue_batch
from ketanode.db.models import JobLane, JobState, utcnow
from ketanode.node import Node
from tests.integration.conftest import RunningNode, build_settings
from tests.integration.dicomtools import send, t1_series

N = 40


def _start(workdir: Path, db_url: str, overrides: dict[str, Any] | None = None) -> RunningNode:
    node = Node(build_settings(workdir, db_url, overrides))
    host, port = node.start()
    return RunningNode(node, host, port, workdir)


def test_two_nodes_with_the_spool_mounted_at_different_paths_read_the_same_rows(
    db_url: str, tmp_path: Path
) -> None:
    files = t1_series(tmp_path / "t1", n_slices=N)
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)

    a = _start(tmp_path / "a", db_url)
    try:
        assert send(a.port, files) == [0] * N
        series, first = a.wait_job_done(uid)
        rows = a.instances(uid)
    finally:
        a.node.stop()
    assert len(rows) == N
    # stored relative to the spool: <study>/<series>/<sop>.dcm
    assert all(not r.spool_path.startswith("/") for r in rows), rows[0].spool_path
    assert all(r.spool_path.count("/") == 2 for r in rows)
    spool_a = a.settings.spool.path.resolve()
    assert a.spool_file(rows[0].spool_path).parent.parent.parent == spool_a

    # host B mounts the shared filesystem at another path; A's path is not there
    spool_b = tmp_path / "mnt" / "b" / "ketanode-spool"
    spool_b.parent.mkdir(parents=True)
    shutil.move(spool_a, spool_b)
    assert not a.spool_file(rows[0].spool_path).exists()

    b = _start(tmp_path / "b", db_url, {"spool": {"path": str(spool_b)}})
    try:
        assert all(b.spool_file(r.spool_path).is_file() for r in rows)
        assert b.spool_file(rows[0].spool_path).is_relative_to(spool_b)
        # B's worker converts the series from its own mount
        (job_id,) = enqueue_batch(b.node.sessions, [series.id], 3)
        job = b.wait(
            lambda: next(
                (j for j in b.jobs(series.id) if j.id == job_id and j.state == JobState.DONE),
                None,
            ),
            60,
            "the batch job on node B",
        )
        assert job.lane == JobLane.BATCH and job.id != first.id
        (convert,) = [s for s in b.steps(job_id) if s.name == "convert"]
        assert convert.ok and convert.detail is not None
        assert convert.detail["n_files"] == N, convert.detail
        # B's retention removes the series' files under B's mount
        report = sweep(b.node.sessions, b.settings, now=utcnow() + dt.timedelta(days=60))
        assert [p.id for p in report.series] == [series.id]
        assert report.spool_files == N
        assert not list(spool_b.rglob(f"{rows[0].sop_instance_uid}.dcm"))
        assert not [p for p in spool_b.rglob("*.dcm") if "rejected" not in p.parts]
    finally:
        b.node.stop()
