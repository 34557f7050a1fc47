"""Completion latency: how soon after the last instance a series is marked complete.

    python bench/completion.py [--repeats 5] [--instances 160] [--postgres]

DICOM has no end-of-series message (docs/architecture.md, Data flow); ketanode completes a
series when the expected number of instances is known and reached, or when the association
that carried it was released and a short grace passed. This measures both paths with default
settings (grace 1 s, sweep every 0.5 s), on ``ketanode serve`` as a subprocess fed by DCMTK
``storescu`` (one association per series, released at the end):

* ``release_grace``   a generated series WITHOUT Images in Acquisition: only the
                      release + grace path can complete it
* ``expected_count``  the same series WITH Images in Acquisition: complete on arrival of
                      the last instance

Two numbers per run:

* ``db_s``   series.completed_at minus the received_at of the series' last instance
             (both written by the node; the instance row commits just before its 0x0000)
* ``wall_s`` from storescu's exit to the moment a poller (every 10 ms on the database)
             first sees the series leave 'receiving'; negative when the series completed
             before storescu had released the association and exited

Output: one JSON line per run, then one summary line per path with min/median/max and
whether the median meets the goal (under 3 s). Progress goes to stderr. Every process
started here is stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from ketanode.db.session import normalise_url  # noqa: E402
from ketanode.synthetic.phantom import simple_head  # noqa: E402
from ketanode.synthetic.series_writer import SeriesSpec, write_series  # noqa: E402
from tests.support import (  # noqa: E402
    STORESCU,
    NodeProcess,
    dcmtk_env,
    postgres_database,
    wait_for,
)

GOAL_S = 3.0
CASES = {"release_grace": False, "expected_count": True}  # -> images_in_acquisition
EXPECTED_TRIGGER = {"release_grace": "association_released", "expected_count": "expected_count"}


def log(msg: str) -> None:
    print(f"[completion] {msg}", file=sys.stderr, flush=True)


def as_utc(value: Any) -> dt.datetime:
    """Timestamps come back as text on SQLite (naive UTC) and as datetimes on PostgreSQL."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


class StatePoller(threading.Thread):
    """Polls the series row every 10 ms and records when it first leaves 'receiving'."""

    def __init__(self, engine: Any, series_uid: str) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.series_uid = series_uid
        self.seen_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        sql = text("SELECT state FROM series WHERE series_uid = :uid")
        while not self.stop.is_set():
            try:
                with self.engine.connect() as conn:
                    state = conn.execute(sql, {"uid": self.series_uid}).scalar()
            except Exception:  # the tables may not exist yet on the first run
                state = None
            if state is not None and state != "receiving":
                self.seen_at = time.time()
                return
            time.sleep(0.01)


def one_run(
    node: NodeProcess, engine: Any, case: str, volume: np.ndarray, workdir: Path, run: int
) -> dict[str, Any]:
    spec = SeriesSpec(
        patient_name="BENCH^COMPLETION",
        patient_id="BENCH-0002",
        accession_number="BENCH2",
        images_in_acquisition=CASES[case],
    )
    files = write_series(volume, (1.0, 1.0, 1.0), workdir / f"{case}-{run}", spec)
    poller = StatePoller(engine, spec.series_uid)
    poller.start()
    proc = subprocess.run(
        [
            STORESCU,
            "-aet",
            "STORESCU",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            *[str(f) for f in files],
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    exited_at = time.time()
    if proc.returncode != 0:
        poller.stop.set()
        raise RuntimeError(f"storescu exited {proc.returncode}: {proc.stderr[-1000:]}")
    poller.join(120)
    poller.stop.set()
    if poller.seen_at is None:
        raise RuntimeError(f"{case}: series not complete within 120 s")
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT s.id, s.state, s.completion_trigger, s.completed_at, s.n_instances, "
                "(SELECT max(i.received_at) FROM instance i WHERE i.series_id = s.id) AS last_at "
                "FROM series s WHERE s.series_uid = :uid"
            ),
            {"uid": spec.series_uid},
        ).one()
    if row.n_instances != len(files):
        raise RuntimeError(f"{case}: {row.n_instances} instances stored, {len(files)} sent")
    if row.completion_trigger != EXPECTED_TRIGGER[case]:
        raise RuntimeError(
            f"{case}: completed by {row.completion_trigger}, expected {EXPECTED_TRIGGER[case]}"
        )
    db_s = (as_utc(row.completed_at) - as_utc(row.last_at)).total_seconds()
    result = {
        "bench": "completion",
        "path": case,
        "run": run,
        "instances": len(files),
        "trigger": row.completion_trigger,
        "db_s": round(db_s, 3),
        "wall_s": round(poller.seen_at - exited_at, 3),
    }

    # Let the job finish before the next run, so conversion does not slow the next one.
    def settled() -> bool:
        with engine.connect() as conn:
            state = conn.execute(
                text("SELECT state FROM series WHERE id = :id"), {"id": row.id}
            ).scalar()
        return state in ("done", "failed", "ignored")

    wait_for(settled, 120, interval=0.2, what="the job to finish")
    return result


def summary(case: str, runs: list[dict[str, Any]], backend: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bench": "completion",
        "summary": case,
        "database": backend,
        "runs": len(runs),
        "goal_s": GOAL_S,
    }
    for key in ("db_s", "wall_s"):
        values = [r[key] for r in runs]
        out[key] = {
            "min": min(values),
            "median": round(statistics.median(values), 3),
            "max": max(values),
        }
    out["meets_goal"] = max(out["db_s"]["max"], out["wall_s"]["max"]) < GOAL_S
    return out


def bench(
    db_url: str | None, backend: str, repeats: int, n_instances: int, workdir: Path
) -> list[dict[str, Any]]:
    url = db_url or f"sqlite:///{workdir / 'ketanode.db'}"
    # Default settings except ports and paths (NodeProcess's DEBUG logs back to INFO).
    node = NodeProcess(workdir / "node", url, overrides={"logging": {"level": "INFO"}})
    node.start()
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    volume = simple_head((n_instances, 128, 128)) * 1.5
    summaries = []
    try:
        for case in CASES:
            runs = []
            for run in range(repeats):
                result = one_run(node, engine, case, volume, workdir, run)
                result["database"] = backend
                print(json.dumps(result), flush=True)
                runs.append(result)
            summaries.append(summary(case, runs, backend))
    finally:
        engine.dispose()
        code = node.stop()
        if code != 0:
            log(f"node exited with {code}")
    return summaries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--instances", type=int, default=160, help="instances per series (128x128, 1 mm)"
    )
    parser.add_argument(
        "--postgres", action="store_true", help="also run on PostgreSQL at 127.0.0.1:5432"
    )
    args = parser.parse_args()
    summaries = []
    with tempfile.TemporaryDirectory(prefix="ketanode-bench-completion-") as tmp:
        log(f"SQLite: {args.repeats} runs per path, {args.instances} instances per series")
        summaries += bench(None, "sqlite", args.repeats, args.instances, Path(tmp) / "sqlite")
        if args.postgres:
            log("PostgreSQL")
            with postgres_database() as url:
                summaries += bench(
                    url, "postgresql", args.repeats, args.instances, Path(tmp) / "postgresql"
                )
    for line in summaries:
        print(json.dumps(line), flush=True)
    return 0 if all(s["meets_goal"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
