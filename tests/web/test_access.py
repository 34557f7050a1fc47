"""Who may see what, against a real server over a seeded database (SQLite and PostgreSQL):
no page or data without a login, a wrong password refused and audited, a viewer who can read
but change nothing and not see the audit trail, the session cookie's flags, patient
identifiers only on the result page, and every view of a result audited."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from ketanode.db.models import AuditEvent
from ketanode.web.auth import MAX_FAILURES
from ketanode.web.server import WebServer
from tests.web.conftest import Served, web_settings
from tests.web.webtools import ADMIN, DATA, PAGES, PATIENT, VIEWER, csrf_of, login

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _audit(served: Served, kind: str, **where: str) -> list[AuditEvent]:
    with served.sessions() as s:
        query = select(AuditEvent).where(AuditEvent.kind == kind)
        for column, value in where.items():
            query = query.where(getattr(AuditEvent, column) == value)
        return list(s.scalars(query))


def test_nothing_without_a_login(served: Served) -> None:
    with httpx.Client(base_url=served.url, follow_redirects=False) as anon:
        for path in PAGES:
            r = anon.get(path)
            assert r.status_code == 303, (path, r.status_code)
            assert r.headers["location"].startswith("/login"), path
        for path in DATA:
            r = anon.get(path)
            assert r.status_code == 401, (path, r.status_code)
            assert r.json() == {"detail": "login required"}
        # a stale or forged cookie is no login
        anon.cookies.set("ketanode_session", "eyJ1aWQiOiAxfQ==.forged.signature")
        assert anon.get("/results").status_code == 303
        # what needs no login
        assert anon.get("/login").status_code == 200
        assert anon.get("/static/style.css").status_code == 200
        assert anon.get("/health").status_code == 200
        assert anon.get("/metrics").status_code == 200  # web.metrics_public (default)
        # no OpenAPI / Swagger pages (they would fetch JavaScript from a CDN)
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert anon.get(path).status_code in (401, 404), path


def test_a_wrong_password_is_refused_and_audited(served: Served) -> None:
    with httpx.Client(base_url=served.url, follow_redirects=False) as client:
        form = client.get("/login")
        assert "RESEARCH USE ONLY" in form.text
        r = client.post(
            "/login",
            data={"username": ADMIN[0], "password": "not-the-password", "csrf": csrf_of(form.text)},
        )
        assert r.status_code == 401
        assert "Wrong user name or password" in r.text
        assert client.get("/results").status_code == 303  # still not logged in
        # the form's CSRF token is required
        r = client.post("/login", data={"username": ADMIN[0], "password": ADMIN[1]})
        assert r.status_code == 400
        assert client.get("/results").status_code == 303
    refused = _audit(served, "login", actor=ADMIN[0], outcome="refused")
    assert refused and all(e.address == "127.0.0.1" for e in refused)
    assert all("not-the-password" not in str(e.detail) for e in refused)


def test_session_cookie_flags_and_no_open_redirect(served: Served) -> None:
    with httpx.Client(base_url=served.url, follow_redirects=False) as client:
        form = client.get("/login")
        r = client.post(
            "/login",
            data={
                "username": VIEWER[0],
                "password": VIEWER[1],
                "csrf": csrf_of(form.text),
                "next": "//evil.example/steal",
            },
        )
        assert r.status_code == 303
        assert r.headers["location"] == "/results"  # not another site
        cookie = r.headers["set-cookie"].lower()
        assert cookie.startswith("ketanode_session=")
        assert "httponly" in cookie and "samesite=lax" in cookie
        assert "secure" not in cookie  # plain HTTP here; tests/web/test_node_web.py: HTTPS
        page = client.get("/results")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script" not in csp
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["x-content-type-options"] == "nosniff"


def test_a_viewer_reads_but_changes_nothing_and_no_admin_pages(served: Served) -> None:
    with login(served.url, *VIEWER) as viewer:
        for path in [p for p in PAGES if p not in ("/", "/audit")] + DATA:
            r = viewer.get(path)
            assert r.status_code == 200, (path, r.status_code)
            if r.headers["content-type"].startswith("text/html"):
                assert "RESEARCH USE ONLY" in r.text, path
        assert viewer.get("/audit").status_code == 403
        assert "administrators only" in viewer.get("/audit", headers={"accept": "text/html"}).text
        assert "/audit" not in viewer.get("/results").text  # no link either
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            for path in ["/results", "/results/1", "/outbox", "/jobs", "/api/results", "/audit"]:
                r = viewer.request(method, path)
                assert r.status_code == 405, (method, path, r.status_code)
        assert viewer.put("/login").status_code == 405
        # logout is a form with the session's CSRF token; without it nothing happens
        assert viewer.post("/logout").status_code == 303
        assert viewer.get("/results").status_code == 200
        token = csrf_of(viewer.get("/results").text)
        assert viewer.post("/logout", data={"csrf": token}).status_code == 303
        assert viewer.get("/results").status_code == 303
    assert _audit(served, "logout", actor=VIEWER[0])

    with login(served.url, *ADMIN) as admin:
        audit = admin.get("/audit")
        assert audit.status_code == 200
        assert "refused" in audit.text or "login" in audit.text


def test_patient_identifiers_only_on_the_result_page_and_views_audited(served: Served) -> None:
    seeded = served.seeded
    with login(served.url, *VIEWER) as viewer:
        for path in ["/results", "/series", "/jobs", "/outbox", "/plots", "/api/results"]:
            text = viewer.get(path).text
            for value in PATIENT.values():
                assert value not in text, (path, value)
        listing = viewer.get("/results").text
        assert "DEMONSTRATION MODEL (synthetic)" in listing
        assert "0.812" in listing and "responder" in listing and "not scored" in listing

        page = viewer.get(f"/results/{seeded.scored_result}")
        assert page.status_code == 200
        assert PATIENT["patient_id"] in page.text
        for key in ("patient_name", "patient_birth_date", "accession_number"):
            assert PATIENT[key] not in page.text, key
        assert f'src="/results/{seeded.scored_result}/report.png"' in page.text
        assert "RESEARCH USE ONLY" in page.text and "DEMONSTRATION MODEL" in page.text

        # the PNG copy, and the SC's own pixels where the PNG is missing
        for result_id, size in (
            (seeded.scored_result, (80, 60)),
            (seeded.not_scored_result, (50, 40)),
        ):
            image = viewer.get(f"/results/{result_id}/report.png")
            assert image.status_code == 200
            assert image.headers["content-type"] == "image/png"
            assert image.content.startswith(PNG_MAGIC)
            width = int.from_bytes(image.content[16:20], "big")
            height = int.from_bytes(image.content[20:24], "big")
            assert (width, height) == size
        assert viewer.get("/results/999999").status_code == 404

    views = _audit(served, "result_view", actor=VIEWER[0])
    subjects = {(e.subject, (e.detail or {}).get("view")) for e in views}
    assert (f"result:{seeded.scored_result}", "page") in subjects
    assert (f"result:{seeded.scored_result}", "report_image") in subjects
    assert (f"result:{seeded.not_scored_result}", "report_image") in subjects


def test_pages_show_series_jobs_outbox_and_plots(served: Served) -> None:
    with login(served.url, *ADMIN) as admin:
        series = admin.get("/series").text
        assert "localizer" in series and "image type LOCALIZER is excluded" in series
        jobs = admin.get("/jobs").text
        assert "QC failed: snr = 2.1" in jobs and "segment 21.0" in jobs
        outbox = admin.get("/outbox").text
        for text in ("retrying", "dead", "sent", "pending", "association rejected"):
            assert text in outbox, text
        for name in ("results-per-day", "probability", "step-times", "ingest"):
            svg = admin.get(f"/plots/{name}.svg")
            assert svg.headers["content-type"].startswith("image/svg+xml")
            assert svg.text.lstrip().startswith("<?xml") and "<svg" in svg.text
            assert "no data yet" not in svg.text, name
        assert admin.get("/plots/nope.svg").status_code == 404
        api = admin.get("/api/results").json()
        assert {r["status"] for r in api} == {"scored", "not_scored"}


def test_metrics_need_a_login_when_not_public(
    served: Served, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = web_settings(
        tmp_path_factory.mktemp("private"),
        served.settings.database.url,
        {"web": {"metrics_public": False}},
    )
    server = WebServer(settings, served.sessions, served.timers)
    server.start()
    try:
        assert httpx.get(server.url + "/metrics").status_code == 401
        # the cookie of the first server is not valid here unless the secret matches (it
        # does: same test secret), so log in to this server
        with login(server.url, *VIEWER) as viewer:
            r = viewer.get("/metrics")
            assert r.status_code == 200 and "ketanode_results_total" in r.text
    finally:
        server.stop()


def test_too_many_failed_logins_are_throttled(
    served: Served, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = web_settings(tmp_path_factory.mktemp("throttle"), served.settings.database.url)
    server = WebServer(settings, served.sessions, served.timers)  # its own throttle
    server.start()
    try:
        with httpx.Client(base_url=server.url, follow_redirects=False) as client:
            token = csrf_of(client.get("/login").text)
            codes = [
                client.post(  # other accounts each time: the address's own limit
                    "/login",
                    data={"username": f"nobody-{i}", "password": f"guess-{i}", "csrf": token},
                ).status_code
                for i in range(MAX_FAILURES + 1)
            ]
            assert codes == [401] * MAX_FAILURES + [429]
            # even the right password is refused from this address for a while
            r = client.post(
                "/login", data={"username": VIEWER[0], "password": VIEWER[1], "csrf": token}
            )
            assert r.status_code == 429
    finally:
        server.stop()
    assert _audit(served, "login", actor=VIEWER[0], outcome="throttled")
