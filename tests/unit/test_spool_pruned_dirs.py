"""The spool remembers the directories it created; retention may prune them once empty
(``retention.sweep(prune_dirs=True)``). A later store into that series creates them again."""

from __future__ import annotations

from pathlib import Path

from ketanode.spool import Spool


def test_store_after_its_directories_were_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    first = spool.store(b"one", "1.2", "1.2.3", "1.2.3.4")
    series_dir = first.path.parent
    first.path.unlink()
    series_dir.rmdir()
    series_dir.parent.rmdir()  # the study directory too

    again = spool.store(b"two", "1.2", "1.2.3", "1.2.3.4")  # the same SOP Instance UID
    assert again.created and again.path == first.path and again.path.read_bytes() == b"two"
    other = spool.store(b"three", "1.2", "1.2.3", "1.2.3.5")
    assert other.created and other.path.parent == series_dir
    assert list(spool.tmp.iterdir()) == []


def test_replace_after_its_directories_were_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    first = spool.store(b"one", "1.2", "1.2.3", "1.2.3.4")
    first.path.unlink()
    first.path.parent.rmdir()
    replaced = spool.replace(b"two", "1.2", "1.2.3", "1.2.3.4")
    assert replaced.path == first.path and replaced.path.read_bytes() == b"two"
    assert list(spool.tmp.iterdir()) == []
