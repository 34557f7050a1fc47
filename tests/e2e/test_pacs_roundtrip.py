"""The whole path with real peers: DCMTK storescu (the scanner) sends the real GE series and a
phantom to ``ketanode serve``; the node measures, predicts or refuses, writes an SR and a
report image per series, and sends them to Orthanc (the PACS), in the source study.

The PACS is down while the node works: the outbox rows retry. The node is then SIGKILLed
between writing the objects and sending them; the PACS comes up and the node is restarted:
each object arrives exactly once. What Orthanc holds passes dciodvfy, parses with dsrdump,
and says what the database's result row says.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from ketanode.report.sr import read_sr
from ketanode.synthetic.demo_model import held_out_cohort
from ketanode.synthetic.phantom import make_phantom
from ketanode.synthetic.series_writer import SeriesSpec
from tests.e2e.conftest import Db, ge_files, wait_series_final
from tests.peers import Orthanc
from tests.support import NodeProcess, storescu, wait_for
from tests.unit._report_case import DSRDUMP, dciodvfy

RESULTS_SQL = """
SELECT r.id, r.status, r.predicted_class, r.probability, r.decision_value, r.model_sha256,
       r.volumes, r.reason, s.series_uid
FROM result r JOIN series s ON s.id = r.series_id
"""


def _node(tmp_path: Path, db_url: str, pacs: Orthanc, port: int) -> NodeProcess:
    return NodeProcess(
        tmp_path / "node",
        db_url,
        port=port,
        overrides={
            "pipeline": {"measure": True, "workers": 2},
            "model": {"demo_when_none_active": True},  # scored by the demonstration model
            "destinations": [  # type: ignore[dict-item]
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}
            ],
            "dispatch": {
                "interval_seconds": 0.5,
                "backoff_initial_seconds": 1.0,
                "backoff_max_seconds": 2.0,
                "max_attempts": 1000,
            },
        },
    )


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_results_reach_the_pacs_once_through_outage_and_sigkill(
    tmp_path: Path, db_url: str, db_reader: Db, node_process: list[NodeProcess]
) -> None:
    pacs = Orthanc(tmp_path / "orthanc")
    node = _node(tmp_path, db_url, pacs, pacs.node_port)
    pacs.node_port = node.port
    node_process.append(node)
    node.start()
    try:
        # -- the scanner sends: the GE series (not a head: refused by QC) and a phantom ----
        spec = held_out_cohort(voxel_mm=1.5).phantom_spec(2, 1)  # a responder-like subject
        series = SeriesSpec(patient_id="SYN-RT-1", series_description="T1 MPRAGE")
        phantom_files = make_phantom(spec).write_dicom(tmp_path / "phantom", series)
        storescu(node.port, ge_files())
        storescu(node.port, phantom_files)
        wait_series_final(node, db_reader, 2, timeout=600)

        # -- the PACS is down: every object is written, its outbox row retries ------------
        def retried() -> bool:
            rows = db_reader.rows("SELECT state, attempts FROM outbox")
            return len(rows) == 4 and all(
                r["state"] == "retrying" and r["attempts"] >= 2 for r in rows
            )

        wait_for(retried, 60, interval=0.2, what="4 outbox rows retrying")
        errors = {r["last_error"] for r in db_reader.rows("SELECT last_error FROM outbox")}
        assert all("peer unreachable" in e for e in errors), errors

        # -- SIGKILL between writing the objects and sending them; PACS up; restart -------
        node.kill()
        pacs.start()
        node.proc = None
        node.start()
        wait_for(
            lambda: {r["state"] for r in db_reader.rows("SELECT state FROM outbox")} == {"sent"},
            60,
            interval=0.2,
            what="every outbox row sent after the restart",
        )
        results = db_reader.rows(RESULTS_SQL)
        assert len(results) == 2, results
        by_series = {r["series_uid"]: r for r in results}
        ge_uid = str(pydicom.dcmread(ge_files()[0], stop_before_pixels=True).SeriesInstanceUID)
        assert by_series[ge_uid]["status"] == "not_scored"
        # the GE series is a geometric test object, not a head (see its README): the node
        # fails it at qc_registration, before segmentation, says why, and reports that
        (ge_job,) = db_reader.rows(
            "SELECT j.id, j.state, j.failed_step, j.error, s.state AS series_state, s.reason "
            "FROM job j JOIN series s ON s.id = j.series_id WHERE s.series_uid = :u",
            u=ge_uid,
        )
        assert (ge_job["state"], ge_job["failed_step"]) == ("failed", "qc_registration")
        assert ge_job["error"].startswith("QC failed: registration = "), ge_job["error"]
        assert ge_job["series_state"] == "failed" and "registration = " in ge_job["reason"]
        steps = db_reader.rows(
            "SELECT name FROM job_step WHERE job_id = :j ORDER BY id", j=ge_job["id"]
        )
        assert [r["name"] for r in steps] == [
            "convert",
            "qc_input",
            "preprocess",
            "qc_registration",
            "report",
        ]
        assert by_series[ge_uid]["reason"] == ge_job["error"]
        assert by_series[series.series_uid]["status"] == "scored"
        assert by_series[series.series_uid]["predicted_class"] == "responder"

        # -- the PACS holds exactly one SR and one report image per source study ----------
        assert pacs.count_instances() == 4
        for source_uid, result in by_series.items():
            study_uid = str(
                pydicom.dcmread(
                    (ge_files() if source_uid == ge_uid else phantom_files)[0],
                    stop_before_pixels=True,
                ).StudyInstanceUID
            )
            (sr_id,) = pacs.find("Instance", StudyInstanceUID=study_uid, Modality="SR")
            (sc_id,) = pacs.find("Instance", StudyInstanceUID=study_uid, Modality="OT")
            for kind, orthanc_id in (("sr", sr_id), ("sc", sc_id)):
                path = tmp_path / f"{result['id']}-{kind}.dcm"
                path.write_bytes(pacs.get_bytes(f"/instances/{orthanc_id}/file"))
                errors_found, _ = dciodvfy(path)
                assert errors_found == [], (kind, errors_found)
            sr_path = tmp_path / f"{result['id']}-sr.dcm"
            dump = subprocess.run([DSRDUMP, str(sr_path)], capture_output=True, text=True)
            assert dump.returncode == 0, dump.stderr
            values = read_sr(pydicom.dcmread(sr_path))
            # the SR says what the result row says
            assert values.predicted_class == result["predicted_class"]
            assert values.model_sha256 == result["model_sha256"]
            if result["status"] == "scored":
                assert values.probability == pytest.approx(result["probability"], abs=1e-6)
                assert values.decision_value == pytest.approx(result["decision_value"], abs=1e-6)
                volumes = result["volumes"]
                assert set(volumes) <= set(values.volumes) or set(values.volumes) <= set(volumes)
                for name in set(volumes) & set(values.volumes):
                    assert values.volumes[name] == pytest.approx(volumes[name], rel=1e-4), name
                assert len(set(volumes) & set(values.volumes)) >= 6
            else:
                assert values.probability is None
                assert values.not_scored_reason == result["reason"]
                assert "registration" in (values.not_scored_reason or "")
        # the restart did not run the jobs again nor make new objects
        assert db_reader.scalar("SELECT count(*) FROM emitted_object") == 4
        assert db_reader.scalar("SELECT count(*) FROM job") == 2
        assert node.stop() == 0
    finally:
        pacs.stop()
