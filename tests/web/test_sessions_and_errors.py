"""Issue 13, items 11-13, against a real server over a seeded database (SQLite and
PostgreSQL): logout ends the session on the server (a cookie saved before it no longer reads
anything), so do disabling a user and a new password; failed logins are throttled per
address and per account, and a successful login of another account resets neither; a bad id
answers 4xx, never 500; every response, errors included, carries the security headers, and
HSTS when served over HTTPS."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from ketanode.admin.users import add_user, disable_user, set_password
from ketanode.db.models import AuditEvent, WebSession
from ketanode.web.app import HSTS, MAX_ID, SECURITY_HEADERS
from ketanode.web.auth import (
    FAILURE_WINDOW_SECONDS,
    LOCKOUT_SECONDS,
    MAX_ACCOUNT_FAILURES,
    MAX_FAILURES,
    SESSION_COOKIE,
    LoginThrottle,
)
from ketanode.web.server import WebServer
from tests.integration.dicomtools import make_pki
from tests.web.conftest import Served, web_settings
from tests.web.webtools import ADMIN, VIEWER, csrf_of, login

HUGE = "99999999999999999999"  # > 2**63 - 1: no database integer holds it


@contextmanager
def own_server(served: Served, root: Path, **web: object) -> Iterator[WebServer]:
    """A second dashboard on the same database, with a throttle of its own."""
    settings = web_settings(root, served.settings.database.url, {"web": web} if web else None)
    server = WebServer(settings, served.sessions, served.timers)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _sessions_of(served: Served, username: str) -> int:
    from ketanode.admin.users import find_user

    with served.sessions() as s:
        user = find_user(s, username)
        assert user is not None
        return int(
            s.scalar(
                select(func.count()).select_from(WebSession).where(WebSession.user_id == user.id)
            )
            or 0
        )


def _post_login(client: httpx.Client, username: str, password: str) -> int:
    client.cookies.clear()  # a fresh visitor of the login form each time
    token = csrf_of(client.get("/login").text)
    r = client.post("/login", data={"username": username, "password": password, "csrf": token})
    return r.status_code


# --- item 11: logout ends the session ---------------------------------------------------------


def test_logout_ends_the_session_even_for_a_saved_cookie(served: Served) -> None:
    with login(served.url, *VIEWER) as other:  # a second session of the same user
        with login(served.url, *VIEWER) as viewer:
            saved = viewer.cookies.get(SESSION_COOKIE)
            assert saved
            assert viewer.get("/results").status_code == 200
            assert viewer.get("/api/results").status_code == 200
            before = _sessions_of(served, VIEWER[0])
            r = viewer.post("/logout", data={"csrf": csrf_of(viewer.get("/results").text)})
            assert r.status_code == 303 and r.headers["location"] == "/login"
            assert _sessions_of(served, VIEWER[0]) == before - 1
            assert viewer.get("/results").status_code == 303
        # the cookie as it was before the logout, replayed
        with httpx.Client(base_url=served.url, follow_redirects=False) as replay:
            replay.cookies.set(SESSION_COOKIE, saved)
            r = replay.get("/results")
            assert r.status_code == 303 and r.headers["location"].startswith("/login")
            assert replay.get("/api/results").status_code == 401
            assert replay.get(f"/results/{served.seeded.scored_result}").status_code == 303
        # the user's other session is not ended by this logout
        assert other.get("/api/results").status_code == 200
    with served.sessions() as s:
        rows = s.scalars(select(WebSession.token_sha256)).all()
    assert saved not in rows and all(len(t) == 64 for t in rows)  # only hashes are stored


def test_logout_without_the_csrf_token_changes_nothing(served: Served) -> None:
    with login(served.url, *VIEWER) as viewer:
        assert viewer.post("/logout", data={"csrf": "forged"}).status_code == 303
        assert viewer.get("/api/results").status_code == 200


def test_disabling_a_user_or_a_new_password_ends_their_sessions(served: Served) -> None:
    with served.sessions.begin() as s:
        add_user(s, "leaver", "leaver-password-1", role="viewer")
        add_user(s, "mover", "mover-password-1", role="viewer")
    with (
        login(served.url, "leaver", "leaver-password-1") as leaver,
        login(served.url, "mover", "mover-password-1") as mover,
    ):
        assert leaver.get("/api/results").status_code == 200
        assert mover.get("/api/results").status_code == 200
        with served.sessions.begin() as s:
            disable_user(s, "leaver")
            set_password(s, "mover", "mover-password-2")
        assert leaver.get("/api/results").status_code == 401
        assert mover.get("/api/results").status_code == 401
    assert _sessions_of(served, "leaver") == 0 and _sessions_of(served, "mover") == 0


# --- item 12: throttles ------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_per_account_and_per_address() -> None:
    clock = FakeClock()
    t = LoginThrottle(clock)
    # an account is locked after its failures, from any address, whatever the others do
    for i in range(MAX_ACCOUNT_FAILURES - 1):
        assert t.failed(f"10.0.0.{i}", "admin") is False
        t.succeeded(f"10.0.0.{i}", "viewer")  # another account's success resets nothing
        assert t.blocked(f"10.0.0.{i}", "admin") is None
    assert t.failed("10.0.0.99", "admin") is True
    assert t.blocked("10.0.0.200", "admin") == "account"
    assert t.blocked("10.0.0.200", "viewer") is None
    clock.now += LOCKOUT_SECONDS - 1
    assert t.blocked("10.0.0.200", "admin") == "account"
    clock.now += 2
    assert t.blocked("10.0.0.200", "admin") is None  # the lock ends; its count starts again
    assert t.failed("10.0.0.200", "admin") is False
    # an account's own success clears its count (not the address's)
    for _ in range(MAX_ACCOUNT_FAILURES - 1):
        t.failed("10.0.0.50", "carol")
    t.succeeded("10.0.0.50", "carol")
    assert t.failed("10.0.0.50", "carol") is False
    # an address: failures on many accounts, interleaved with successes
    clock.now += FAILURE_WINDOW_SECONDS + 1
    for i in range(MAX_FAILURES):
        assert t.blocked("192.0.2.1", f"user-{i}") is None
        t.failed("192.0.2.1", f"user-{i}")
        t.succeeded("192.0.2.1", "viewer")
    assert t.blocked("192.0.2.1", "viewer") == "address"
    assert t.blocked("192.0.2.2", "viewer") is None
    clock.now += FAILURE_WINDOW_SECONDS + 1  # the window slides
    assert t.blocked("192.0.2.1", "viewer") is None


def test_throttle_forgets_the_stalest_keys_beyond_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ketanode.web.auth as auth

    monkeypatch.setattr(auth, "MAX_TRACKED", 50)
    clock = FakeClock()
    t = LoginThrottle(clock)
    for i in range(500):
        clock.now += 0.01
        t.failed(f"198.51.100.{i % 7}", f"junk-{i}")
    assert len(t._by_account) <= 50 and len(t._by_address) <= 50


def test_guesses_interleaved_with_another_accounts_logins_are_refused(
    served: Served, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The issue's probe: guesses at the admin password between a viewer's logins."""
    with own_server(served, tmp_path_factory.mktemp("throttle-mix")) as server:
        codes = []
        with httpx.Client(base_url=server.url, follow_redirects=False) as client:
            for i in range(27):
                codes.append(_post_login(client, ADMIN[0], f"guess-{i}"))
                if i % 3 == 0:
                    assert _post_login(client, *VIEWER) == 303  # the viewer still gets in
            # the admin's own password is refused while the account is locked
            assert _post_login(client, *ADMIN) == 429
            # guesses at other accounts fill the address's allowance: then nobody gets in
            for i in range(MAX_FAILURES - MAX_ACCOUNT_FAILURES):
                assert _post_login(client, f"nobody-{i}", "guess") == 401
            assert _post_login(client, *VIEWER) == 429
        assert codes == [401] * MAX_ACCOUNT_FAILURES + [429] * (27 - MAX_ACCOUNT_FAILURES)
        # another address is not blocked, but the admin account still is (from anywhere)
        assert server.app.state.login_throttle.blocked("203.0.113.9", VIEWER[0]) is None
        assert server.app.state.login_throttle.blocked("203.0.113.9", ADMIN[0]) == "account"
    with served.sessions() as s:
        details = s.scalars(
            select(AuditEvent.detail).where(
                AuditEvent.kind == "login", AuditEvent.outcome == "throttled"
            )
        ).all()
    assert {"by": "account"} in details and {"by": "address"} in details


# --- item 13: bad ids, headers on every response, HSTS -----------------------------------------


def _has_security_headers(r: httpx.Response, hsts: bool = False) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert r.headers.get(name) == value, (r.request.url, r.status_code, name)
    assert (HSTS[0] in r.headers) is hsts, (r.request.url, r.status_code)
    if hsts:
        assert r.headers[HSTS[0]] == HSTS[1]


def test_bad_ids_answer_4xx_never_500(served: Served) -> None:
    with login(served.url, *VIEWER) as viewer:
        for path in (f"/results/{HUGE}", f"/results/-{HUGE}", f"/results/{HUGE}/report.png"):
            r = viewer.get(path, headers={"accept": "text/html"})
            assert r.status_code == 404, (path, r.status_code)
            assert "text/html" in r.headers["content-type"]
            _has_security_headers(r)
            r = viewer.get(path)
            assert r.status_code == 404 and r.json() == {"detail": "no such id"}, path
        for path in ("/results/0", "/results/-1", f"/results/{MAX_ID}", f"/results/{2**63}"):
            assert viewer.get(path).status_code == 404, path
        for path in ("/results/abc", "/results/1.5", "/results/1e400"):
            assert viewer.get(path).status_code == 422, path


def test_every_response_carries_the_security_headers(
    served: Served, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with own_server(served, tmp_path_factory.mktemp("headers")) as server:

        def boom() -> None:
            raise RuntimeError("PATIENT^SECRET 19610203")

        server.app.add_api_route("/boom", boom, methods=["GET"])
        with httpx.Client(base_url=server.url, follow_redirects=False) as anon:
            answers = [
                anon.get("/login"),
                anon.get("/results"),  # 303
                anon.get("/api/results"),  # 401
                anon.get("/nope"),  # 404
                anon.get("/nope", headers={"accept": "text/html"}),
                anon.put("/results"),  # 405
                anon.post("/login", data={"username": "x"}),  # 422
                anon.get("/static/nope.css"),
                anon.get("/health"),
                anon.get("/metrics"),
            ]
            with caplog.at_level(logging.ERROR, logger="ketanode.web"):
                crashed = anon.get("/boom")
            answers.append(crashed)
            for r in answers:
                _has_security_headers(r)
            assert crashed.status_code == 500 and crashed.json() == {"detail": "internal error"}
            assert [r.status_code for r in answers[1:7]] == [303, 401, 404, 404, 405, 422]
            # the node keeps answering after it
            assert anon.get("/health").status_code == 200
    logged = caplog.text
    assert "RuntimeError" in logged and "/boom" in logged
    assert "PATIENT" not in logged and "19610203" not in logged


def test_hsts_over_https_only(served: Served, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("hsts")
    pki = make_pki(root / "pki")
    with httpx.Client(base_url=served.url) as plain:
        _has_security_headers(plain.get("/login"), hsts=False)
    with own_server(
        served, root, certificate=str(pki.server_cert), private_key=str(pki.server_key)
    ) as server:
        trust = ssl.create_default_context(cafile=str(pki.ca))
        with httpx.Client(base_url=server.url, verify=trust, follow_redirects=False) as client:
            for r in (client.get("/login"), client.get("/nope"), client.put("/x")):
                _has_security_headers(r, hsts=True)
            # no such id for anyone, logged in or not (checked before the login)
            assert client.get(f"/results/{HUGE}").status_code == 404
        with login(server.url, *VIEWER, verify=trust) as viewer:
            r = viewer.get(f"/results/{HUGE}")
            assert r.status_code == 404
            _has_security_headers(r, hsts=True)
