"""Each job runs in its own process: a killed or hung job fails with its reason, the node
keeps receiving and processing, and a stopping node gives running jobs back to the queue."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from ketanode.db.models import Job
from tests.integration.conftest import NodeFactory, RunningNode
from tests.integration.dicomtools import echoscu, send, t1_series


def _running_child(node: RunningNode, timeout: float = 60.0) -> tuple[int, int]:
    """(job id, child pid) of the job being processed."""
    pool = node.node.workers

    def found() -> tuple[int, int] | None:
        with pool._lock:
            for job_id, child in pool._children.items():
                if child.pid:
                    return job_id, child.pid
        return None

    return node.wait(found, timeout, "a job process to start")


def test_killed_job_process_fails_the_job_and_the_node_goes_on(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory()
    first = t1_series(tmp_path / "a", n_slices=160, size=192, seed=1)
    assert set(send(node.port, first)) == {0}
    job_id, pid = _running_child(node)
    os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
    with node.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        series_uid = job.series.series_uid
    series = node.wait_state(series_uid, ("failed",), 60)
    assert "worker" in (series.reason or "") and "SIGKILL" in (series.reason or "")
    (job,) = node.jobs(series.id)
    assert job.state == "failed" and job.failed_step == "worker"
    # the listener and the workers are unaffected
    assert echoscu(node.port).returncode == 0
    second = t1_series(tmp_path / "b", n_slices=40, seed=2)
    assert set(send(node.port, second)) == {0}
    node.wait_job_done(_uid(second[0]))


def test_a_job_past_its_time_limit_is_killed(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory({"pipeline": {"job_timeout_seconds": 0.2}})
    files = t1_series(tmp_path / "a", n_slices=120, size=128, seed=3)
    assert set(send(node.port, files)) == {0}
    series = node.wait_state(_uid(files[0]), ("failed",), 60)
    assert "timed out after" in (series.reason or "")


def test_stopping_node_requeues_the_running_job(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory(name="first")
    files = t1_series(tmp_path / "a", n_slices=160, size=192, seed=4)
    assert set(send(node.port, files)) == {0}
    job_id, pid = _running_child(node)
    node.node.stop()
    assert node.node.stopped.is_set()
    # the child is gone and the job is back in the queue, this try not counted
    assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)
    with node.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempt) == ("queued", 0)
        assert "stopping" in (job.error or "")
        assert job.series.state == "queued"
    # a new node on the same database and spool finishes it
    again = node_factory({"spool": {"path": str(node.spool_root)}}, name="second")
    again.node.settings.pipeline.work_dir = node.settings.pipeline.work_dir
    series, job = again.wait_job_done(_uid(files[0]))
    assert job.id == job_id and job.attempt == 1


def _uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
