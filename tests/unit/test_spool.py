"""The spool never overwrites, replaces only orphans, and keeps nothing half written."""

from __future__ import annotations

from pathlib import Path

import pytest

from ketanode.spool import Spool, SpoolFull


def test_store_is_durable_and_never_overwrites(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    first = spool.store(b"one", "1.2", "1.2.3", "1.2.3.4")
    assert first.created and first.path.read_bytes() == b"one"
    again = spool.store(b"two", "1.2", "1.2.3", "1.2.3.4")
    assert not again.created and first.path.read_bytes() == b"one"
    orphan = spool.replace(b"two", "1.2", "1.2.3", "1.2.3.4")
    assert orphan.path.read_bytes() == b"two"
    assert list(spool.tmp.iterdir()) == []


def test_uids_are_checked_before_they_become_paths(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    for bad in ("../../etc", "1.2/3", "", "1." + "2" * 70):
        with pytest.raises(ValueError):
            spool.path_for("1.2", "1.2.3", bad)


def test_free_space_floor(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 2**62)
    with pytest.raises(SpoolFull, match="floor"):
        spool.check_space(10)


def test_partial_files_are_cleaned(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    (spool.tmp / "abc.part").write_bytes(b"half")
    assert spool.clean_tmp() == 1
    assert list(spool.tmp.iterdir()) == []
