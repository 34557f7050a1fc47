"""store.index_file: a file the native front end acknowledged is never lost. While the node
cannot decide (the spool below its floor, the database away) it raises Retry and leaves the
file; once it can, the file is linked into the spool with its row and the front end's name
goes; a file the checks refuse is recorded with the dataset kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import text

from ketanode.db.migrate import upgrade
from ketanode.db.session import make_engine, make_session_factory
from ketanode.receive.store import Retry, StoreService, index_file
from ketanode.spool import Spool
from ketanode.synthetic.phantom import simple_head
from ketanode.synthetic.series_writer import SeriesSpec, write_series


@pytest.fixture
def received(tmp_path: Path) -> tuple[StoreService, Path, pydicom.Dataset]:
    engine = make_engine(f"sqlite:///{tmp_path / 'k.db'}")
    upgrade(engine)
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    service = StoreService(make_session_factory(engine), spool, lambda _: None)
    volume = simple_head((1, 32, 32))
    src = write_series(volume, (1.0, 1.0, 1.0), tmp_path / "s", SeriesSpec())[0]
    incoming = spool.root / "incoming" / "here"
    incoming.mkdir(parents=True)
    path = incoming / "1-2-1-1.dcm"
    shutil.copyfile(src, path)
    return service, path, pydicom.dcmread(path)


def _index(service: StoreService, path: Path, ds: pydicom.Dataset) -> int:
    meta = ds.file_meta
    return index_file(
        service,
        path,
        str(meta.TransferSyntaxUID),
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        None,
    )


def _count(service: StoreService, table: str) -> int:
    with service.sessions() as session:
        return int(session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_spool_below_its_floor_leaves_the_file_then_indexes_it(
    received: tuple[StoreService, Path, pydicom.Dataset],
) -> None:
    service, path, ds = received
    service.spool.min_free_bytes = 2**62  # far above any disk's free space
    with pytest.raises(Retry, match="floor"):
        _index(service, path, ds)
    assert path.is_file(), "an acknowledged file was removed"
    assert (_count(service, "instance"), _count(service, "store_failure")) == (0, 0)

    service.spool.min_free_bytes = 0
    assert _index(service, path, ds) == 0x0000
    assert not path.exists()
    kept = service.spool.path_for(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    )
    assert kept.is_file() and pydicom.dcmread(kept).SOPInstanceUID == ds.SOPInstanceUID
    assert _count(service, "instance") == 1


def test_again_after_a_crash_between_the_commit_and_the_removal(
    received: tuple[StoreService, Path, pydicom.Dataset],
) -> None:
    """The row committed but the front end's file not removed yet: indexed again, it is a
    duplicate (one row), and the file goes."""
    service, path, ds = received
    copy = path.with_name("1-2-1-2.dcm")
    shutil.copyfile(path, copy)
    assert _index(service, path, ds) == 0x0000
    assert _index(service, copy, ds) == 0x0000
    assert not copy.exists()
    assert _count(service, "instance") == 1


def test_a_refused_file_is_recorded_and_kept(
    received: tuple[StoreService, Path, pydicom.Dataset],
) -> None:
    service, path, ds = received
    ds.Rows = 0
    ds.save_as(path, enforce_file_format=True)
    assert _index(service, path, ds) == 0xA900
    assert not path.exists()
    with service.sessions() as session:
        reason, kept = session.execute(
            text("SELECT reason, quarantine_path FROM store_failure")
        ).one()
    assert "after the front end had answered success" in reason
    assert (service.spool.root / kept).is_file()
    assert _count(service, "instance") == 0
