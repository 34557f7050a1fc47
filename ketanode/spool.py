"""The durable spool: write the file in place, fsync it, fsync its directory.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, with
``<spool>/.tmp`` for the replacement of an orphan being written and ``<spool>/rejected`` for
datasets the node refused (kept for an admin to inspect when ``spool.keep_rejected``, up to
a quota of their own, ``spool.rejected_max_mb``; retention removes them after
``retention.rejected_hours``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ketanode.roots import Root

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How often the size of the rejected files is read again from the directory.
_REJECTED_REREAD_SECONDS = 60.0

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolFull(Exception):
    """The disk is full or below the configured free-space floor."""


def is_valid_uid(uid: str | None) -> bool:
    return bool(uid) and len(uid or "") <= 64 and bool(_UID_RE.match(uid or ""))


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    size: int
    sha256: str
    created: bool  # False when a file for this SOP Instance UID was already there


def _raise_if_full(exc: OSError) -> None:
    """SpoolFull when ``exc`` says the disk (or the quota) is full."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise SpoolFull(f"disk full while writing to the spool ({exc.strerror})") from exc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_new(path: Path, data: bytes) -> None:
    """``data`` durable in a file created exclusively at ``path`` (FileExistsError when one is
    there); on a failed write the partial file is removed, and a full disk is SpoolFull."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except OSError as exc:  # no inode left; a file there or a removed directory: the caller's
        _raise_if_full(exc)
        raise
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        path.unlink(missing_ok=True)  # no partial file left behind
        _raise_if_full(exc)
        raise


def _link_new(source: Path, path: Path) -> None:
    """``source`` (durable already) linked at ``path`` (FileExistsError when one is there);
    a full disk is SpoolFull."""
    try:
        os.link(source, path)
    except OSError as exc:
        _raise_if_full(exc)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(
        self,
        root: Path,
        min_free_bytes: int,
        *,
        keep_rejected: bool = True,
        rejected_max_bytes: int | None = None,
    ) -> None:
        self.root = root.resolve()
        # paths in the database are relative to the root (ketanode/roots.py)
        self.files = Root(self.root)
        self.min_free_bytes = min_free_bytes
        self.keep_rejected = keep_rejected
        # None: no quota of their own (only the free-space floor)
        self.rejected_max_bytes = rejected_max_bytes
        self.tmp = self.root / ".tmp"
        self.rejected = self.root / "rejected"
        for d in (self.root, self.tmp, self.rejected):
            d.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._rejected_lock = threading.Lock()
        self._rejected_bytes = self.rejected_usage()
        self._rejected_read_at = time.monotonic()

    def rejected_usage(self) -> int:
        """Bytes held in ``rejected/`` now (read from the directory)."""
        total = 0
        for path in self.rejected.glob("*.dcm"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def resync_rejected(self) -> int:
        """Re-read the rejected files' size (after retention removed some). Returns it."""
        with self._rejected_lock:
            self._rejected_bytes = self.rejected_usage()
            self._rejected_read_at = time.monotonic()
            return self._rejected_bytes

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int) -> None:
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise SpoolFull(
                f"spool free space {free // 2**20} MiB minus this object would fall below the "
                f"floor of {self.min_free_bytes // 2**20} MiB"
            )

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise ValueError(f"not a valid UID: {uid!r}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        if created:
            _fsync_dir(directory.parent)
            _fsync_dir(directory.parent.parent)
        self._known_dirs.add(directory)

    def _into_dir(self, directory: Path, put: Callable[[], T]) -> T:
        """``put()`` (which puts a file into ``directory``) after making sure the directory
        exists. A directory the cache remembers may have been removed since (retention prunes
        emptied series and study directories): then it is forgotten, created again (with the
        parent fsyncs) and ``put()`` tried once more."""
        self._ensure_dir(directory)
        try:
            return put()
        except FileNotFoundError:
            if directory.is_dir():
                raise  # not the directory: let the caller see it
            logger.info("spool directory %s was removed; creating it again", directory)
            self._known_dirs.discard(directory)
            self._ensure_dir(directory)
            return put()

    def _write_tmp(self, data: bytes) -> Path:
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        _write_new(tmp, data)
        return tmp

    def store(
        self,
        data: bytes,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        digest: str | None = None,
        source: Path | None = None,
    ) -> SpooledFile:
        """Make ``data`` durable at its final path; never overwrites a file already there.

        Written in place (created exclusively, written, fsynced, then the directory fsynced):
        one journal commit per file instead of two for a temporary file linked into place.
        A crash in the middle leaves a partial file at the final path with no row: the node
        treats any file without a row as an orphan and replaces it when the instance comes
        again (``replace``); nothing reads a spool file before its row is committed.
        ``digest`` is the SHA-256 of ``data`` when the caller has it already. ``source``, a
        durable file on the spool's file system holding ``data`` (the native front end's),
        is linked at the final path instead of writing the bytes again.
        """
        final = self.path_for(study_uid, series_uid, sop_uid)
        digest = digest or hashlib.sha256(data).hexdigest()

        def write() -> bool:
            try:  # a removed directory (FileNotFoundError): _into_dir
                if source is not None:
                    _link_new(source, final)
                else:
                    _write_new(final, data)
            except FileExistsError:
                return False
            _fsync_dir(final.parent)
            return True

        created = self._into_dir(final.parent, write)
        if not created:
            return SpooledFile(final, final.stat().st_size, digest, created=False)
        return SpooledFile(final, len(data), digest, created=True)

    def replace(self, data: bytes, study_uid: str, series_uid: str, sop_uid: str) -> SpooledFile:
        """Overwrite an orphan file (left by a crash before its row was committed)."""
        final = self.path_for(study_uid, series_uid, sop_uid)
        tmp = self._write_tmp(data)

        def put() -> None:
            os.replace(tmp, final)
            _fsync_dir(final.parent)

        try:
            self._into_dir(final.parent, put)
        finally:
            tmp.unlink(missing_ok=True)
        return SpooledFile(final, len(data), hashlib.sha256(data).hexdigest(), created=True)

    def quarantine(self, data: bytes, status: int) -> tuple[Path | None, str | None]:
        """Keep a refused dataset for inspection; best effort (never raises).

        Returns (path, None) when kept, else (None, why not) - None when keeping is off."""
        if not self.keep_rejected:
            return None, None
        try:
            with self._rejected_lock:
                if time.monotonic() - self._rejected_read_at > _REJECTED_REREAD_SECONDS:
                    # retention (or an admin) may have removed some since
                    self._rejected_bytes = self.rejected_usage()
                    self._rejected_read_at = time.monotonic()
                if self.rejected_max_bytes is not None and (
                    self._rejected_bytes + len(data) > self.rejected_max_bytes
                ):
                    return None, (
                        f"the rejected files' quota of {self.rejected_max_bytes / 2**20:g} MiB "
                        "is full"
                    )
                if self.free_bytes() - len(data) < self.min_free_bytes:
                    return None, "spool free space below its floor"
                path = self.rejected / f"{status:04X}-{uuid.uuid4().hex}.dcm"
                path.write_bytes(data)
                self._rejected_bytes += len(data)
            return path, None
        except OSError as exc:
            logger.warning(
                "could not keep a refused dataset in %s: %s", self.rejected, exc.strerror
            )
            return None, f"could not be written ({exc.strerror})"

    def discard(self, path: Path) -> None:
        """Remove a file this process linked into the spool but whose row was not committed."""
        try:
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        except OSError:
            logger.warning("could not remove an uncommitted spool file %s", path)

    def clean_tmp(self) -> int:
        """Remove partial files a dead process left behind. Returns how many."""
        removed = 0
        for part in self.tmp.glob("*.part"):
            part.unlink(missing_ok=True)
            removed += 1
        return removed
