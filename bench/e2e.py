"""End to end: from the last instance acknowledged to the SR stored in the PACS.

    python bench/e2e.py [--voxel 1.0] [--repeats 1] [--postgres] [--workers 1]

A phantom series (1 mm: 176 x 240 x 256, 176 slices) is sent by DCMTK ``storescu``
(TCP_NODELAY=1) to ``ketanode serve`` (defaults but ports and paths, one destination:
Orthanc). The clock starts when storescu exits (every instance acknowledged) and stops when
Orthanc's REST API first lists the SR in the study (polled every 50 ms). One JSON line per
run: the total, and where the time went: series completion (last instance -> completed),
queue wait, each pipeline step (from the job's step rows), dispatch (result written -> sent),
and the PACS index (sent -> listed).

The peer in the same run: the same series sent by storescu to Orthanc directly (what a
scanner-to-PACS store of this series costs here) next to storescu to the node. Goal
(issue 5): <= 45 s on 2 cores. Every process started here is stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from ketanode.db.session import normalise_url  # noqa: E402
from ketanode.synthetic.phantom import PhantomSpec, make_phantom  # noqa: E402
from ketanode.synthetic.series_writer import SeriesSpec  # noqa: E402
from tests.peers import Orthanc  # noqa: E402
from tests.support import NodeProcess, postgres_database, storescu, wait_for  # noqa: E402


def _ts(value: Any) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _sr_in(pacs: Orthanc, study_uid: str) -> bool:
    return bool(pacs.find("Instance", StudyInstanceUID=study_uid, Modality="SR"))


def run_once(
    files: list[Path], study_uid: str, work: Path, db_url: str, workers: int
) -> dict[str, Any]:
    # the peer: the same series, storescu -> Orthanc
    peer = Orthanc(work / "orthanc-peer", node_port=1)
    peer.start()
    try:
        t = time.perf_counter()
        storescu(peer.dicom_port, files, called_ae=peer.aet, calling_ae="KETANODE")
        peer_store_s = time.perf_counter() - t
    finally:
        peer.stop()

    pacs = Orthanc(work / "orthanc")
    node = NodeProcess(work / "node", db_url)
    pacs.node_port = node.port
    node.overrides = {
        "pipeline": {"measure": True, "workers": workers},
        "destinations": [  # type: ignore[dict-item]
            {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
        "dispatch": {"interval_seconds": 1.0},
        "logging": {"level": "INFO"},
    }
    pacs.start()
    node.start()
    try:
        t0 = time.perf_counter()
        storescu(node.port, files)
        acked = time.perf_counter()
        acked_wall = dt.datetime.now(dt.UTC)
        wait_for(lambda: _sr_in(pacs, study_uid), 600, interval=0.05, what="the SR in Orthanc")
        listed = time.perf_counter()
        listed_wall = dt.datetime.now(dt.UTC)
    finally:
        node.stop()
        pacs.stop()

    engine = create_engine(normalise_url(db_url), poolclass=NullPool)
    with engine.connect() as conn:
        series = (
            conn.execute(text("SELECT completed_at, last_received_at FROM series")).one()._mapping
        )
        job = conn.execute(text("SELECT id, created_at, started_at FROM job")).one()._mapping
        steps = {
            r.name: round(float(r.seconds), 2)
            for r in conn.execute(
                text("SELECT name, seconds FROM job_step WHERE job_id = :j ORDER BY id"),
                {"j": job["id"]},
            )
        }
        result = conn.execute(text("SELECT id, created_at, status FROM result")).one()._mapping
        sent = conn.execute(
            text(
                "SELECT max(o.sent_at) FROM outbox o JOIN emitted_object e "
                "ON e.id = o.object_id WHERE e.kind = 'sr'"
            )
        ).scalar()
    engine.dispose()
    completed, started = _ts(series["completed_at"]), _ts(job["started_at"])
    written, sent_at = _ts(result["created_at"]), _ts(sent)
    return {
        "bench": "e2e",
        "instances": len(files),
        "store_to_node_s": round(acked - t0, 2),
        "store_to_orthanc_peer_s": round(peer_store_s, 2),
        "ack_to_sr_in_pacs_s": round(listed - acked, 2),
        "where": {
            "completion_s": round((completed - acked_wall).total_seconds(), 2),
            "queue_s": round((started - completed).total_seconds(), 2),
            "steps_s": steps,
            "steps_total_s": round(sum(steps.values()), 2),
            "dispatch_s": round((sent_at - written).total_seconds(), 2),
            "pacs_index_s": round((listed_wall - sent_at).total_seconds(), 2),
        },
        "result_status": result["status"],
        "goal_s": 45,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--voxel", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1000, help="phantom seed (bench/pipeline.py: 1000)")
    ap.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    args = ap.parse_args()
    lines = []
    with tempfile.TemporaryDirectory(prefix="ketanode-bench-e2e-") as tmp:
        root = Path(tmp)
        spec = SeriesSpec(series_description="T1 MPRAGE")
        v = args.voxel
        files = make_phantom(PhantomSpec(seed=args.seed, voxel_mm=(v, v, v))).write_dicom(
            root / "dicom", spec
        )
        for n in range(args.repeats):
            work = root / f"run-{n}"
            if args.postgres:
                with postgres_database() as url:
                    line = run_once(files, spec.study_uid, work, url, args.workers)
            else:
                url = f"sqlite:///{work / 'ketanode.db'}"
                line = run_once(files, spec.study_uid, work, url, args.workers)
            line |= {
                "voxel_mm": v,
                "seed": args.seed,
                "database": "postgresql" if args.postgres else "sqlite",
            }
            print(json.dumps(line), flush=True)
            lines.append(line)
    if len(lines) > 1:
        print(
            json.dumps(
                {
                    "bench": "e2e",
                    "summary": True,
                    "runs": len(lines),
                    "median_ack_to_sr_in_pacs_s": statistics.median(
                        x["ack_to_sr_in_pacs_s"] for x in lines
                    ),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
