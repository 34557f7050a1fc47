"""No patient identifiers in logs (name, ID, birth date, accession; docs/architecture.md,
rules that protect data, 4), nor in what the everyday admin commands print.

Two series with distinctive identifiers are sent to ``ketanode serve`` (DEBUG logging):
a copy of the real GE series re-identified with DCMTK dcmodify, and a generated series.
A third dataset with identifiers is refused (truncated pixel data), so the refusal path
is covered too. The node's whole log and the output of the admin commands must not
contain any identifier in any usual spelling. The checks are not vacuous: the log must
show the series being processed, and ``series show --patient`` (the one command meant to
reveal them) must show the identifiers, so the node did receive them.
"""

from __future__ import annotations

import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from ketanode.synthetic.series_writer import SeriesSpec
from tests.e2e.conftest import Db, copy_ge, generated_series, wait_series_final
from tests.support import DCMODIFY, NodeProcess, storescu


def identity(name: str, patient_id: str, birth: str, accession: str) -> dict[str, str]:
    return {"name": name, "id": patient_id, "birth": birth, "accession": accession}


GE_PATIENT = identity("Zyxwa^Qorbin", "PIDQ7731", "19580317", "ACCN55821")
GENERATED_PATIENT = identity("Vexlor^Pindrake", "MRN0048213", "19620911", "ACC77104X")
REFUSED_PATIENT = identity("Thrubel^Ostavia", "KX99-3318", "19450228", "ACQZ8812")


def forbidden_patterns(who: dict[str, str]) -> dict[str, re.Pattern[str]]:
    """Every spelling of the identifiers that must not appear, as case-insensitive regexes."""
    family, given = who["name"].split("^")
    y, m, d = who["birth"][:4], who["birth"][4:6], who["birth"][6:8]
    literal = {
        "name": who["name"],
        "family name": family,
        "given name": given,
        "name (display)": f"{given} {family}",
        "name (comma)": f"{family}, {given}",
        "patient id": who["id"],
        "accession": who["accession"],
    }
    patterns = {k: re.compile(re.escape(v), re.IGNORECASE) for k, v in literal.items()}
    # Dates: bounded by non-digits, so a UID or a timestamp that happens to contain the
    # digits inside a longer number does not count.
    for label, text in {
        "birth date DA": f"{y}{m}{d}",
        "birth date ISO": f"{y}-{m}-{d}",
        "birth date dotted": f"{d}.{m}.{y}",
        "birth date EU": f"{d}/{m}/{y}",
        "birth date US": f"{m}/{d}/{y}",
        "birth date slashed": f"{y}/{m}/{d}",
    }.items():
        patterns[label] = re.compile(r"(?<!\d)" + re.escape(text) + r"(?!\d)")
    return patterns


def leaks(text: str, where: str) -> list[str]:
    found = []
    for who in (GE_PATIENT, GENERATED_PATIENT, REFUSED_PATIENT):
        for label, pattern in forbidden_patterns(who).items():
            for match in pattern.finditer(text):
                start = max(0, match.start() - 60)
                context = text[start : match.end() + 60].replace("\n", " | ")
                found.append(f"{where}: {label} of {who['id']!r}: ...{context}...")
    return found


def reidentified_ge_copy(dest: Path) -> list[Path]:
    files = copy_ge(dest)
    who = GE_PATIENT
    proc = subprocess.run(
        [
            DCMODIFY,
            "-nb",
            "-i",
            f"(0010,0010)={who['name']}",
            "-i",
            f"(0010,0020)={who['id']}",
            "-i",
            f"(0010,0030)={who['birth']}",
            "-i",
            f"(0008,0050)={who['accession']}",
            *[str(f) for f in files],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ds = dcmread(str(files[0]), stop_before_pixels=True)
    assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber) == (
        who["name"],
        who["id"],
        who["birth"],
        who["accession"],
    )
    return files


def truncated_dataset(source: Path, dest: Path) -> Path:
    """An MR image whose pixel data is half as long as its header says: refused 0xC001."""
    ds = dcmread(str(source))
    who = REFUSED_PATIENT
    ds.PatientName, ds.PatientID = who["name"], who["id"]
    ds.PatientBirthDate, ds.AccessionNumber = who["birth"], who["accession"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelData = bytes(ds.PixelData)[: len(ds.PixelData) // 2]
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(dest), enforce_file_format=True)
    return dest


@pytest.mark.timeout(180)
def test_no_patient_identifiers_in_logs_or_admin_output(
    sqlite_url: str,
    tmp_path: Path,
    node_process: list[NodeProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ge = reidentified_ge_copy(tmp_path / "ge-reidentified")
    who = GENERATED_PATIENT
    generated = generated_series(
        tmp_path / "generated",
        110,
        spec=SeriesSpec(
            patient_name=who["name"],
            patient_id=who["id"],
            patient_birth_date=who["birth"],
            accession_number=who["accession"],
        ),
    )
    broken = truncated_dataset(generated[0], tmp_path / "broken" / "broken.dcm")

    node = NodeProcess(tmp_path / "node", sqlite_url)
    node_process.append(node)
    node.start()
    db = Db(sqlite_url)
    try:
        storescu(node.port, ge)
        storescu(node.port, generated)
        storescu(node.port, [broken], check=False)  # answered 0xC001
        series = wait_series_final(node, db, 2, timeout=90)
    finally:
        db.close()
    assert sorted(s["state"] for s in series) == ["done", "done"], series

    # What an admin runs day to day. Wide columns, so that rich tables do not cut values.
    monkeypatch.setenv("COLUMNS", "400")
    ge_row = next(s for s in series if s["n_instances"] == 130)
    other_row = next(s for s in series if s["id"] != ge_row["id"])
    admin_commands = [
        ("status",),
        ("status", "--json"),
        ("series", "list"),
        ("series", "list", "--json"),
        ("jobs", "list"),
        ("jobs", "list", "--json"),
        ("associations",),
        ("failures", "--json"),
        ("series", "show", str(ge_row["id"])),
        ("series", "show", other_row["series_uid"], "--json"),
    ]
    revealing = ("series", "show", str(ge_row["id"]), "--json", "--patient")
    with ThreadPoolExecutor(2) as pool:  # each CLI start costs seconds of CPU
        results = list(pool.map(lambda cmd: node.cli(*cmd), [*admin_commands, revealing]))
    outputs = {" ".join(cmd): proc for cmd, proc in zip(admin_commands, results, strict=False)}
    revealed = results[-1]
    failures = json.loads(outputs["failures --json"].stdout)
    assert len(failures) == 1 and failures[0]["status"] == "0xC001", failures

    assert node.stop() == 0
    log = node.log_text()

    # Not vacuous: the log is DEBUG, covers both series from arrival to conversion and the
    # refusal, and the node did hold the identifiers (shown only on request).
    assert "DEBUG" in log
    for s in series:
        assert f"new series row {s['id']} " in log
        assert re.search(rf"series row {s['id']} complete \(", log), f"series {s['id']} not logged"
    assert log.count("step convert done") == 2
    assert "C-STORE refused with 0xC001" in log
    assert log.count("stored SOP instance") == 240
    # The database keeps the identifiers for admins; only `series show --patient` shows them
    # (and the detector finds them there).
    assert json.loads(revealed.stdout)["patient"]["id"] == GE_PATIENT["id"]
    assert leaks(revealed.stdout, "series show --patient")
    db = Db(sqlite_url)
    try:
        kept = {r["patient_id"] for r in db.rows("SELECT patient_id FROM study")}
    finally:
        db.close()
    assert {GE_PATIENT["id"], GENERATED_PATIENT["id"]} <= kept
    assert REFUSED_PATIENT["id"] not in kept  # a refused dataset creates no study row

    found = leaks(log, "node log")
    for cmd, proc in outputs.items():
        found += leaks(proc.stdout + proc.stderr, f"`ketanode {cmd}`")
    assert not found, "patient identifiers leaked:\n" + "\n".join(found[:20])
