"""`ketanode demo`, the README's first command, end to end: a generated study goes in over
DICOM, the localizer is ignored, the T1 is measured and scored with the demonstration model,
the SR and the report image (and a PNG of the page) are written, and, with a destination in
the settings, they reach the PACS (Orthanc) in the same study."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom

from ketanode.model.files import DEMO_LABEL
from tests.peers import Orthanc
from tests.support import write_config


def test_demo_writes_and_sends_the_sr_and_report_image(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        config = write_config(
            tmp_path / "demo.toml",
            {
                "destinations": [  # type: ignore[dict-item]
                    {
                        "name": "pacs",
                        "ae_title": pacs.aet,
                        "host": "127.0.0.1",
                        "port": pacs.dicom_port,
                    }
                ]
            },
        )
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "ketanode",
                "-c",
                str(config),
                "demo",
                "--data-dir",
                str(tmp_path / "demo"),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout)
        states = sorted(s["state"] for s in out["series"])
        assert states == ["done", "ignored"], states
        (result,) = out["results"]
        assert result["status"] == "scored"
        assert result["predicted_class"] in ("responder", "non-responder", "indeterminate")
        assert result["model_label"] == DEMO_LABEL
        kinds = {o["kind"]: o for o in result["objects"]}
        assert set(kinds) == {"sr", "report_image"}
        for o in kinds.values():
            assert Path(o["path"]).is_file() and o["dispatch"] == {"pacs": "sent"}, o
        assert kinds["report_image"]["png"] and Path(kinds["report_image"]["png"]).is_file()
        study = str(pydicom.dcmread(kinds["sr"]["path"]).StudyInstanceUID)
        (sr,) = pacs.find("Instance", StudyInstanceUID=study, Modality="SR")
        tags = pacs.get(f"/instances/{sr}/simplified-tags")
        assert tags["SOPInstanceUID"] == kinds["sr"]["sop_instance_uid"]
        # the demo switches the demonstration model on, and its results say DEMO (issue 12)
        assert tags["SeriesDescription"].startswith("DEMO "), tags["SeriesDescription"]
        assert len(pacs.find("Instance", StudyInstanceUID=study, Modality="OT")) == 1
    finally:
        pacs.stop()
