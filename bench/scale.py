"""Cluster mode on this machine: scans per hour with 1, 2 and 3 Celery worker processes,
next to the embedded single-process node, and the queue wait of a live scan while a batch
reprocess waits in the queue (docs/scaling.md).

    python bench/scale.py [--workers 1,2,3] [--scans 4] [--size real|small] [--batch 50]
                          [--no-embedded] [--no-priority]

Each configuration gets a fresh PostgreSQL database (127.0.0.1:5432) and a RabbitMQ queue
of its own (127.0.0.1:5672); the embedded node runs on SQLite with ``pipeline.workers =
1``. Every configuration is sent the same ``--scans`` series by DCMTK ``storescu``, all at
once; throughput is scans / (last job finished - first job created) from the database's
own timestamps. ``--size real``: realistic phantoms at 1.5 mm (measured, scored by the
demonstration model); ``small``: 40 x 64 x 64 phantoms that stop at the header QC (the
fast path that still writes a NOT SCORED report), which measures the machinery rather
than the imaging.

Priority: a cluster receives ``--batch`` small series, which are then marked processed
and queued again as batch work (what ``ketanode reprocess`` does for a new model); one
worker starts on the batch, and one live scan is sent. Printed: the live scan's queue wait
(job started - job created), the batch jobs that started before it (the one running), and
those still queued when it started. Without priority it would wait for the whole batch.

Output: one JSON line per configuration, then a summary line. Progress goes to stderr.
Every process started here is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ketanode.db.jobqueue import enqueue_batch  # noqa: E402
from ketanode.db.session import make_engine, make_session_factory  # noqa: E402
from ketanode.synthetic.demo_model import held_out_cohort  # noqa: E402
from ketanode.synthetic.phantom import make_phantom, simple_head  # noqa: E402
from ketanode.synthetic.series_writer import SeriesSpec, write_series  # noqa: E402
from tests.cluster.conftest import Cluster, delete_queue  # noqa: E402
from tests.e2e.conftest import Db  # noqa: E402
from tests.support import (  # noqa: E402
    STORESCU,
    NodeProcess,
    dcmtk_env,
    postgres_database,
    wait_for,
)

FAST = {"model": {"demo_when_none_active": True}}


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_scans(root: Path, n: int, size: str, offset: int = 0) -> list[list[Path]]:
    out = []
    for i in range(offset, offset + n):
        spec = SeriesSpec(
            patient_id=f"SYN-SCALE-{i:03d}",
            accession_number=f"SC{i:05d}",
            series_description="T1 MPRAGE",
        )
        dest = root / f"{size}-{i}"
        if size == "real":
            group = i % 2
            phantom = make_phantom(held_out_cohort(voxel_mm=1.5).phantom_spec(i, group))
            out.append(phantom.write_dicom(dest, spec))
        else:
            volume = simple_head((40, 64, 64), seed=i) * 1.5
            out.append(write_series(volume, (1.0, 1.0, 1.0), dest, spec))
    return out


def send_all(port: int | list[int], scans: list[list[Path]], at_once: int = 8) -> None:
    """Each series by its own storescu, ``at_once`` at a time (a listener takes 16
    associations at most)."""
    ports = port if isinstance(port, list) else [port]
    for start in range(0, len(scans), at_once):
        procs = [
            subprocess.Popen(
                [STORESCU, "-aet", "STORESCU", "-aec", "KETANODE", "127.0.0.1"]
                + [str(ports[i % len(ports)])]
                + [str(f) for f in files],
                env=dcmtk_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i, files in enumerate(scans[start : start + at_once], start)
        ]
        for p in procs:
            if p.wait(600) != 0:
                raise RuntimeError("storescu failed")


def throughput(db: Db, n: int, timeout: float) -> dict[str, Any]:
    def finished() -> bool:
        return (
            db.has_tables()
            and db.scalar("SELECT count(*) FROM job WHERE state IN ('done', 'failed')") == n
        )

    wait_for(finished, timeout, interval=1.0, what=f"{n} jobs finished")
    row = db.rows(
        "SELECT min(created_at) AS first, max(finished_at) AS last, "
        "sum(CASE WHEN state = 'done' THEN 1 ELSE 0 END) AS done FROM job"
    )[0]
    first, last = row["first"], row["last"]
    if isinstance(first, str):  # SQLite: text
        import datetime as dt

        first, last = dt.datetime.fromisoformat(first), dt.datetime.fromisoformat(last)
    seconds = (last - first).total_seconds()
    return {
        "scans": n,
        "done": int(row["done"]),
        "seconds": round(seconds, 1),
        "scans_per_hour": round(n / seconds * 3600, 1),
    }


def run_cluster(
    root: Path, workers: int, scans: list[list[Path]], timeout: float
) -> dict[str, Any]:
    queue = f"ketanode.bench.{uuid.uuid4().hex[:10]}"
    with postgres_database() as url:
        c = Cluster(root / f"cluster-{workers}", url, queue, FAST)
        try:
            procs = [c.worker() for _ in range(workers)]
            listener = c.listener()
            c.scheduler()
            c.wait_workers(workers)
            assert listener.port is not None
            send_all(listener.port, scans)
            out = throughput(c.db, len(scans), timeout)
            return {"config": f"cluster, {workers} worker process(es)", **out, "pids": len(procs)}
        finally:
            c.stop_all()
            delete_queue(queue)


def run_embedded(root: Path, scans: list[list[Path]], timeout: float) -> dict[str, Any]:
    work = root / "embedded"
    work.mkdir(parents=True, exist_ok=True)
    node = NodeProcess(
        work,
        f"sqlite:///{work / 'ketanode.db'}",
        overrides={"pipeline": {"measure": True, "workers": 1}, **FAST},
    )
    node.write_config()
    node.start(timeout=300)
    db = Db(node.db_url)
    try:
        send_all(node.port, scans)
        out = throughput(db, len(scans), timeout)
        return {"config": "embedded node, pipeline.workers = 1 (SQLite)", **out}
    finally:
        db.close()
        node.stop(timeout=120)


def run_priority(root: Path, batch: int, timeout: float) -> dict[str, Any]:
    queue = f"ketanode.bench.{uuid.uuid4().hex[:10]}"
    with postgres_database() as url:
        c = Cluster(root / "priority", url, queue, FAST)
        try:
            listener = c.listener()
            c.scheduler()
            assert listener.port is not None
            log(f"priority: {batch} small series received (no worker yet)")
            send_all(listener.port, make_scans(root / "prio", batch, "small"))
            wait_for(
                lambda: c.db.scalar("SELECT count(*) FROM job") == batch,
                timeout,
                interval=0.5,
                what=f"{batch} jobs",
            )
            # as if they had been processed (their live jobs out of the way), then queued
            # again as batch work: what `ketanode reprocess` does after a new model
            engine = make_engine(url)
            with engine.begin() as conn:
                conn.exec_driver_sql("UPDATE job SET state = 'superseded'")
                conn.exec_driver_sql("UPDATE series SET state = 'done'")
            ids = [r["id"] for r in c.db.rows("SELECT id FROM series ORDER BY id")]
            created = enqueue_batch(make_session_factory(engine), ids, 3)
            engine.dispose()
            c.worker()
            c.wait_workers(1)
            wait_for(
                lambda: (
                    c.db.scalar(
                        "SELECT count(*) FROM job WHERE lane = 'batch' AND started_at IS NOT NULL"
                    )
                    >= 1
                ),
                timeout,
                what="the batch to start",
            )
            log(f"priority: {len(created)} batch jobs queued, one running; a live scan sent")
            send_all(listener.port, make_scans(root / "prio-live", 1, "small", offset=900))

            def live_started() -> bool:
                n = c.db.scalar(
                    "SELECT count(*) FROM job WHERE lane = 'live' AND started_at IS NOT NULL "
                    "AND id > :m",
                    m=max(created),
                )
                return bool(n == 1)

            wait_for(live_started, timeout, interval=0.5, what="the live scan to start")
            (live,) = c.db.rows(
                "SELECT id, created_at, started_at FROM job WHERE lane = 'live' AND id > :m",
                m=max(created),
            )
            before = c.db.scalar(
                "SELECT count(*) FROM job WHERE lane = 'batch' AND started_at IS NOT NULL "
                "AND started_at < :t",
                t=live["started_at"],
            )
            left = c.db.scalar("SELECT count(*) FROM job WHERE lane = 'batch' AND state = 'queued'")
            steps = c.db.rows(
                "SELECT avg(extract(epoch FROM finished_at - started_at)) AS s FROM job "
                "WHERE lane = 'batch' AND finished_at IS NOT NULL"
            )
            mean = steps[0]["s"]
            return {
                "config": "priority: 1 worker, a batch reprocess queued, then a live scan",
                "batch_jobs": len(created),
                "live_queue_wait_s": round(
                    (live["started_at"] - live["created_at"]).total_seconds(), 1
                ),
                "batch_jobs_started_before_the_live_scan": before,
                "batch_jobs_still_queued_when_it_started": left,
                "batch_job_mean_s": None if mean is None else round(float(mean), 1),
            }
        finally:
            c.stop_all()
            delete_queue(queue)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,3")
    ap.add_argument("--scans", type=int, default=4)
    ap.add_argument("--size", choices=("real", "small"), default="real")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--no-embedded", action="store_true")
    ap.add_argument("--no-priority", action="store_true")
    args = ap.parse_args()
    started = time.monotonic()
    lines = []
    with tempfile.TemporaryDirectory(prefix="ketanode-scale-") as tmp:
        root = Path(tmp)
        log(f"writing {args.scans} {args.size} series")
        scans = make_scans(root / "scans", args.scans, args.size)
        if not args.no_embedded:
            log("embedded node")
            lines.append(run_embedded(root, scans, args.timeout))
            print(json.dumps({**lines[-1], "load_average": os.getloadavg()}), flush=True)
        for n in [int(x) for x in args.workers.split(",") if x]:
            log(f"cluster with {n} worker process(es)")
            lines.append(run_cluster(root, n, scans, args.timeout))
            print(json.dumps({**lines[-1], "load_average": os.getloadavg()}), flush=True)
        if not args.no_priority:
            lines.append(run_priority(root, args.batch, args.timeout))
            print(json.dumps({**lines[-1], "load_average": os.getloadavg()}), flush=True)
    print(
        json.dumps(
            {
                "summary": {
                    d["config"]: d.get("scans_per_hour", d.get("live_queue_wait_s")) for d in lines
                },
                "size": args.size,
                "cpus": os.cpu_count(),
                "seconds": round(time.monotonic() - started, 1),
                "load_average": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
