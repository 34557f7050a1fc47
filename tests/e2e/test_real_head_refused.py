"""The real head refused by QC still gets an answer in its own study (issue 13, item 1): the
UIH series of the shared data (StudyDate and PatientBirthDate "***", a single-component
PatientName) is sent to ``ketanode serve`` with a voxel-size limit it cannot meet, so QC
refuses it at its first check (qc_input, seconds after conversion: no measurement); the
node sends a NOT SCORED SR and report page that land in Orthanc in the source's
StudyInstanceUID, valid for dciodvfy, and its log quotes no patient value (highdicom's
person-name warning would). The scored case: test_real_head.py."""

from __future__ import annotations

from pathlib import Path

import pydicom

from ketanode.report.sr import read_sr
from tests.e2e.conftest import Db, wait_series_final
from tests.peers import Orthanc
from tests.realhead import reports_in_pacs, uih_files
from tests.support import NodeProcess, storescu


def test_real_head_refused_by_qc_is_reported_in_its_study(
    tmp_path: Path, db_url: str, db_reader: Db, node_process: list[NodeProcess]
) -> None:
    pacs = Orthanc(tmp_path / "orthanc")
    node = NodeProcess(
        tmp_path / "node",
        db_url,
        overrides={
            "pipeline": {"measure": True},
            # the head's largest voxel is 1 mm: refused at qc_input, before any measurement
            "pipeline.qc": {"max_voxel_mm_warn": 0.4, "max_voxel_mm_fail": 0.5},
            "destinations": [  # type: ignore[dict-item]
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}
            ],
            "dispatch": {"interval_seconds": 0.5},
        },
    )
    pacs.node_port = node.port
    node_process.append(node)
    pacs.start()
    try:
        node.start()
        files = uih_files()
        storescu(node.port, files)
        (series,) = wait_series_final(node, db_reader, 1, timeout=600)
        assert series["state"] == "failed", series
        (job,) = db_reader.rows("SELECT state, failed_step, error FROM job")
        assert job["failed_step"] == "qc_input" and "voxel" in job["error"], job
        (result,) = db_reader.rows("SELECT status, reason FROM result")
        assert result["status"] == "not_scored", result

        source = pydicom.dcmread(files[0], stop_before_pixels=True)
        study = str(source.StudyInstanceUID)
        for kind, path in reports_in_pacs(pacs, db_reader, study, tmp_path).items():
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == study, kind
            assert ds.PatientID == source.PatientID, kind
            assert ds.StudyDate == "" and ds.PatientBirthDate == "", kind  # '***': left empty
        values = read_sr(pydicom.dcmread(tmp_path / "sr.dcm"))
        assert not values.scored and values.qc_outcome == "fail"
        assert values.not_scored_reason and "voxel" in values.not_scored_reason
        assert node.stop() == 0
    finally:
        pacs.stop()
    log = node.log_path.read_text(errors="replace")
    assert "unlikely to represent the intended person name" not in log
    for value in (str(source.PatientName), str(source.PatientID)):
        if len(value) > 3:  # '***' is the anonymiser's, not a patient's
            assert value not in log, "a patient identifier in the node's log"
