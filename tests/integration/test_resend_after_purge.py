"""A series sent again after retention purged its spool files is received and processed
again (SQLite and PostgreSQL, a real node, DCMTK storescu): the resend is stored (not taken
for duplicates), reopens the series (generation 2), completes it at the expected count and
runs a new job; the rows of the first round (job, steps, result) stay. With empty
directories pruned, the spool creates the series directory again."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom import dcmread

from ketanode.admin.retention import sweep
from ketanode.db.models import Result, utcnow
from tests.integration.conftest import NodeFactory
from tests.integration.dicomtools import t1_series
from tests.support import storescu


@pytest.mark.parametrize("prune_dirs", [True, False], ids=["pruned", "dirs-kept"])
def test_series_sent_again_after_purge_is_processed_again(
    node_factory: NodeFactory, tmp_path: Path, prune_dirs: bool
) -> None:
    node = node_factory()
    files = t1_series(tmp_path / "t1", n_slices=40)
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    storescu(node.port, files)
    first, first_job = node.wait_job_done(uid)
    assert first.generation == 1 and first.n_instances == 40
    old_steps = [s.id for s in node.steps(first_job.id)]
    with node.node.sessions.begin() as s:  # a result of the first round (conversion only has none)
        s.add(
            Result(
                job_id=first_job.id,
                series_id=first.id,
                status="not_scored",
                qc_outcome="fail",
                qc_checks=[],
                volumes={},
                contributions={},
                software_version="test",
            )
        )
    first_paths = [node.spool_file(i.spool_path) for i in node.instances(uid)]
    series_dir = first_paths[0].parent

    report = sweep(
        node.node.sessions,
        node.settings,
        now=utcnow() + dt.timedelta(days=365),
        prune_dirs=prune_dirs,
    )
    assert [(p.id, p.files) for p in report.series] == [(first.id, 40)]
    assert not any(p.exists() for p in first_paths)
    assert series_dir.exists() is not prune_dirs
    purged = node.one_series(uid)
    assert purged.purged_at is not None and purged.state == "done"
    assert (purged.n_instances, purged.n_frames) == (0, 0)
    assert node.instances(uid) == []

    storescu(node.port, files)
    node.wait(lambda: node.one_series(uid).generation == 2, 30, "the series to be reopened")
    series, job = node.wait_job_done(uid)
    second_assoc = node.wait_association_ended(2)[-1]
    assert (second_assoc.n_stored, second_assoc.n_duplicate, second_assoc.n_failed) == (40, 0, 0)
    assert node.failures() == []
    assert series.id == first.id and series.generation == 2
    assert series.n_instances == 40 and series.completion_trigger == "expected_count"
    assert job.id != first_job.id and job.state == "done" and job.series_generation == 2
    (step,) = node.steps(job.id)
    assert step.detail["n_files"] == 40
    instances = node.instances(uid)
    assert len(instances) == 40 and all(node.spool_file(i.spool_path).is_file() for i in instances)
    assert sorted(node.spool_file(i.spool_path) for i in instances) == sorted(first_paths)
    # the first round's rows stay
    jobs = {j.id: j for j in node.jobs(series.id)}
    assert jobs[first_job.id].state == "done" and jobs[first_job.id].series_generation == 1
    assert [s.id for s in node.steps(first_job.id)] == old_steps
    assert [r.job_id for r in node.all(Result, Result.series_id == series.id)] == [first_job.id]
    # and retention may purge it again once it is done
    again = sweep(node.node.sessions, node.settings, now=utcnow() + dt.timedelta(days=365))
    assert [(p.id, p.files) for p in again.series] == [(series.id, 40)]
