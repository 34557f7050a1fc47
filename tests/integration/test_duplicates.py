"""The same SOP Instance UID sent twice is stored once (one row, one file, first copy kept),
on the same association and on different ones; the duplicate is counted and does not
reopen a completed series. The same UID with other content (other pixels, another series)
is refused with 0x0111 and its reason, never dropped silently and never left as a file
without a row."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.integration.conftest import RunningNode
from tests.integration.dicomtools import association, send, sha256, small_series, write_raw_file

DUPLICATE = 0x0111


def _uid(path: Path, keyword: str = "SOPInstanceUID") -> str:
    return str(dcmread(path, stop_before_pixels=True)[keyword].value)


def _spool_files(node: RunningNode) -> list[Path]:
    return sorted(p for p in node.spool_root.rglob("*.dcm") if "rejected" not in p.parts)


def test_duplicate_on_the_same_association_is_stored_once(
    node: RunningNode, tmp_path: Path
) -> None:
    a, b = small_series(tmp_path / "s", 2)
    with association(node.port, [a, b]) as scu:
        assert [scu.store(a), scu.store(a), scu.store(b), scu.store(a)] == [0, 0, 0, 0]

    rows = node.instances(sop_uid=_uid(a))
    assert len(rows) == 1
    assert len(node.instances()) == 2
    assert [p.name for p in _spool_files(node)] == sorted(f"{_uid(p)}.dcm" for p in (a, b))
    assert sha256(node.spool_file(rows[0].spool_path)) == rows[0].sha256
    (assoc,) = node.wait_association_ended(1)
    assert (assoc.n_stored, assoc.n_duplicate, assoc.n_failed) == (2, 2, 0)
    series = node.one_series(_uid(a, "SeriesInstanceUID"))
    assert series.n_instances == 2 and series.n_frames == 2
    assert node.failures() == []


def test_duplicate_on_another_association_keeps_the_first_copy(
    node: RunningNode, tmp_path: Path
) -> None:
    files = small_series(tmp_path / "s", 3, mr_acquisition_type="2D")  # ends 'ignored'
    series_uid = _uid(files[0], "SeriesInstanceUID")
    assert send(node.port, files) == [0, 0, 0]
    first = node.wait_state(series_uid, ("ignored",))
    original = node.instances(sop_uid=_uid(files[0]))[0]
    first_sha = sha256(node.spool_file(original.spool_path))

    # The same SOP Instance UID again, once as it was and once with other pixel values.
    changed = dcmread(files[0])
    changed.PixelData = bytes(len(changed.PixelData))
    altered = write_raw_file(tmp_path / "altered.dcm", changed)
    assert sha256(altered) != sha256(files[0])
    # ... and once moved to another series (its file would go to another directory)
    moved = dcmread(files[0])
    moved.SeriesInstanceUID = generate_uid()
    elsewhere = write_raw_file(tmp_path / "elsewhere.dcm", moved)
    assert send(node.port, [files[0], altered, elsewhere]) == [0, DUPLICATE, DUPLICATE]

    rows = node.instances(sop_uid=_uid(files[0]))
    assert len(rows) == 1 and rows[0].id == original.id
    # the first copy is kept
    assert sha256(node.spool_file(rows[0].spool_path)) == first_sha == rows[0].sha256
    assert len(_spool_files(node)) == 3  # no file without a row
    failures = node.failures()
    assert [f.status for f in failures] == [DUPLICATE, DUPLICATE]
    for failure in failures:
        assert failure.sop_instance_uid == _uid(files[0])
        assert f"already stored (instance row {original.id}" in failure.reason
        assert "other content" in failure.reason and "stored copy is kept" in failure.reason
        assert failure.quarantine_path and node.spool_file(failure.quarantine_path).is_file()
    first_assoc, second_assoc = node.wait_association_ended(2)
    assert (first_assoc.n_stored, first_assoc.n_duplicate) == (3, 0)
    assert (second_assoc.n_stored, second_assoc.n_duplicate, second_assoc.n_failed) == (0, 1, 2)
    assert [s.series_uid for s in node.series()] == [series_uid]

    # A duplicate is not a late instance: the completed series is not reopened.
    again = node.one_series(series_uid)
    assert again.state == first.state and again.generation == 1 == first.generation
    assert again.n_instances == 3
    assert again.completed_at == first.completed_at
