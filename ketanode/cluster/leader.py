"""Which scheduler is the active one: the holder of a PostgreSQL session advisory lock.

The lock is held on a dedicated connection for as long as the scheduler lives. When its
process dies the server closes the connection and frees the lock at once; when its host
dies or is cut off, TCP keepalives (set on both ends, ~15 s) end the session. A standby
tries the lock every ``cluster.standby_poll_seconds`` and takes over when it gets it. The
active scheduler checks its connection as often; if the connection is gone it stops being
active (the process then exits, and its supervisor starts it again as a standby).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

from ketanode.db.session import normalise_url

logger = logging.getLogger(__name__)

LOCK_NAME = "ketanode.scheduler"
# a fixed 63-bit key derived from the name (advisory lock keys are per database)
LOCK_KEY = int.from_bytes(hashlib.sha256(LOCK_NAME.encode()).digest()[:8], "big") >> 1

_KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}


class LeaderLock:
    def __init__(self, url: str, key: int = LOCK_KEY) -> None:
        if not normalise_url(url).startswith("postgresql"):
            raise ValueError("the scheduler lock needs PostgreSQL")
        self.key = key
        self.engine = create_engine(normalise_url(url), poolclass=NullPool, connect_args=_KEEPALIVE)
        self._conn: Connection | None = None

    @property
    def held(self) -> bool:
        return self._conn is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False when another scheduler holds it (or the
        database cannot be reached)."""
        if self._conn is not None:
            return True
        try:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except Exception as exc:
            logger.warning("scheduler lock: database unreachable (%s)", type(exc).__name__)
            return False
        try:
            # the server too notices a dead client host within ~15 s
            conn.execute(text("SET tcp_keepalives_idle = 5"))
            conn.execute(text("SET tcp_keepalives_interval = 2"))
            conn.execute(text("SET tcp_keepalives_count = 3"))
            got = bool(
                conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
            )
        except Exception:
            logger.exception("scheduler lock: could not try the lock")
            conn.close()
            return False
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def check(self) -> bool:
        """Whether the lock is still held (its connection answers)."""
        if self._conn is None:
            return False
        try:
            held = self._conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND pid = pg_backend_pid() AND granted "
                    "AND ((classid::bigint << 32) | objid::bigint) = :k"
                ),
                {"k": self.key},
            ).scalar()
        except Exception as exc:
            logger.error("scheduler lock: connection lost (%s)", type(exc).__name__)
            self._drop()
            return False
        if not held:
            logger.error("scheduler lock: no longer held")
            self._drop()
            return False
        return True

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self._drop()
        self.engine.dispose()
