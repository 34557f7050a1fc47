"""/health and /metrics against a real server: the health fields, 503 when the database is
unreachable or the scheduler stopped; /metrics in Prometheus text format with the counts of
the seeded rows (SQLite and PostgreSQL), and ``ketanode_database_up 0`` without a database.
The dispatch counters moving with a real send: tests/web/test_browser.py."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ketanode.db.session import make_engine, make_session_factory
from ketanode.scheduler import Timers
from ketanode.web.server import WebServer
from tests.support import free_port
from tests.web.conftest import Served, web_settings
from tests.web.webtools import VIEWER, csrf_of, login


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a /metrics page (parsed by prometheus_client)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def test_health_reports_database_spool_and_scheduler(served: Served) -> None:
    r = httpx.get(served.url + "/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert body["database"] == {"ok": True}
    assert body["spool"]["ok"] is True and body["spool"]["free_bytes"] > 2**20
    assert body["spool"]["min_free_bytes"] == 2**20
    assert body["scheduler"] == {"running": True}
    assert served.settings.database.url not in r.text


def test_metrics_count_the_rows(served: Served) -> None:
    r = httpx.get(served.url + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    seeded = served.seeded
    assert m[("ketanode_database_up", ())] == 1
    assert m[("ketanode_instances_received_total", ())] == seeded.instances
    assert m[("ketanode_series_completed_total", (("state", "ignored"),))] == 1
    assert m[("ketanode_series_completed_total", (("state", "done"),))] == 1
    assert m[("ketanode_series_completed_total", (("state", "failed"),))] == 1
    for state, n in seeded.jobs.items():
        assert m[("ketanode_jobs", (("state", state),))] == n
    assert m[("ketanode_results_total", (("status", "scored"),))] == 1
    assert m[("ketanode_results_total", (("status", "not_scored"),))] == 1
    # the seeded scored result is a demonstration model's: counted as such (issue 12)
    assert m[("ketanode_demo_results_total", ())] == 1
    assert m[("ketanode_results_by_class_total", (("class", "responder"),))] == 1
    done = (("state", "done"),)
    assert m[("ketanode_job_duration_seconds_count", done)] == 1
    assert m[("ketanode_job_duration_seconds_sum", done)] == pytest.approx(seeded.done_job_seconds)
    assert m[("ketanode_job_duration_seconds_bucket", (("le", "30.0"), ("state", "done")))] == 0
    assert m[("ketanode_job_duration_seconds_bucket", (("le", "45.0"), ("state", "done")))] == 1
    assert m[("ketanode_job_duration_seconds_bucket", (("le", "+Inf"), ("state", "failed")))] == 1
    assert m[("ketanode_job_step_seconds_sum", (("step", "segment"),))] == pytest.approx(21.0)
    for dest in ("pacs", "archive"):
        label = (("destination", dest),)
        assert m[("ketanode_dispatch_attempts_total", label)] == seeded.attempts[dest]
        assert m[("ketanode_dispatch_sent_total", label)] == seeded.sent[dest]
        failures = seeded.attempts[dest] - seeded.sent[dest]
        assert m[("ketanode_dispatch_failures_total", label)] == failures
    assert m[("ketanode_outbox_items", (("destination", "pacs"), ("state", "dead")))] == 1


def test_the_embedded_node_shows_no_cluster(served: Served) -> None:
    """Without cluster mode: no cluster metrics, no cluster page and no menu entry for it, and
    /health keeps its fields (the cluster's are in tests/cluster/test_cluster_web.py)."""
    text = httpx.get(served.url + "/metrics").text
    names = {name for name, _ in samples(text)}
    assert not {n for n in names if n.startswith(("ketanode_cluster", "ketanode_queue_"))}
    assert "ketanode_broker_up" not in names and "ketanode_worker_jobs_running" not in names
    assert set(httpx.get(served.url + "/health").json()) == {
        "status",
        "version",
        "database",
        "spool",
        "scheduler",
    }
    with login(served.url, *VIEWER) as client:
        assert client.get("/cluster").status_code == 404
        assert client.get("/api/cluster").status_code == 404
        page = client.get("/jobs")
        assert page.status_code == 200 and 'href="/cluster"' not in page.text


def test_unhealthy_without_database_or_scheduler(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    closed = free_port()  # nothing listens there
    settings = web_settings(
        tmp_path_factory.mktemp("down"), f"postgresql://postgres@127.0.0.1:{closed}/ketanode"
    )
    engine = make_engine(settings.database.url)
    timers = Timers()
    timers.start()
    server = WebServer(settings, make_session_factory(engine), timers)
    server.start()
    try:
        r = httpx.get(server.url + "/health", timeout=30)
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "unhealthy"
        assert body["database"] == {"ok": False}
        assert body["scheduler"] == {"running": True} and body["spool"]["ok"] is True
        assert str(closed) not in r.text  # no connection details
        m = samples(httpx.get(server.url + "/metrics", timeout=30).text)
        assert m[("ketanode_database_up", ())] == 0
        # the login page still renders; a login answers 503 with a page that says why
        with httpx.Client(base_url=server.url, timeout=30) as client:
            form = client.get("/login")
            assert form.status_code == 200
            r = client.post(
                "/login",
                data={"username": "a", "password": "b", "csrf": csrf_of(form.text)},
                headers={"accept": "text/html"},
            )
            assert r.status_code == 503 and "database is not available" in r.text
        timers.stop()
        body = httpx.get(server.url + "/health", timeout=30).json()
        assert body["scheduler"] == {"running": False}
    finally:
        server.stop()
        timers.stop()
        engine.dispose()


def test_metrics_show_the_front_ends_backlog(served: Served) -> None:
    """Files the native front end acknowledged and the node has not indexed, and those
    whose indexing failed, read from its directory at scrape time."""
    listener = served.settings.spool.path / "incoming" / "host_KETANODE_11112"
    listener.mkdir(parents=True)
    try:
        m = samples(httpx.get(served.url + "/metrics").text)
        assert m[("ketanode_received_not_indexed", ())] == 0
        for name in ("1-2-1-1.dcm", "1-2-1-2.dcm", "1-2-1-3.failed", "1-2-1-4.part"):
            (listener / name).write_bytes(b"x")
        m = samples(httpx.get(served.url + "/metrics").text)
        assert m[("ketanode_received_not_indexed", ())] == 2
        assert m[("ketanode_received_index_failed", ())] == 1
    finally:
        for path in listener.iterdir():
            path.unlink()
        listener.rmdir()
