"""Paths kept in the database, relative to the configured roots (issue 16).

A file the node keeps a row for lives under one of two roots: the spool (``spool.path``:
received instances, and refused datasets in ``rejected/``) or the reports folder
(``reports.path``: the SR and the report image of each result). The database holds its
path relative to that root (``1.2.3/1.2.4/1.2.5.dcm``, ``rejected/A900-....dcm``), so that
the hosts of a cluster may mount the shared filesystem wherever each wants: every host
joins a stored path to its own configured root.

Every reader goes through :meth:`Root.resolve` (the one place that turns a stored path into
a file). It takes an absolute stored path as it is: rows written before migration 0007
whose paths it could not make relative (docs/scaling.md), or a file outside the root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ketanode.config import Settings


@dataclass(frozen=True)
class Root:
    """One configured root as this host sees it (an absolute path, symlinks resolved)."""

    path: Path

    @classmethod
    def at(cls, configured: Path) -> Root:
        return cls(configured.resolve())

    def stored(self, path: Path | str) -> str:
        """What the database keeps for the file at ``path``: its path relative to the root
        (POSIX separators), or the absolute path when the file is not under the root."""
        absolute = Path(path).absolute()
        try:
            return absolute.relative_to(self.path).as_posix()
        except ValueError:
            return str(absolute)

    def resolve(self, stored: str) -> Path:
        """The file a stored path names on this host: joined to the root when relative,
        as it is when absolute."""
        if PurePosixPath(stored).is_absolute():
            return Path(stored)
        return self.path / stored


def spool_root(settings: Settings) -> Root:
    """The root of ``instance.spool_path`` and ``store_failure.quarantine_path``."""
    return Root.at(settings.spool.path)


def reports_root(settings: Settings) -> Root:
    """The root of ``emitted_object.path``."""
    return Root.at(settings.reports.path)
