"""GroupCommit (receive/store.py): the row transactions of concurrent C-STOREs committed
together, each in its own savepoint; nobody returns before the commit holding its rows."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ketanode.db.session import make_engine, make_session_factory
from ketanode.receive.store import GroupCommit

META = MetaData()
ITEMS = Table(
    "items",
    META,
    Column("id", Integer, primary_key=True),
    Column("name", String(32), unique=True, nullable=False),
)


@pytest.fixture
def committer(tmp_path: Path) -> GroupCommit:
    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    META.create_all(engine)
    return GroupCommit(make_session_factory(engine), threading.Lock())


def _count(gc: GroupCommit) -> int:
    # a plain reader (the node's sessions begin IMMEDIATE: they would wait for the writer)
    url = gc.sessions.kw["bind"].url
    with sqlite3.connect(str(url.database)) as conn:
        return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])


def _adder(name: str):  # type: ignore[no-untyped-def]
    def work(session: Session) -> str:
        session.connection().execute(insert(ITEMS).values(name=name))
        return name

    return work


def test_alone_commits_and_returns_its_value(committer: GroupCommit) -> None:
    assert committer.run(_adder("a")) == "a"
    assert _count(committer) == 1
    with pytest.raises(IntegrityError):
        committer.run(_adder("a"))
    assert _count(committer) == 1
    assert (committer.transactions, committer.commits) == (2, 2)


def test_concurrent_transactions_share_commits_and_fail_alone(committer: GroupCommit) -> None:
    """While one commits, the others queue and go in one transaction: a duplicate among
    them is refused alone (its savepoint), the rest is committed."""
    gate = threading.Event()
    entered = threading.Event()

    def slow(session: Session) -> str:
        session.connection().execute(insert(ITEMS).values(name="first"))
        entered.set()
        assert gate.wait(10)
        return "first"

    results: dict[str, object] = {}

    def call(name: str, work) -> None:  # type: ignore[no-untyped-def]
        try:
            results[name] = committer.run(work)
        except Exception as exc:
            results[name] = exc

    leader = threading.Thread(target=call, args=("first", slow))
    leader.start()
    assert entered.wait(10)
    names = [f"n{i}" for i in range(8)] + ["n3"]  # the last one is a duplicate
    threads = [
        threading.Thread(target=call, args=(f"{n}-{i}", _adder(n))) for i, n in enumerate(names)
    ]
    for t in threads:
        t.start()
    while len(committer._pending) < len(names):  # all queued behind the first commit
        threading.Event().wait(0.01)
    assert _count(committer) == 0  # nothing committed yet, nobody answered
    assert results == {}
    gate.set()
    for t in [leader, *threads]:
        t.join(10)
    assert results["first"] == "first"
    ok = {k: v for k, v in results.items() if isinstance(v, str)}
    failed = {k: v for k, v in results.items() if isinstance(v, Exception)}
    assert len(ok) == 9 and len(failed) == 1
    assert isinstance(next(iter(failed.values())), IntegrityError)
    assert _count(committer) == 9
    assert committer.commits == 2  # the first, then the nine queued behind it at once


def test_a_failed_commit_fails_every_transaction_in_it(committer: GroupCommit) -> None:
    def boom(session: Session) -> None:
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        committer.run(boom)
    assert committer.run(_adder("after")) == "after"
    assert _count(committer) == 1
