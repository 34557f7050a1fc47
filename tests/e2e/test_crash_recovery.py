"""Crashes and stops of ``ketanode serve`` (docs/architecture.md, rules that protect data).

* SIGKILL while a series is being received: everything storescu saw acknowledged is
  durable (row + file + intact pixels), the open association is recorded as aborted, no
  partial files remain, the half series is not processed on its own, and resending the
  series completes it exactly once.
* The same with four associations storing at once (rows committed together): nothing
  any of them saw acknowledged is lost, no row points at a missing or partial file.
* SIGKILL while the worker converts: the recovery sweep re-queues the job and attempt 2
  finishes it.
* SIGTERM and SIGINT stop the node cleanly (exit 0, "stopped" in the log), also in the
  middle of an association.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import nibabel as nib
import pytest

from ketanode.roots import Root
from tests.e2e.conftest import (
    Db,
    StoreSCUProcess,
    cli_json,
    ge_files,
    generated_series,
    kill_while_four_associations_store,
    part_files,
    pixel_sha256,
    sha256_file,
    sop_uid,
    spool_files,
    start_storescu,
    wait_series_final,
)
from tests.support import ECHOSCU, NodeProcess, dcmtk_env, storescu, wait_for

N_INSTANCES = 300
KILL_AFTER_ACKS = 100


@pytest.fixture(scope="module")
def big_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """300 single-frame MR instances (one 3D T1 series, Images in Acquisition = 300)."""
    return generated_series(tmp_path_factory.mktemp("big-series"), N_INSTANCES, size=128)


def instance_rows(db: Db) -> list[dict[str, object]]:
    return db.rows(
        "SELECT id, sop_instance_uid, spool_path, sha256, association_id, series_id "
        "FROM instance ORDER BY id"
    )


def spooled_file(spool: Path, row: dict[str, object]) -> Path:
    """The file of an instance row: its stored path under the spool (ketanode/roots.py)."""
    return Root.at(spool).resolve(str(row["spool_path"]))


def assert_intact(
    rows_by_uid: dict[str, dict[str, object]], sources: list[Path], spool: Path
) -> None:
    """Each source has its row; the spool file (the row's path under the spool) hashes to
    the row's sha256 and holds the same pixel data as the source."""
    for src in sources:
        uid = sop_uid(src)
        assert uid in rows_by_uid, f"acknowledged instance {src.name} has no row"
        row = rows_by_uid[uid]
        spooled = spooled_file(spool, row)
        assert spooled.is_file(), f"acknowledged instance {src.name}: spool file missing"
        assert row["sha256"] == sha256_file(spooled), f"{src.name}: sha256 differs from file"
        assert pixel_sha256(spooled) == pixel_sha256(src), f"{src.name}: pixel data differ"


def test_sigkill_while_receiving_then_resend(
    db_url: str,
    db_reader: Db,
    tmp_path: Path,
    node_process: list[NodeProcess],
    storescu_processes: list[StoreSCUProcess],
    big_series: list[Path],
) -> None:
    node = NodeProcess(tmp_path / "node", db_url)
    node_process.append(node)
    node.start()

    scu = start_storescu(node.port, big_series, tmp_path / "storescu-1.log")
    storescu_processes.append(scu)
    wait_for(
        lambda: len(scu.acknowledged()) >= KILL_AFTER_ACKS,
        60,
        interval=0.01,
        what=f"{KILL_AFTER_ACKS} acknowledged C-STOREs",
    )
    node.kill()
    assert scu.wait(30) != 0, "storescu should fail when the node dies"
    transcript = scu.transcript()
    assert "Store Failed" in transcript, transcript[-2000:]
    acked = scu.acknowledged()
    assert KILL_AFTER_ACKS <= len(acked) < N_INSTANCES, len(acked)
    assert acked == big_series[: len(acked)]  # storescu sends in order, one at a time

    # The dead node left its association open; what it acknowledged is durable already.
    assocs = db_reader.rows("SELECT id, outcome, ended_at FROM association ORDER BY id")
    assert len(assocs) == 1 and assocs[0]["outcome"] == "open" and assocs[0]["ended_at"] is None
    first_assoc = assocs[0]["id"]
    rows = instance_rows(db_reader)
    assert_intact({str(r["sop_instance_uid"]): r for r in rows}, acked, node.spool)
    n_before = len(rows)
    assert len(acked) <= n_before <= len(acked) + 1  # at most the one in flight

    # -- restart on the same config: the recovery sweep runs before the listener opens ---
    node.start()
    assoc = cli_json(node, "associations")
    assert len(assoc) == 1, assoc
    assert assoc[0]["outcome"] == "aborted", assoc[0]
    assert "node stopped" in (assoc[0]["reason"] or ""), assoc[0]
    assert assoc[0]["stored"] == n_before
    assert part_files(node) == [], "partial files left in the spool after recovery"
    rows = instance_rows(db_reader)
    assert_intact({str(r["sop_instance_uid"]): r for r in rows}, acked, node.spool)

    # The association that carried the series was aborted, not released: the half series
    # must not be completed (and processed) on its own while the sender retries.
    time.sleep(2.5)  # well past the 1 s grace and several completion sweeps
    half = db_reader.rows("SELECT state, n_instances, completed_at FROM series")
    assert len(half) == 1 and half[0]["state"] == "receiving", half
    assert half[0]["completed_at"] is None
    assert db_reader.scalar("SELECT count(*) FROM job") == 0

    # -- the sender retries the whole series --------------------------------------------
    storescu(node.port, big_series)
    series = wait_series_final(node, db_reader, 1, timeout=60)
    assert len(series) == 1, series
    s = series[0]
    assert (s["state"], s["n_instances"], s["generation"]) == ("done", N_INSTANCES, 1), s
    assert s["completion_trigger"] == "expected_count", s

    rows = instance_rows(db_reader)
    by_uid = {str(r["sop_instance_uid"]): r for r in rows}
    assert len(rows) == len(by_uid) == N_INSTANCES, "duplicate or missing instance rows"
    assert_intact(by_uid, big_series, node.spool)
    # What was acknowledged before the crash is the copy that was kept.
    for src in acked:
        assert by_uid[sop_uid(src)]["association_id"] == first_assoc
    # Every spool file has its row (the orphan of the C-STORE in flight was replaced).
    assert {str(p) for p in spool_files(node)} == {str(spooled_file(node.spool, r)) for r in rows}
    assert part_files(node) == []

    jobs = cli_json(node, "jobs", "list")
    assert len(jobs) == 1, jobs
    job = jobs[0]
    assert (job["state"], job["attempt"]) == ("done", 1), job
    assert job["steps"][0]["detail"]["n_files"] == N_INSTANCES
    assert sorted(job["steps"][0]["detail"]["shape"]) == [128, 128, N_INSTANCES]
    assert db_reader.scalar("SELECT count(*) FROM job WHERE state IN ('running', 'queued')") == 0

    assoc = cli_json(node, "associations")
    assert [a["outcome"] for a in assoc] == ["released", "aborted"], assoc
    assert assoc[0]["stored"] == N_INSTANCES - n_before
    assert assoc[0]["duplicates"] == n_before
    assert node.stop() == 0


def test_sigkill_while_four_associations_store(
    db_url: str,
    db_reader: Db,
    tmp_path: Path,
    node_process: list[NodeProcess],
    storescu_processes: list[StoreSCUProcess],
    big_series: list[Path],
) -> None:
    """Four associations at once (their rows committed together, GroupCommit): SIGKILL
    loses none of what any of them saw acknowledged, and each instance's row and file
    agree; a resend of everything completes the series exactly once."""
    node = NodeProcess(tmp_path / "node", db_url)
    node_process.append(node)
    node.start()
    acked = kill_while_four_associations_store(
        node, big_series, tmp_path, storescu_processes, KILL_AFTER_ACKS
    )

    rows = instance_rows(db_reader)
    by_uid = {str(r["sop_instance_uid"]): r for r in rows}
    assert_intact(by_uid, acked, node.spool)
    assert len(acked) <= len(rows) <= len(acked) + 4  # at most one in flight per association
    for row in rows:  # a row never points at a missing or partial file
        assert sha256_file(spooled_file(node.spool, row)) == row["sha256"], row

    node.start()
    assert part_files(node) == []
    storescu(node.port, big_series)
    series = wait_series_final(node, db_reader, 1, timeout=120)
    assert len(series) == 1 and series[0]["n_instances"] == N_INSTANCES, series
    rows = instance_rows(db_reader)
    by_uid = {str(r["sop_instance_uid"]): r for r in rows}
    assert len(rows) == len(by_uid) == N_INSTANCES, "duplicate or missing instance rows"
    assert_intact(by_uid, big_series, node.spool)
    assert {str(p) for p in spool_files(node)} == {str(spooled_file(node.spool, r)) for r in rows}
    assert node.stop() == 0


def test_sigkill_during_conversion_is_recovered(
    db_url: str, db_reader: Db, tmp_path: Path, node_process: list[NodeProcess]
) -> None:
    node = NodeProcess(tmp_path / "node", db_url)
    node_process.append(node)
    node.start()
    storescu(node.port, ge_files())

    def running() -> bool:
        return bool(
            db_reader.has_tables()
            and db_reader.scalar("SELECT count(*) FROM job WHERE state = 'running'")
        )

    wait_for(running, 30, interval=0.05, what="the job to run")
    time.sleep(0.5)  # inside the conversion (it takes seconds on this series)
    node.kill()
    time.sleep(1.5)  # the job's process must die with the node, not finish its step

    job = db_reader.rows("SELECT id, state, attempt, lease_owner FROM job")
    assert len(job) == 1, job
    assert (job[0]["state"], job[0]["attempt"]) == ("running", 1), job
    assert job[0]["lease_owner"]
    assert db_reader.scalar("SELECT state FROM series") == "processing"
    assert db_reader.scalar("SELECT count(*) FROM job_step") == 0, "killed after the step ended"

    node.start()
    series = wait_series_final(node, db_reader, 1, timeout=60)
    assert series[0]["state"] == "done", series
    jobs = cli_json(node, "jobs", "list")
    assert len(jobs) == 1, jobs
    done = jobs[0]
    assert (done["id"], done["state"], done["attempt"]) == (job[0]["id"], "done", 2), done
    assert [(s["name"], s["attempt"], s["ok"]) for s in done["steps"]] == [("convert", 2, True)]
    nifti_path = Path(done["steps"][0]["detail"]["path"])
    assert nib.load(nifti_path).shape == (256, 256, 130)
    # The attempt that died left nothing behind in the job's work directory.
    assert [p.name for p in nifti_path.parent.iterdir()] == ["t1.nii.gz"]
    assert db_reader.scalar("SELECT count(*) FROM job WHERE state IN ('running', 'queued')") == 0
    log = node.log_text()
    assert f"job {job[0]['id']} recovered (queued)" in log
    assert "1 jobs re-queued or failed" in log
    assert node.stop() == 0


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_idle_node_cleanly(
    signum: int, sqlite_url: str, tmp_path: Path, node_process: list[NodeProcess]
) -> None:
    node = NodeProcess(tmp_path / "node", sqlite_url)
    node_process.append(node)
    node.start()
    echo = subprocess.run(
        [ECHOSCU, "-aet", "STORESCU", "-aec", "KETANODE", "127.0.0.1", str(node.port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr
    assert node.proc is not None
    started = time.monotonic()
    node.proc.send_signal(signum)
    rc = node.proc.wait(15)
    took = time.monotonic() - started
    assert rc == 0, node.log_text()[-2000:]
    assert took < 5, f"stopping took {took:.1f} s"
    log = node.log_text()
    assert log.rstrip().endswith("ketanode.node: stopped"), log[-1000:]
    assert "Traceback" not in log
    assert not port_open(node.port)


def test_sigterm_during_an_association(
    sqlite_url: str,
    tmp_path: Path,
    node_process: list[NodeProcess],
    storescu_processes: list[StoreSCUProcess],
    big_series: list[Path],
) -> None:
    node = NodeProcess(tmp_path / "node", sqlite_url)
    node_process.append(node)
    node.start()
    scu = start_storescu(node.port, big_series, tmp_path / "storescu.log")
    storescu_processes.append(scu)
    wait_for(lambda: len(scu.acknowledged()) >= 50, 60, interval=0.01, what="50 acknowledgements")
    assert node.proc is not None
    started = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    rc = node.proc.wait(15)
    took = time.monotonic() - started
    scu.wait(30)
    assert rc == 0, node.log_text()[-2000:]
    assert took < 10, f"stopping took {took:.1f} s"
    log = node.log_text()
    assert log.rstrip().endswith("ketanode.node: stopped"), log[-1000:]
    assert "Traceback" not in log

    db = Db(sqlite_url)
    try:
        acked = scu.acknowledged()
        assert 50 <= len(acked) < N_INSTANCES
        rows = instance_rows(db)
        assert_intact({str(r["sop_instance_uid"]): r for r in rows}, acked, node.spool)
        assoc = db.rows("SELECT outcome, ended_at FROM association")
        # A clean stop records the end of the association it cut (no recovery needed).
        assert len(assoc) == 1 and assoc[0]["outcome"] == "aborted", assoc
        assert assoc[0]["ended_at"] is not None
    finally:
        db.close()
    assert part_files(node) == []
