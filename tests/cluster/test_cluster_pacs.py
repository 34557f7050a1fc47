"""Cluster mode on loopback with the real broker and database (issue 16): two listener
processes, an active scheduler and a standby, three Celery workers, RabbitMQ, PostgreSQL,
and Orthanc as the PACS.

Small phantoms (40 slices of 64 x 64 at 1 mm: selected as 3D T1, then stopped at the
header QC for their coverage, the fast path that still writes and sends a NOT SCORED SR
and report image) and one real-size phantom (measured and scored by the demonstration
model) are sent by DCMTK ``storescu`` to both listeners at once. On the way:

* SIGKILL of the worker running the real-size job (another worker finishes it; one result,
  attempt 2);
* SIGKILL of the active scheduler (the standby takes over; completion, publishing and
  dispatch go on: a burst sent after the kill is processed and sent);
* the broker drops the queued messages (``rabbitmqctl purge_queue`` while no worker
  consumes): the scheduler publishes the jobs again, and they run;
* RabbitMQ restarted (``rabbitmqctl stop_app`` / ``start_app``) while jobs wait in its
  queue: the scheduler reconnects, and the jobs run (their messages were durable, or are
  published again).

Every series is processed exactly once (one job, one result), and the PACS holds exactly one
SR and one report image per study.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ketanode.synthetic.demo_model import held_out_cohort
from ketanode.synthetic.phantom import make_phantom, simple_head
from ketanode.synthetic.series_writer import SeriesSpec, write_series
from tests.cluster.conftest import Cluster, RoleProcess
from tests.peers import Orthanc
from tests.support import STORESCU, dcmtk_env, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(1500)]

RABBITMQCTL = shutil.which("rabbitmqctl")
N_FIRST = int(os.environ.get("KETANODE_CLUSTER_TEST_SERIES", "9"))  # small ones, phase 1


def small_series(dest: Path, seed: int) -> tuple[SeriesSpec, list[Path]]:
    spec = SeriesSpec(
        patient_id=f"SYN-CL-{seed:03d}",
        accession_number=f"CL{seed:04d}",
        series_description="T1 MPRAGE",
    )
    volume = simple_head((40, 64, 64), seed=seed) * 1.5
    return spec, write_series(volume, (1.0, 1.0, 1.0), dest, spec)


def real_series(dest: Path) -> tuple[SeriesSpec, list[Path]]:
    spec = SeriesSpec(
        patient_id="SYN-CL-REAL", accession_number="CLREAL", series_description="T1 MPRAGE"
    )
    phantom = make_phantom(held_out_cohort(voxel_mm=1.5).phantom_spec(2, 1))
    return spec, phantom.write_dicom(dest, spec)


def send(port: int, files: list[Path], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [STORESCU, "-aet", "STORESCU", "-aec", "KETANODE", "127.0.0.1", str(port)]
            + [str(f) for f in files],
            env=dcmtk_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    finally:
        out.close()


def send_all(ports: list[int], batches: list[list[Path]], log: Path, timeout: float = 300) -> None:
    """Each series to one listener, alternating, all storescu at once."""
    procs = [send(ports[i % len(ports)], files, log) for i, files in enumerate(batches)]
    for p in procs:
        assert p.wait(timeout) == 0, log.read_text()[-3000:]


def final(c: Cluster, n: int) -> Callable[[], bool]:
    def done() -> bool:
        for p in c.processes:
            if p.name.startswith("listener") and p.proc is not None and p.alive() is False:
                p.check_alive()
        rows = c.db.rows("SELECT state FROM series")
        outbox = c.db.rows("SELECT state FROM outbox")
        return (
            len(rows) == n
            and all(r["state"] in ("done", "failed", "ignored") for r in rows)
            and all(o["state"] == "sent" for o in outbox)
            and c.db.scalar("SELECT count(*) FROM result") == n
        )

    return done


def job_of(c: Cluster, series_uid: str) -> dict[str, Any]:
    (row,) = c.db.rows(
        "SELECT j.* FROM job j JOIN series s ON s.id = j.series_id WHERE s.series_uid = :u",
        u=series_uid,
    )
    return row


def running(c: Cluster, series_uid: str) -> bool:
    rows = c.db.rows(
        "SELECT j.state FROM job j JOIN series s ON s.id = j.series_id WHERE s.series_uid = :u",
        u=series_uid,
    )
    return bool(rows) and rows[0]["state"] == "running"


def worker_running(c: Cluster, workers: list[RoleProcess], job_id: int) -> RoleProcess | None:
    """The worker process whose pool runs job ``job_id`` (its lease owner's pid is a child)."""
    owner = c.db.scalar("SELECT lease_owner FROM job WHERE id = :j AND state = 'running'", j=job_id)
    if not owner:
        return None
    child = int(owner.split(":")[1])
    parent = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
    for w in workers:
        if w.alive() and w.pid == parent:
            return w
    return None


def test_twenty_series_exactly_once_through_worker_scheduler_and_broker_faults(
    tmp_path: Path, make_cluster: Callable[..., Cluster]
) -> None:
    started = time.monotonic()
    pacs = Orthanc(tmp_path / "orthanc")
    c = make_cluster(
        {
            "model": {"demo_when_none_active": True},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}
            ],
            "dispatch": {
                "interval_seconds": 0.5,
                "backoff_initial_seconds": 1.0,
                "backoff_max_seconds": 2.0,
                "max_attempts": 1000,
            },
        }
    )
    pacs.start()
    log = tmp_path / "storescu.log"
    try:
        # -- the roles ----------------------------------------------------------------
        # the workers first: each imports the imaging libraries before it consumes
        workers = [c.worker(), c.worker(), c.worker()]
        listeners = [c.listener(), c.listener()]
        ports = [p.port for p in listeners if p.port is not None]
        first = c.scheduler()
        wait_for(c.active_scheduler, 120, interval=0.3, what="an active scheduler")
        standby = c.scheduler()
        c.wait_workers(3)
        status = json.loads(c.cli("cluster", "status", "--json").stdout)
        assert status["alive"] == {"listener": 2, "scheduler": 2, "worker": 3, "web": 0}
        host = os.uname().nodename
        assert status["active_scheduler"].startswith(f"scheduler@{host}:{first.pid}:")

        # -- phase 1: small series and one real-size one, to both listeners at once -------
        real_spec, real_files = real_series(tmp_path / "real")
        batches = [real_files]
        specs = [real_spec]
        for i in range(N_FIRST):
            spec, files = small_series(tmp_path / f"small-{i}", i)
            specs.append(spec)
            batches.append(files)
        send_all(ports, batches, log)

        # SIGKILL the worker that runs the real-size job, in the middle of it
        wait_for(
            lambda: running(c, real_spec.series_uid),
            300,
            interval=0.3,
            what="the real-size job to run",
        )
        real_job = job_of(c, real_spec.series_uid)
        wait_for(
            lambda: c.db.scalar(
                "SELECT count(*) FROM job_step WHERE job_id = :j AND name = 'convert'",
                j=real_job["id"],
            ),
            300,
            interval=0.3,
            what="the real-size job's conversion",
        )
        victim = wait_for(lambda: worker_running(c, workers, real_job["id"]), 30, what="its worker")
        victim.kill(signal.SIGKILL)
        workers.remove(victim)

        # -- phase 2: SIGKILL the active scheduler; the standby takes over ----------------
        first.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(
            lambda: any(
                a.startswith(f"scheduler@{host}:{standby.pid}:") for a in c.active_schedulers()
            ),
            30,
            interval=0.2,
            what="the standby to become the active scheduler",
        )
        takeover_s = time.monotonic() - killed_at
        more = []
        for i in range(N_FIRST, N_FIRST + 4):
            spec, files = small_series(tmp_path / f"small-{i}", i)
            specs.append(spec)
            more.append(files)
        send_all(ports, more, log)
        n = len(specs)
        wait_for(final(c, n), 900, interval=1.0, what=f"{n} series processed and sent")
        real_job = job_of(c, real_spec.series_uid)
        assert real_job["state"] == "done" and real_job["attempt"] == 2, real_job

        # -- phase 3: the broker drops queued messages ------------------------------------
        for w in workers:
            w.stop(timeout=120)  # warm shutdown: nothing is running now
        c.wait_workers(0)
        dropped = []
        for i in range(N_FIRST + 4, N_FIRST + 8):
            spec, files = small_series(tmp_path / f"small-{i}", i)
            specs.append(spec)
            dropped.append(files)
        send_all(ports, dropped, log)
        n = len(specs)
        wait_for(
            lambda: (
                c.db.scalar(
                    "SELECT count(*) FROM job WHERE state = 'queued' AND published_at IS NOT NULL"
                )
                == 4
                and c.depth() == 4
            ),
            120,
            interval=0.3,
            what="4 jobs published and waiting in the queue",
        )
        if RABBITMQCTL is not None:
            subprocess.run([RABBITMQCTL, "purge_queue", c.queue], check=True, capture_output=True)
        else:  # without rabbitmqctl: a purge through AMQP drops them the same way
            from kombu import Connection

            with Connection(c.settings.cluster.broker_url) as conn:
                conn.channel().queue_purge(c.queue)
        assert c.depth() == 0
        workers = [c.worker(), c.worker(), c.worker()]
        c.wait_workers(3)
        wait_for(final(c, n), 600, interval=1.0, what=f"{n} series processed after the drop")

        # -- phase 4: RabbitMQ restarted while jobs wait in its queue ----------------------
        restarted = []
        if RABBITMQCTL is not None:
            for w in workers:
                w.stop(timeout=120)
            c.wait_workers(0)
            for i in range(N_FIRST + 8, N_FIRST + 10):
                spec, files = small_series(tmp_path / f"small-{i}", i)
                specs.append(spec)
                restarted.append(files)
            send_all(ports, restarted, log)
            n = len(specs)
            wait_for(
                lambda: (
                    c.db.scalar(
                        "SELECT count(*) FROM job "
                        "WHERE state = 'queued' AND published_at IS NOT NULL"
                    )
                    == 2
                ),
                120,
                interval=0.3,
                what="2 jobs published",
            )
            subprocess.run([RABBITMQCTL, "stop_app"], check=True, capture_output=True)
            subprocess.run([RABBITMQCTL, "start_app"], check=True, capture_output=True)
            subprocess.run(
                [RABBITMQCTL, "await_startup"], check=True, capture_output=True, timeout=120
            )
            workers = [c.worker(), c.worker(), c.worker()]
            c.wait_workers(3)
            wait_for(final(c, n), 600, interval=1.0, what=f"{n} series after the restart")

        # -- exactly once -----------------------------------------------------------------
        jobs = c.db.rows(
            "SELECT s.series_uid, count(j.id) AS jobs, max(j.attempt) AS attempts, "
            "max(j.publish_count) AS publishes, min(j.state) AS state "
            "FROM series s JOIN job j ON j.series_id = s.id GROUP BY s.series_uid"
        )
        by_uid = {r["series_uid"]: r for r in jobs}
        assert len(by_uid) == n == N_FIRST + 9 + len(restarted)
        for spec in specs:
            row = by_uid[spec.series_uid]
            assert row["jobs"] == 1, row
            expected_attempts = 2 if spec is real_spec else 1
            assert row["attempts"] == expected_attempts, row
        dropped_uids = {s.series_uid for s in specs[N_FIRST + 5 : N_FIRST + 9]}
        assert all(by_uid[u]["publishes"] >= 2 for u in dropped_uids), [
            by_uid[u] for u in dropped_uids
        ]
        results = c.db.rows(
            "SELECT s.series_uid, r.status, r.predicted_class, count(*) OVER "
            "(PARTITION BY r.series_id) AS per_series FROM result r "
            "JOIN series s ON s.id = r.series_id"
        )
        assert len(results) == n and all(r["per_series"] == 1 for r in results)
        status_of = {r["series_uid"]: r for r in results}
        assert status_of[real_spec.series_uid]["status"] == "scored"
        assert {status_of[s.series_uid]["status"] for s in specs[1:]} == {"not_scored"}

        # the PACS: one SR and one report image per study, nothing else
        objects = c.db.scalar("SELECT count(*) FROM emitted_object")
        assert pacs.count_instances() == objects == 2 * n
        for spec in specs:
            assert len(pacs.find("Instance", StudyInstanceUID=spec.study_uid, Modality="SR")) == 1
        sent = c.db.rows(
            "SELECT object_id, count(*) AS n FROM audit_event a JOIN outbox o "
            "ON a.subject = 'outbox:' || o.id WHERE a.kind = 'dispatch' AND a.outcome = 'sent' "
            "GROUP BY object_id"
        )
        assert len(sent) == objects

        status = json.loads(c.cli("cluster", "status", "--json").stdout)
        assert status["alive"]["worker"] == 3 and status["alive"]["scheduler"] == 1
        assert status["queue"]["messages"] == 0
        print(
            json.dumps(
                {
                    "series": n,
                    "scheduler_takeover_s": round(takeover_s, 1),
                    "seconds": round(time.monotonic() - started, 1),
                    "load_average": os.getloadavg(),
                }
            )
        )
    except BaseException:
        print(c.logs())
        raise
    finally:
        pacs.stop()
