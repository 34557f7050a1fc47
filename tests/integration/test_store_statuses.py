"""C-STORE refusals with real peers: each gets the right DIMSE status and a stored reason,
the association carries on (a good instance sent next on the SAME association is stored),
and the node keeps working afterwards."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom.dsutils import split_dataset

from ketanode.config import MR_IMAGE_STORAGE
from tests.integration.conftest import NodeFactory, RunningNode
from tests.integration.dicomtools import (
    SECONDARY_CAPTURE_STORAGE,
    association,
    dataset_bytes,
    one_mr,
    send,
    small_series,
    truncated,
    with_garbage,
    write_raw_file,
)

# Random bytes make pydicom guess at the encoding; that is the point of the garbage case.
pytestmark = pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PIXEL_DATA = 0xC001


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _sop_class_mismatch(tmp: Path) -> Path:
    """A Secondary Capture dataset sent as MR Image Storage (the file meta says MR)."""
    ds = dcmread(one_mr(tmp / "src"))
    ds.SOPClassUID = SECONDARY_CAPTURE_STORAGE
    return write_raw_file(tmp / "mismatch.dcm", ds, meta_sop_class=MR_IMAGE_STORAGE)


def _missing_uids(tmp: Path) -> Path:
    """A well-formed MR image without Study and Series Instance UIDs."""
    ds = dcmread(one_mr(tmp / "src"))
    del ds.StudyInstanceUID
    del ds.SeriesInstanceUID
    return write_raw_file(tmp / "no-uids.dcm", ds)


def _garbage(tmp: Path) -> Path:
    """A valid file meta (MR Image Storage) followed by 4 KiB of random bytes."""
    return with_garbage(one_mr(tmp / "src"), tmp / "garbage.dcm")


def _truncated_pixels(tmp: Path) -> Path:
    """An MR image whose stream ends 1000 bytes into what its header promises."""
    return truncated(one_mr(tmp / "src", size=64), tmp / "truncated.dcm", cut=1000)


@dataclass
class Case:
    build: Callable[[Path], Path]
    status: int
    reason: tuple[str, ...]  # words the stored reason must contain
    quarantined: bool = True


CASES = {
    "sop-class-mismatch": Case(
        _sop_class_mismatch,
        DOES_NOT_MATCH,
        ("SOP Class", SECONDARY_CAPTURE_STORAGE, MR_IMAGE_STORAGE),
    ),
    "missing-uids": Case(
        _missing_uids, DOES_NOT_MATCH, ("missing", "StudyInstanceUID", "SeriesInstanceUID")
    ),
    "garbage-after-meta": Case(_garbage, CANNOT_UNDERSTAND, ("cannot parse",)),
    "truncated-pixel-data": Case(_truncated_pixels, PIXEL_DATA, ("pixel data", "7192", "8192")),
}


def _assert_node_still_works(node: RunningNode, tmp: Path) -> None:
    """A new association after the refusals: C-ECHO and a C-STORE both succeed."""
    late = one_mr(tmp / "after")
    with association(node.port, [late]) as scu:
        assert scu.echo() == SUCCESS
        assert scu.store(late) == SUCCESS
    assert len(node.instances(sop_uid=_sop_uid(late))) == 1


@pytest.mark.parametrize("case_name", list(CASES))
def test_refusal_has_status_reason_and_association_continues(
    node: RunningNode, tmp_path: Path, case_name: str
) -> None:
    case = CASES[case_name]
    bad = case.build(tmp_path / "bad")
    good = one_mr(tmp_path / "good")
    with association(node.port, [bad, good]) as scu:
        assert scu.store(bad) == case.status
        assert scu.store(good) == SUCCESS  # same association, after the refusal
        assert scu.echo() == SUCCESS

    failures = node.failures()
    assert len(failures) == 1
    failure = failures[0]
    assert failure.status == case.status
    for word in case.reason:
        assert word in failure.reason, f"{word!r} not in stored reason {failure.reason!r}"
    # The row names the request's SOP instance and its association.
    assert failure.sop_instance_uid == split_dataset(bad)[0].MediaStorageSOPInstanceUID
    assert failure.sop_class_uid == MR_IMAGE_STORAGE
    if case.quarantined:
        assert failure.quarantine_path is not None
        kept = node.spool_file(failure.quarantine_path)
        assert kept.is_file() and kept.parent == node.spool_root / "rejected"
        assert dataset_bytes(kept) == dataset_bytes(bad)  # kept as received for an admin

    # Nothing of the refused dataset is in the spool or the instance table.
    good_uid = _sop_uid(good)
    stored = node.instances()
    assert [i.sop_instance_uid for i in stored] == [good_uid]
    spooled = [p for p in node.spool_root.rglob("*.dcm") if "rejected" not in p.parts]
    assert [p.name for p in spooled] == [f"{good_uid}.dcm"]

    (assoc,) = node.wait_association_ended(1)
    assert failure.association_id == assoc.id == stored[0].association_id
    assert assoc.outcome == "released"  # never aborted because of a bad dataset
    assert (assoc.n_stored, assoc.n_failed, assoc.n_duplicate) == (1, 1, 0)

    _assert_node_still_works(node, tmp_path)


def test_free_space_floor_answers_a700(node_factory: NodeFactory, tmp_path: Path) -> None:
    """Below the configured free-space floor every C-STORE gets 0xA700 and nothing is
    written; the association stays usable and storing resumes once there is room."""
    node = node_factory({"spool": {"min_free_mb": 10**9}})  # a petabyte floor: always below
    first, second = small_series(tmp_path / "s", 2)
    with association(node.port, [first, second]) as scu:
        assert scu.store(first) == OUT_OF_RESOURCES
        assert scu.echo() == SUCCESS
        # Space comes back while the sender is still connected (the floor of the live
        # spool is lowered, as if an admin had freed the disk).
        node.node.spool.min_free_bytes = 0
        assert scu.store(second) == SUCCESS

    (failure,) = node.failures()
    assert failure.status == OUT_OF_RESOURCES
    assert "floor" in failure.reason and "MiB" in failure.reason
    assert failure.sop_instance_uid == _sop_uid(first)
    assert failure.quarantine_path is None  # no space: a refused copy is not kept
    assert node.instances(sop_uid=_sop_uid(first)) == []
    assert list((node.spool_root / "rejected").iterdir()) == []
    assert [i.sop_instance_uid for i in node.instances()] == [_sop_uid(second)]
    (assoc,) = node.wait_association_ended(1)
    assert (assoc.outcome, assoc.n_stored, assoc.n_failed) == ("released", 1, 1)


def test_disk_full_enospc_answers_a700(
    tmpfs: Callable[..., Path], node_factory: NodeFactory, tmp_path: Path
) -> None:
    """A real ENOSPC from the kernel: the spool is on a tmpfs whose inodes run out while
    a series is being received. The instance that cannot be written gets 0xA700 with the
    reason, no partial file is left, and the next instance on the same association is
    stored once space is back."""
    mount = tmpfs("spoolfs", size="8m", nr_inodes=48)
    node = node_factory({"spool": {"path": str(mount / "spool"), "min_free_mb": 0}})
    files = small_series(tmp_path / "s", 3)
    fillers = mount / "fillers"
    fillers.mkdir()
    with association(node.port, files) as scu:
        assert scu.store(files[0]) == SUCCESS  # creates the study and series directories
        n = 0
        while True:  # use up every inode left
            try:
                (fillers / f"f{n}").touch()
            except OSError:
                break
            n += 1
        assert n > 0
        assert scu.store(files[1]) == OUT_OF_RESOURCES
        for filler in fillers.iterdir():
            filler.unlink()
        assert scu.store(files[2]) == SUCCESS

    (failure,) = node.failures()
    assert failure.status == OUT_OF_RESOURCES
    assert "disk full" in failure.reason and "No space left on device" in failure.reason
    assert failure.sop_instance_uid == _sop_uid(files[1])
    assert list((mount / "spool" / ".tmp").iterdir()) == []  # no partial file left behind
    stored = {i.sop_instance_uid for i in node.instances()}
    assert stored == {_sop_uid(files[0]), _sop_uid(files[2])}
    for inst in node.instances():
        assert node.spool_file(inst.spool_path).is_file()
        assert os.path.getsize(node.spool_file(inst.spool_path)) == inst.size_bytes
    (assoc,) = node.wait_association_ended(1)
    assert (assoc.outcome, assoc.n_stored, assoc.n_failed) == ("released", 2, 1)


def test_every_refusal_on_one_association(node: RunningNode, tmp_path: Path) -> None:
    """All the bad datasets in a row, interleaved with good ones, on one association."""
    bads = {name: case.build(tmp_path / name) for name, case in CASES.items()}
    goods = small_series(tmp_path / "good", len(bads), series_uid=str(generate_uid()))
    order: list[tuple[Path, int]] = []
    for (name, bad), good in zip(bads.items(), goods, strict=True):
        order += [(bad, CASES[name].status), (good, SUCCESS)]
    with association(node.port, [p for p, _ in order]) as scu:
        assert [scu.store(p) for p, _ in order] == [s for _, s in order]
    assert sorted(f.status for f in node.failures()) == sorted(c.status for c in CASES.values())
    assert len(node.instances()) == len(goods)
    (assoc,) = node.wait_association_ended(1)
    assert (assoc.outcome, assoc.n_stored, assoc.n_failed) == ("released", len(goods), len(bads))
    _assert_node_still_works(node, tmp_path)
    assert send(node.port, [goods[0]]) == [SUCCESS]  # a resend of a stored one is fine too
