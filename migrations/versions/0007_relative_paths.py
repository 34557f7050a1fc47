"""paths in the database relative to the configured roots (issue 16)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 22:10:00

``instance.spool_path`` and ``store_failure.quarantine_path`` become relative to the spool
(``spool.path``), ``emitted_object.path`` to the reports folder (``reports.path``), so that
each host of a cluster may mount the shared filesystem where it wants
(``ketanode/roots.py``).

A migration does not know the configuration, so it takes the root from each path's own
shape, which the node's layout fixes: ``<root>/<study UID>/<series UID>/<SOP UID>.dcm`` for
an instance (the file named by the row's SOP Instance UID) and for an emitted object (the
row's own study, series and SOP UIDs), ``<root>/rejected/<status>-<hex>.dcm`` for a refused
dataset. The part after the root is kept. A path of another shape stays absolute, and the
node reads it as it is. After the upgrade, every relative path is read under the root the
settings name: the spool and the reports must be where the settings say (a root moved
without its files, or moved and not configured, leaves its rows pointing at nothing).

Downgrade leaves the paths relative: an older release would read them from its working
folder. Restore the database taken before the upgrade instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import PurePosixPath

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_REJECTED = re.compile(r"^[0-9A-F]{4}-[0-9a-f]{32}\.dcm$")
_CHUNK = 5000


def _instance(path: str, sop_uid: str) -> str | None:
    p = PurePosixPath(path)
    if not p.is_absolute() or len(p.parts) < 5:
        return None
    study, series, name = p.parts[-3:]
    if name != f"{sop_uid}.dcm" or not (_UID.match(study) and _UID.match(series)):
        return None
    return f"{study}/{series}/{name}"


def _emitted(path: str, study_uid: str, series_uid: str, sop_uid: str) -> str | None:
    p = PurePosixPath(path)
    if not p.is_absolute() or len(p.parts) < 5:
        return None
    if p.parts[-3:] != (study_uid, series_uid, f"{sop_uid}.dcm"):
        return None
    return f"{study_uid}/{series_uid}/{sop_uid}.dcm"


def _rejected(path: str) -> str | None:
    p = PurePosixPath(path)
    if not p.is_absolute() or len(p.parts) < 3:
        return None
    if p.parent.name != "rejected" or not _REJECTED.match(p.name):
        return None
    return f"rejected/{p.name}"


def _rewrite(
    conn: sa.Connection,
    table: str,
    column: str,
    extra: tuple[str, ...],
    relative: Callable[..., str | None],
) -> None:
    """Every absolute ``column`` of ``table`` that ``relative`` recognises, made relative,
    in chunks by id (a large instance table is not read into memory at once)."""
    columns = ", ".join(("id", column, *extra))
    select = sa.text(
        f"SELECT {columns} FROM {table} WHERE id > :after AND {column} LIKE '/%' "
        f"ORDER BY id LIMIT {_CHUNK}"
    )
    update = sa.text(f"UPDATE {table} SET {column} = :path WHERE id = :id")
    after = 0
    while True:
        rows = conn.execute(select, {"after": after}).all()
        if not rows:
            return
        changes = [
            {"id": row[0], "path": new}
            for row in rows
            if (new := relative(row[1], *row[2:])) is not None
        ]
        if changes:
            conn.execute(update, changes)
        after = rows[-1][0]


def upgrade() -> None:
    conn = op.get_bind()
    _rewrite(conn, "instance", "spool_path", ("sop_instance_uid",), _instance)
    _rewrite(conn, "store_failure", "quarantine_path", (), _rejected)
    _rewrite(
        conn,
        "emitted_object",
        "path",
        ("study_uid", "series_uid", "sop_instance_uid"),
        _emitted,
    )


def downgrade() -> None:
    """Nothing: the roots are not known here (see the module's text)."""
