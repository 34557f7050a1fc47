"""Dashboard users (admin/users.py) and ``ketanode users ...``, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from ketanode.admin.users import add_user, authenticate, disable_user, list_users, set_password
from ketanode.cli.admin import users_app
from ketanode.db.migrate import upgrade
from ketanode.db.models import AuditEvent, User
from ketanode.db.session import make_engine, make_session_factory
from tests.support import write_config

PASSWORD = "correct horse battery"


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _audit(sessions: sessionmaker[Session], kind: str) -> list[AuditEvent]:
    with sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.kind == kind)))


def _login(sessions: sessionmaker[Session], name: str, password: str) -> User | None:
    with sessions.begin() as s:
        return authenticate(s, name, password, address="10.0.0.9")


def test_add_authenticate_refuse_disable(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        add_user(s, "alice", PASSWORD, "admin", actor="cli:root")
    with sessions() as s:
        (user,) = list_users(s)
    assert (user.username, user.role, user.disabled) == ("alice", "admin", False)
    # the hash is argon2id, salted, and is not the password
    assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
    assert user.last_login_at is None

    ok = _login(sessions, "alice", PASSWORD)
    assert ok is not None and ok.username == "alice" and ok.last_login_at is not None
    # a wrong password and an unknown user get the same answer and the same audit row
    assert _login(sessions, "alice", PASSWORD + "x") is None
    assert _login(sessions, "mallory", PASSWORD) is None
    logins = _audit(sessions, "login")
    assert [(e.actor, e.outcome) for e in logins] == [
        ("alice", "ok"),
        ("alice", "refused"),
        ("mallory", "refused"),
    ]
    refused = [(e.subject, e.detail, e.address) for e in logins if e.outcome == "refused"]
    assert refused == [(None, None, "10.0.0.9")] * 2
    assert logins[0].subject == f"user:{user.id}" and logins[0].address == "10.0.0.9"

    # new password: the old one stops working
    with sessions.begin() as s:
        set_password(s, "alice", "another long secret", actor="cli:root")
    assert _login(sessions, "alice", PASSWORD) is None
    assert _login(sessions, "alice", "another long secret") is not None

    # disabled: refused even with the right password
    with sessions.begin() as s:
        disable_user(s, "alice", actor="cli:root")
    assert _login(sessions, "alice", "another long secret") is None
    assert _audit(sessions, "login")[-1].outcome == "refused"

    changes = _audit(sessions, "user")
    assert [(e.actor, e.subject, (e.detail or {})["action"]) for e in changes] == [
        ("cli:root", f"user:{user.id}", "add"),
        ("cli:root", f"user:{user.id}", "password"),
        ("cli:root", f"user:{user.id}", "disable"),
    ]
    # no audit row carries a password
    with sessions() as s:
        everything = " ".join(str(vars(e)) for e in s.scalars(select(AuditEvent)))
    assert PASSWORD not in everything and "another long secret" not in everything


@pytest.mark.parametrize(
    ("name", "password", "role", "message"),
    [
        ("bob", "short", "viewer", "at least 10 characters"),
        ("bob", "", "viewer", "at least 10 characters"),
        ("bob", PASSWORD, "root", "unknown role"),
        ("", PASSWORD, "viewer", "username"),
        ("alice", PASSWORD, "viewer", "already exists"),
    ],
)
def test_add_refuses_bad_input(
    sessions: sessionmaker[Session], name: str, password: str, role: str, message: str
) -> None:
    with sessions.begin() as s:
        add_user(s, "alice", PASSWORD, "viewer")
    with pytest.raises(ValueError, match=message), sessions.begin() as s:
        add_user(s, name, password, role)
    with sessions() as s:
        assert [u.username for u in list_users(s)] == ["alice"]
    assert len(_audit(sessions, "user")) == 1


def test_cli_users_add_list_passwd_disable(
    db_url: str, sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "KETANODE_CONFIG", str(write_config(tmp_path / "k.toml", {"database": {"url": db_url}}))
    )
    runner = CliRunner()
    res = runner.invoke(
        users_app, ["add", "carol", "--role", "admin", "--password-stdin"], input=PASSWORD + "\n"
    )
    assert res.exit_code == 0, res.output
    assert _login(sessions, "carol", PASSWORD) is not None
    # refused with the reason: duplicate, short password
    res = runner.invoke(users_app, ["add", "carol", "--password-stdin"], input=PASSWORD + "\n")
    assert res.exit_code == 1 and "already exists" in res.output
    res = runner.invoke(users_app, ["add", "dave", "--password-stdin"], input="short\n")
    assert res.exit_code == 1 and "at least 10 characters" in res.output
    # prompted twice (hidden) without --password-stdin
    res = runner.invoke(users_app, ["passwd", "carol"], input="a new long secret\n" * 2)
    assert res.exit_code == 0, res.output
    assert _login(sessions, "carol", "a new long secret") is not None
    res = runner.invoke(users_app, ["disable", "carol"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(users_app, ["list", "--json"])
    assert res.exit_code == 0, res.output
    assert '"username": "carol"' in res.output and '"disabled": true' in res.output
    assert "argon2" not in res.output
    actors = {e.actor for e in _audit(sessions, "user")}
    assert len(actors) == 1 and actors.pop().startswith("cli:")
