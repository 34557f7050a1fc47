"""Refused datasets kept in spool/rejected (issue 13, item 9): ``spool.keep_rejected`` is
honoured, the kept files have a quota of their own (``spool.rejected_max_mb``) so junk
cannot fill the spool to its floor, and retention removes them after
``retention.rejected_hours``."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

from ketanode.admin.retention import sweep
from tests.integration.conftest import NodeFactory, RunningNode
from tests.integration.dicomtools import association, one_mr, truncated

SHORT_PIXELS = 0xC001


def _junk(tmp: Path, n: int, size: int = 64) -> list[Path]:
    """``n`` MR images cut 300 bytes into their pixel data (0xC001), ~8 KiB each."""
    out = []
    for k in range(n):
        valid = one_mr(tmp / f"src{k}", size=size)
        out.append(truncated(valid, tmp / f"junk{k}.dcm", cut=300))
    return out


def _rejected(node: RunningNode) -> list[Path]:
    return sorted((node.spool_root / "rejected").glob("*.dcm"))


def test_keep_rejected_off_keeps_nothing(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory({"spool": {"keep_rejected": False}})
    (junk,) = _junk(tmp_path, 1)
    good = one_mr(tmp_path / "good")
    with association(node.port, [junk, good]) as scu:
        assert scu.store(junk) == SHORT_PIXELS
        assert scu.store(good) == 0
    (failure,) = node.failures()
    assert failure.reason.startswith("pixel data has")
    assert failure.quarantine_path is None
    assert _rejected(node) == []


def test_rejected_files_have_a_quota_of_their_own(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    # 20 KiB: two of the ~8 KiB refused datasets fit, the rest are refused without a copy
    node = node_factory({"spool": {"rejected_max_mb": 20 / 1024}})
    junk = _junk(tmp_path, 5)
    good = one_mr(tmp_path / "good")
    with association(node.port, [*junk, good]) as scu:
        assert [scu.store(p) for p in junk] == [SHORT_PIXELS] * 5
        assert scu.store(good) == 0  # valid data is still stored
    failures = node.failures()
    kept = [f for f in failures if f.quarantine_path]
    assert len(kept) == 2 and all(node.spool_file(f.quarantine_path).is_file() for f in kept)
    for failure in failures[2:]:
        assert failure.quarantine_path is None
        assert "dataset not kept: the rejected files' quota of 0.0195312 MiB is full" in (
            failure.reason
        )
    assert sum(p.stat().st_size for p in _rejected(node)) <= 20 * 1024
    assert len(node.instances()) == 1


def test_retention_removes_rejected_files_after_their_own_age(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory({"retention": {"rejected_hours": 24, "spool_hours": 1000}})
    old, recent = _junk(tmp_path, 2)
    with association(node.port, [old, recent]) as scu:
        assert [scu.store(old), scu.store(recent)] == [SHORT_PIXELS] * 2
    first, second = node.failures()
    old_copy = node.spool_file(first.quarantine_path)
    two_days_ago = time.time() - 48 * 3600
    os.utime(old_copy, (two_days_ago, two_days_ago))

    dry = sweep(node.node.sessions, node.settings, dry_run=True)
    assert (dry.rejected_files, dry.rejected_bytes) == (1, old_copy.stat().st_size)
    report = sweep(node.node.sessions, node.settings)
    assert report.rejected_files == 1 and report.summary()["rejected_files"] == 1
    assert not old_copy.exists()
    assert _rejected(node) == [node.spool_file(second.quarantine_path)]
    first, second = node.failures()
    assert first.quarantine_path is None  # the row stays, with its reason
    assert first.reason.startswith("pixel data has")
    assert second.quarantine_path is not None

    # a day later the other one goes too
    later = sweep(
        node.node.sessions, node.settings, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    )
    assert later.rejected_files == 1
    assert _rejected(node) == []
    # the quota counts what is there now
    assert node.node.spool.resync_rejected() == 0
