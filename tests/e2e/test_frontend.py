"""The native front end (``node.receiver = "dcmtk"``, ketanode-scp) with ``ketanode serve``.

* A series sent by DCMTK storescu is answered by the front end and indexed by the node:
  one row per instance, the spool file byte for byte what was sent, nothing left in the
  front end's directory, the association recorded (released, with its count), the series
  completed and converted once.
* A dataset the node's checks refuse is still acknowledged (the front end answers once the
  file is durable), and its refusal is recorded with the dataset kept: nothing is lost.
* SIGKILL of the node while four associations store: the front end dies with it; every
  instance any sender saw acknowledged has its row after the restart (indexed from the
  front end's durable files), and a resend completes the series exactly once.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.e2e.conftest import (
    Db,
    StoreSCUProcess,
    cli_json,
    generated_series,
    kill_while_four_associations_store,
    part_files,
    sha256_file,
    spool_files,
    wait_series_final,
)
from tests.e2e.test_crash_recovery import assert_intact, instance_rows, spooled_file
from tests.realhead import uih_files
from tests.support import NodeProcess, storescu, wait_for

N_INSTANCES = 200
KILL_AFTER_ACKS = 60
DCMTK = {"node": {"receiver": "dcmtk"}}


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generated_series(tmp_path_factory.mktemp("fe-series"), N_INSTANCES, size=96)


def incoming_files(node: NodeProcess) -> list[Path]:
    """What the front end wrote and the node has not indexed (its listener's directory)."""
    return sorted(p for p in (node.spool / "incoming").glob("*/*") if p.is_file())


def test_series_through_the_front_end(
    db_url: str, db_reader: Db, tmp_path: Path, node_process: list[NodeProcess], series: list[Path]
) -> None:
    node = NodeProcess(tmp_path / "node", db_url, overrides=DCMTK)
    node_process.append(node)
    node.start()
    assert "native front end ketanode-scp" in node.log_text()

    storescu(node.port, series)
    done = wait_series_final(node, db_reader, 1, timeout=120)
    assert len(done) == 1 and done[0]["state"] == "done", done
    assert done[0]["n_instances"] == N_INSTANCES

    rows = instance_rows(db_reader)
    by_uid = {str(r["sop_instance_uid"]): r for r in rows}
    assert len(rows) == len(by_uid) == N_INSTANCES
    assert_intact(by_uid, series, node.spool)
    for src in series[:5]:  # the dataset as sent, byte for byte after the file meta
        sent = pydicom.dcmread(src)
        kept = pydicom.dcmread(spooled_file(node.spool, by_uid[str(sent.SOPInstanceUID)]))
        assert kept.PixelData == sent.PixelData and kept.PatientID == sent.PatientID
    assert incoming_files(node) == [], "front end files left after indexing"
    assert {str(p) for p in spool_files(node)} == {str(spooled_file(node.spool, r)) for r in rows}

    wait_for(lambda: cli_json(node, "associations")[0]["outcome"] == "released", 30, what="the end")
    assoc = cli_json(node, "associations")
    assert len(assoc) == 1 and assoc[0]["stored"] == N_INSTANCES, assoc
    assert assoc[0]["calling_ae"] == "STORESCU", assoc
    jobs = cli_json(node, "jobs", "list")
    assert [(j["state"], j["attempt"]) for j in jobs] == [("done", 1)], jobs
    assert node.stop() == 0


def test_refused_after_the_answer_is_recorded_and_kept(
    db_url: str, db_reader: Db, tmp_path: Path, node_process: list[NodeProcess], series: list[Path]
) -> None:
    """Rows 0 is refused by the node's checks; the front end has answered success already
    (the file was durable): the refusal is stored with the dataset, nothing is lost."""
    bad = pydicom.dcmread(series[0])
    bad.Rows = 0
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "rows0.dcm"
    bad.save_as(path, enforce_file_format=True)

    node = NodeProcess(tmp_path / "node", db_url, overrides=DCMTK)
    node_process.append(node)
    node.start()
    storescu(node.port, [path])  # acknowledged: check=True raises otherwise

    wait_for(lambda: db_reader.scalar("SELECT count(*) FROM store_failure") == 1, 30)
    failure = db_reader.rows("SELECT status, reason, quarantine_path FROM store_failure")[0]
    assert failure["status"] == 0xA900, failure
    assert "invalid Rows" in failure["reason"], failure
    assert "after the front end had answered success" in failure["reason"], failure
    kept = node.spool / str(failure["quarantine_path"])
    assert kept.is_file() and pydicom.dcmread(kept).SOPInstanceUID == bad.SOPInstanceUID
    assert db_reader.scalar("SELECT count(*) FROM instance") == 0
    wait_for(lambda: incoming_files(node) == [], 10, what="the front end's file removed")
    assert node.stop() == 0


def test_sigkill_while_four_associations_store_through_the_front_end(
    db_url: str,
    db_reader: Db,
    tmp_path: Path,
    node_process: list[NodeProcess],
    storescu_processes: list[StoreSCUProcess],
    series: list[Path],
) -> None:
    node = NodeProcess(tmp_path / "node", db_url, overrides=DCMTK)
    node_process.append(node)
    node.start()
    acked = kill_while_four_associations_store(
        node, series, tmp_path, storescu_processes, KILL_AFTER_ACKS
    )  # the front end dies with it (PR_SET_PDEATHSIG)

    # Every row there is agrees with its file; what is acknowledged but has no row yet is a
    # durable file in the front end's directory.
    rows = instance_rows(db_reader)
    for row in rows:
        assert sha256_file(spooled_file(node.spool, row)) == row["sha256"], row
    waiting = {
        pydicom.dcmread(p).SOPInstanceUID for p in incoming_files(node) if p.suffix == ".dcm"
    }
    indexed = {str(r["sop_instance_uid"]) for r in rows}
    for src in acked:
        uid = pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID
        assert uid in indexed or uid in waiting, f"acknowledged {src.name} is nowhere"

    node.start()  # indexes what the last run left
    wait_for(
        lambda: db_reader.scalar("SELECT count(*) FROM instance") >= len(acked),
        60,
        what="the files left by the killed node indexed",
    )
    rows = instance_rows(db_reader)
    assert_intact({str(r["sop_instance_uid"]): r for r in rows}, acked, node.spool)
    assert part_files(node) == []

    storescu(node.port, series)
    done = wait_series_final(node, db_reader, 1, timeout=120)
    assert len(done) == 1 and done[0]["n_instances"] == N_INSTANCES, done
    rows = instance_rows(db_reader)
    by_uid = {str(r["sop_instance_uid"]): r for r in rows}
    assert len(rows) == len(by_uid) == N_INSTANCES, "duplicate or missing instance rows"
    assert_intact(by_uid, series, node.spool)
    assert incoming_files(node) == []
    assert {str(p) for p in spool_files(node)} == {str(spooled_file(node.spool, r)) for r in rows}
    assert node.stop() == 0


def test_the_real_head_through_the_front_end(
    sqlite_url: str, tmp_path: Path, node_process: list[NodeProcess]
) -> None:
    """The UIH head of ../shared through the native front end: every instance indexed,
    nothing refused, the series selected as a structural 3D T1 and converted."""
    files = uih_files()
    node = NodeProcess(tmp_path / "node", sqlite_url, overrides=DCMTK)
    node_process.append(node)
    node.start()
    storescu(node.port, files)
    db = Db(sqlite_url)
    try:
        done = wait_series_final(node, db, 1, timeout=300)
        assert len(done) == 1 and done[0]["state"] == "done", done
        assert done[0]["n_instances"] == len(files) == 160
        assert db.scalar("SELECT count(*) FROM store_failure") == 0
        jobs = cli_json(node, "jobs", "list")
        assert [j["state"] for j in jobs] == ["done"], jobs
        shape = jobs[0]["steps"][0]["detail"]["shape"]
        assert len(shape) == 3 and 160 in shape, shape  # 160 sagittal slices
    finally:
        db.close()
    assert incoming_files(node) == []
    assert node.stop() == 0


def _front_end_pids(node: NodeProcess) -> list[int]:
    """The node's ketanode-scp children (from /proc: their parent is the node)."""
    assert node.proc is not None
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            name = fields[0].split("(", 1)[1]
            ppid = int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if name == "ketanode-scp" and ppid == node.proc.pid:
            pids.append(int(stat.parent.name))
    return pids


def test_a_front_end_that_dies_is_started_again(
    db_url: str, db_reader: Db, tmp_path: Path, node_process: list[NodeProcess], series: list[Path]
) -> None:
    """SIGKILL of the front end alone: the node logs it, starts it again on the same port,
    and what either run acknowledged is indexed."""
    import os
    import signal

    node = NodeProcess(tmp_path / "node", db_url, overrides=DCMTK)
    node_process.append(node)
    node.start()
    storescu(node.port, series[:50])
    (first,) = _front_end_pids(node)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: "starting it again" in node.log_text(), 30, what="the restart logged")
    wait_for(lambda: len(_front_end_pids(node)) == 1 and _front_end_pids(node) != [first], 30)
    wait_for(lambda: node._listening(), 30, what="the port open again")
    storescu(node.port, series[50:])
    done = wait_series_final(node, db_reader, 1, timeout=120)
    assert len(done) == 1 and done[0]["n_instances"] == N_INSTANCES, done
    assert db_reader.scalar("SELECT count(*) FROM instance") == N_INSTANCES
    assert incoming_files(node) == []
    assert node.stop() == 0
    assert _front_end_pids(node) == []
