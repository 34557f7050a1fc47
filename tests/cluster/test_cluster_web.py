"""The dashboard of a cluster (the web role in this process, and as its own process next to
a real scheduler) on a real PostgreSQL and RabbitMQ: /health judges the cluster's active
scheduler from the members table, /metrics and the /cluster page show what ``ketanode
cluster status`` shows (roles alive with hosts and versions, the active scheduler, the
queue depth, the jobs each worker runs), and a broker that does not answer is said so. The
embedded dashboard shows none of this (tests/web/test_health_metrics.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from ketanode import __version__
from ketanode.cli.main import app as cli
from ketanode.cluster.engine import make_celery
from ketanode.cluster.members import Membership
from ketanode.cluster.publisher import Publisher
from ketanode.cluster.status import ClusterReader
from ketanode.config import Settings, merge
from ketanode.node import WebRole
from ketanode.web.metrics import make_registry
from tests.cluster.conftest import BROKER_URL, Cluster, delete_queue, rabbitmq_up
from tests.cluster.test_cluster_parts import _jobs
from tests.support import claim_job, free_port, postgres_database, wait_for, write_config
from tests.web.conftest import web_settings
from tests.web.test_health_metrics import samples
from tests.web.webtools import VIEWER, add_users, login

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not rabbitmq_up(), reason="RabbitMQ is not running at 127.0.0.1:5672"),
]

HEARTBEAT = 0.5


def cluster_settings(root: Path, db_url: str, queue: str, broker: str = BROKER_URL) -> Settings:
    base = web_settings(root, db_url).model_dump(mode="json")
    return Settings.model_validate(
        merge(
            base,
            {
                "cluster": {
                    "enabled": True,
                    "broker_url": broker,
                    "queue": queue,
                    "heartbeat_seconds": HEARTBEAT,
                }
            },
        )
    )


@dataclass
class WebCluster:
    settings: Settings
    role: WebRole
    url: str

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.role.sessions

    def member(self, role: str, active: bool | None = None) -> Membership:
        detail = {} if active is None else {"active": active}
        m = Membership(self.settings.database.url, role, HEARTBEAT, detail=lambda: detail)
        m.start()
        return m


@pytest.fixture
def web_cluster(tmp_path: Path) -> Iterator[WebCluster]:
    queue = f"ketanode.test.{uuid.uuid4().hex[:12]}"
    with postgres_database() as url:
        settings = cluster_settings(tmp_path, url, queue)
        role = WebRole(settings)  # what `ketanode serve --role web` runs
        role.start()
        assert role.web is not None
        add_users(role.sessions)
        try:
            yield WebCluster(settings, role, role.web.url)
        finally:
            role.stop()
            delete_queue(queue)


def health(c: WebCluster) -> tuple[int, dict[str, object]]:
    r = httpx.get(c.url + "/health", timeout=30)
    return r.status_code, r.json()


def test_health_of_a_web_role_judges_the_active_scheduler(web_cluster: WebCluster) -> None:
    c = web_cluster
    code, body = health(c)
    assert code == 503 and body["status"] == "unhealthy" and body["mode"] == "cluster"
    assert body["database"] == {"ok": True} and body["spool"]["ok"] is True  # type: ignore[index]
    assert body["reasons"] == ["no scheduler has run in the last 24 h"]
    standby = c.member("scheduler", active=False)
    active = None
    try:
        code, body = health(c)
        assert code == 503
        assert body["scheduler"]["running"] is False  # type: ignore[index]
        assert "no active scheduler: 1 scheduler(s) alive, all standbys" in str(body["reasons"])
        active = c.member("scheduler", active=True)
        code, body = health(c)
        assert code == 200, body
        assert body["status"] == "ok" and body["reasons"] == []
        scheduler = body["scheduler"]
        assert scheduler["running"] is True and scheduler["standbys"] == 1  # type: ignore[index]
        assert scheduler["active"]["name"] == active.name  # type: ignore[index]
        assert scheduler["active"]["host"] == active.host  # type: ignore[index]
        assert scheduler["active"]["version"] == __version__  # type: ignore[index]
        # the active scheduler's process dies: no heartbeat, then not alive after 3 beats
        active._stop.set()
        assert active._thread is not None
        active._thread.join(5)
        with c.sessions.begin() as session:
            session.execute(
                text(
                    "UPDATE cluster_member SET heartbeat_at = heartbeat_at - interval '10 s' "
                    "WHERE name = :n"
                ),
                {"n": active.name},
            )
        code, body = health(c)
        assert code == 503 and "all standbys" in str(body["reasons"])
        standby.stop()
        code, body = health(c)
        assert code == 503
        (reason,) = body["reasons"]  # type: ignore[misc]
        assert reason.startswith("no scheduler alive: the last one") and active.host in reason
    finally:
        standby.stop()
        if active is not None:
            active.stop()


def test_metrics_page_and_cli_show_the_same_cluster(
    web_cluster: WebCluster, tmp_path: Path
) -> None:
    c = web_cluster
    scheduler = c.member("scheduler", active=True)
    worker = c.member("worker")
    try:
        mine, gone, _queued1, _queued2 = _jobs(c.sessions, 4)
        assert claim_job(c.sessions, mine, f"{worker.host}:1:{worker.token}", 60)
        assert claim_job(c.sessions, gone, "elsewhere:2:deadbeef00", 60)  # a dead worker's
        assert Publisher(c.sessions, c.settings, make_celery(c.settings)).run() == 2
        queue = c.settings.cluster.queue

        m = samples(httpx.get(c.url + "/metrics", timeout=30).text)
        host = worker.host
        assert m[("ketanode_database_up", ())] == 1
        for role, n in (("scheduler", 1), ("worker", 1), ("web", 1)):
            labels = (("host", host), ("role", role), ("version", __version__))
            assert m[("ketanode_cluster_members", labels)] == n
            assert m[("ketanode_cluster_alive", (("role", role),))] == n
        assert m[("ketanode_cluster_alive", (("role", "listener"),))] == 0
        assert m[("ketanode_cluster_scheduler_active", ())] == 1
        assert m[("ketanode_worker_jobs_running", (("host", host), ("worker", worker.name)))] == 1
        assert m[("ketanode_cluster_jobs_unowned", ())] == 1
        assert m[("ketanode_broker_up", ())] == 1
        assert m[("ketanode_queue_depth", (("queue", queue),))] == 2
        assert m[("ketanode_queue_consumers", (("queue", queue),))] == 0

        with httpx.Client(base_url=c.url, timeout=30) as anon:  # behind the login
            r = anon.get("/cluster")
            assert r.status_code == 303 and r.headers["location"].startswith("/login")
            assert anon.get("/api/cluster").status_code == 401
        with login(c.url, *VIEWER) as client:
            page = client.get("/cluster")
            assert page.status_code == 200, page.text[:500]
            html = page.text
            api = client.get("/api/cluster").json()
        assert 'href="/cluster"' in html  # in the menu
        assert f'<td id="active-scheduler">{scheduler.name}</td>' in html
        assert "2 ready, 0 consumers" in html
        row = html[html.index(f'data-name="{worker.name}"') :]
        row = row[: row.index("</tr>")]
        assert f'<td class="jobs">{mine}</td>' in row and __version__ in row and host in row
        assert f"{gone} (re-queued when the lease expires)" in html

        # `ketanode cluster status --json` reads the same function
        cfg = write_config(
            tmp_path / "k.toml",
            {
                "database": {"url": c.settings.database.url},
                "cluster": c.settings.cluster.model_dump(mode="json"),
            },
        )
        res = CliRunner().invoke(cli, ["-c", str(cfg), "cluster", "status", "--json"])
        assert res.exit_code == 0, res.output
        printed = json.loads(res.stdout)
        for key in ("active_scheduler", "alive", "jobs", "queue", "running_not_by_a_live_worker"):
            assert printed[key] == api[key], key
        assert [(m["name"], m.get("running_jobs")) for m in printed["members"]] == [
            (m["name"], m.get("running_jobs")) for m in api["members"]
        ]
        assert api["active_scheduler"] == scheduler.name and api["alive"]["worker"] == 1
    finally:
        worker.stop()
        scheduler.stop()
    m = samples(httpx.get(c.url + "/metrics", timeout=30).text)
    assert m[("ketanode_cluster_scheduler_active", ())] == 0
    assert m[("ketanode_cluster_alive", (("role", "worker"),))] == 0


def test_a_broker_that_does_not_answer_is_said_so(web_cluster: WebCluster, tmp_path: Path) -> None:
    c = web_cluster
    closed = free_port()  # nothing listens there
    settings = cluster_settings(
        tmp_path / "down",
        c.settings.database.url,
        c.settings.cluster.queue,
        broker=f"amqp://guest:guest@127.0.0.1:{closed}//",
    )
    reader = ClusterReader(settings, c.sessions, broker_timeout=1.0)
    status = reader.status()
    assert status["queue"]["messages"] is None and status["queue"]["error"]
    assert status["alive"]["web"] == 1  # the rest is read from the database all the same
    m = samples(generate_latest(make_registry(c.sessions, reader)).decode())
    assert m[("ketanode_broker_up", ())] == 0
    assert not any(name.startswith("ketanode_queue_") for name, _ in m)
    assert m[("ketanode_cluster_alive", (("role", "web"),))] == 1


def test_web_role_process_follows_the_real_schedulers(
    make_cluster: Callable[..., Cluster],
) -> None:
    """The processes: `serve --role web` is healthy while `serve --role scheduler` is
    active (before any listener made the shared spool); the scheduler SIGKILLed, /health
    says so within three heartbeats."""
    cluster = make_cluster()
    web = cluster.web()
    url = f"http://127.0.0.1:{web.port}"

    def health_is(code: int) -> dict[str, object] | None:
        web.check_alive()
        r = httpx.get(url + "/health", timeout=30)
        return r.json() if r.status_code == code else None  # type: ignore[no-any-return]

    body = health_is(503)
    assert body is not None and body["reasons"] == ["no scheduler has run in the last 24 h"]
    # no listener made the shared spool yet: reported, not held against the cluster
    assert body["spool"] == {"ok": None, "exists": False}
    scheduler = cluster.scheduler()
    wait_for(cluster.active_scheduler, 120, interval=0.3, what="an active scheduler")
    body = wait_for(lambda: health_is(200), 30, interval=0.3, what="/health 200")
    active = body["scheduler"]["active"]  # type: ignore[index]
    assert active["name"] == cluster.active_scheduler()
    assert active["name"].endswith(f":{scheduler.pid}:" + active["name"].rsplit(":", 1)[1])
    scheduler.kill()
    body = wait_for(lambda: health_is(503), 30, interval=0.3, what="/health 503")
    (reason,) = body["reasons"]  # type: ignore[index]
    assert reason.startswith("no scheduler alive"), reason
