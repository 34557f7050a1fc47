"""The dashboard in a real browser (headless Chromium driven by Playwright) over a real
node that produced a real result end to end: a held-out synthetic phantom sent with DCMTK
storescu is measured, predicted by the demonstration model and reported; the SR and report
image go to Orthanc (the PACS) and to a destination that is down (rows retrying). A
localizer sent alongside is ignored with its reason. Built once for the module (~1 min).

Shown: login (a wrong password first), the result in the list with the demonstration-model
marker and no patient identifiers, its page with the report image loaded (naturalWidth > 0)
and the patient ID, the jobs / outbox / ignored-series pages, the plots, a viewer without
the audit page, and /metrics' dispatch counters moving when the objects are sent.

``KETANODE_SCREENSHOTS=docs/screenshots python -m pytest tests/web/test_browser.py`` saves
screenshots of the main pages (the ones in README.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page
from sqlalchemy import select

from ketanode.db.models import AuditEvent, OutboxItem, Result
from ketanode.node import Node
from ketanode.synthetic.demo_model import held_out_cohort
from ketanode.synthetic.phantom import make_phantom
from ketanode.synthetic.series_writer import SeriesSpec
from tests.integration.conftest import build_settings
from tests.integration.dicomtools import small_series
from tests.peers import Orthanc
from tests.support import REPO, chromium, free_port, storescu, wait_for
from tests.web.test_health_metrics import samples
from tests.web.webtools import ADMIN, VIEWER, add_users

PATIENT = SeriesSpec(
    patient_name="SYNTHETIC^BROWSER",
    patient_id="SYN-WEB-0042",
    patient_birth_date="19720304",
    accession_number="SYNACC0042",
    series_description="T1 MPRAGE",
)
SHOTS = os.environ.get("KETANODE_SCREENSHOTS")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


@dataclass
class EndToEnd:
    node: Node
    url: str
    orthanc: Orthanc
    metrics_before: str
    result_id: int
    log: Collect


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EndToEnd]:
    root = tmp_path_factory.mktemp("e2e")
    log = Collect()
    watched = [logging.getLogger(n) for n in ("ketanode", "uvicorn")]
    levels = [w.level for w in watched]
    for logger in watched:
        logger.addHandler(log)
        logger.setLevel(logging.DEBUG)
    orthanc = Orthanc(root / "orthanc", node_port=1, node_ae="KETANODE").start()
    destinations: list[dict[str, Any]] = [
        {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
        {"name": "offline", "ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()},
    ]
    settings = build_settings(
        root / "node",
        f"sqlite:///{root / 'ketanode.db'}",
        {
            "pipeline": {"measure": True},
            "model": {"predict": True, "demo_when_none_active": True},
            "web": {"enabled": True, "port": 0},
            "destinations": destinations,
            # the offline destination keeps retrying (one try, then a long wait)
            "dispatch": {"backoff_initial_seconds": 600, "max_attempts": 5},
        },
    )
    node = Node(settings)
    node.start()
    try:
        assert node.web is not None
        url = node.web.url
        add_users(node.sessions)
        before = httpx.get(url + "/metrics").text

        t1 = make_phantom(held_out_cohort(voxel_mm=1.5).phantom_spec(2, 1))
        files = t1.write_dicom(root / "t1", PATIENT)
        localizer = small_series(
            root / "loc",
            3,
            voxel_mm=(6.0, 1.0, 1.0),
            study_uid=PATIENT.study_uid,
            series_number=1,
            mr_acquisition_type="2D",
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            series_description="localizer",
            patient_id=PATIENT.patient_id,
        )
        storescu(node.address[1] if node.address else 0, [*localizer, *files])

        def sent_to_pacs() -> bool:
            with node.sessions() as s:
                states = s.scalars(
                    select(OutboxItem.state).where(OutboxItem.destination == "pacs")
                ).all()
            return len(states) == 2 and set(states) == {"sent"}

        wait_for(sent_to_pacs, 300, 0.5, "the SR and report image to reach Orthanc")
        with node.sessions() as s:
            result_id = s.scalars(select(Result.id)).one()
        yield EndToEnd(node, url, orthanc, before, result_id, log)
    finally:
        node.stop()
        orthanc.stop()
        for logger, level in zip(watched, levels, strict=True):
            logger.removeHandler(log)
            logger.setLevel(level)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Browser, e2e: EndToEnd) -> Iterator[Page]:
    context = browser.new_context(base_url=e2e.url, viewport={"width": 1440, "height": 900})
    tab = context.new_page()
    yield tab
    context.close()


def _login(page: Page, user: tuple[str, str], goto: str = "/results") -> None:
    page.goto(goto)
    assert "/login" in page.url
    page.fill("input[name=username]", user[0])
    page.fill("input[name=password]", user[1])
    page.click("button[type=submit]")
    page.wait_for_load_state()


def _shot(page: Page, name: str) -> None:
    if SHOTS:
        out = Path(SHOTS) if Path(SHOTS).is_absolute() else REPO / SHOTS
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / f"{name}.png"), full_page=True)


def _loaded(page: Page, selector: str) -> int:
    """naturalWidth of an <img> once it finished loading (0: broken)."""
    page.wait_for_function(
        "s => [...document.querySelectorAll(s)].every(i => i.complete)", arg=selector
    )
    return int(page.eval_on_selector(selector, "img => img.naturalWidth"))


def test_login_and_the_result_in_the_list(page: Page, e2e: EndToEnd) -> None:
    page.goto("/results")
    assert "/login" in page.url
    assert "RESEARCH USE ONLY" in page.inner_text("body")
    page.fill("input[name=username]", ADMIN[0])
    page.fill("input[name=password]", "wrong password")
    page.click("button[type=submit]")
    assert "Wrong user name or password" in page.inner_text(".error")
    page.fill("input[name=username]", ADMIN[0])
    page.fill("input[name=password]", ADMIN[1])
    page.click("button[type=submit]")
    page.wait_for_url("**/results")
    row = page.locator("#results tbody tr", has=page.locator(f"a[href='/results/{e2e.result_id}']"))
    text = row.inner_text()
    assert "responder" in text and "scored" in text and "DEMONSTRATION MODEL (synthetic)" in text
    assert "2/4 sent" in text  # pacs sent, offline retrying
    body = page.content()
    for value in ("SYN-WEB-0042", "SYNTHETIC^BROWSER", "19720304", "SYNACC0042"):
        assert value not in body
    assert "RESEARCH USE ONLY" in page.inner_text("body")
    _shot(page, "results")


def test_result_page_shows_the_report_image_and_values(page: Page, e2e: EndToEnd) -> None:
    _login(page, VIEWER)
    page.click(f"a[href='/results/{e2e.result_id}']")
    page.wait_for_url(f"**/results/{e2e.result_id}")
    assert _loaded(page, "#report-image") > 1000  # the report page, not a broken icon
    text = page.inner_text("body")
    assert "SYN-WEB-0042" in text  # the patient ID, on this page only
    assert "SYNTHETIC^BROWSER" not in text and "SYNACC0042" not in text
    assert "DEMONSTRATION MODEL" in text and "RESEARCH USE ONLY" in text
    assert page.locator("#qc tbody tr").count() >= 5
    assert page.locator("#volumes tbody tr", has_text="gm_left_frontal").count() == 1
    assert page.locator("#objects tbody tr", has_text="retrying").count() == 2
    with e2e.node.sessions() as s:
        views = s.scalars(
            select(AuditEvent.detail).where(
                AuditEvent.kind == "result_view",
                AuditEvent.actor == VIEWER[0],
                AuditEvent.subject == f"result:{e2e.result_id}",
            )
        ).all()
    assert {(d or {}).get("view") for d in views} == {"page", "report_image"}
    _shot(page, "result")


def test_plots(page: Page, e2e: EndToEnd) -> None:
    _login(page, VIEWER, "/plots")
    page.wait_for_url("**/plots")
    images = page.locator("img.plot")
    assert images.count() == 4
    for name in ("results-per-day", "probability", "step-times", "ingest"):
        assert _loaded(page, f"#plot-{name}") > 300, name
    _shot(page, "plots")


def test_jobs_outbox_and_ignored_series(page: Page, e2e: EndToEnd) -> None:
    _login(page, ADMIN, "/jobs")
    page.wait_for_url("**/jobs")
    job = page.locator("#jobs tbody tr").first.inner_text()
    assert "done" in job and "segment" in job and "predict" in job and "report" in job
    _shot(page, "jobs")
    page.goto("/outbox")
    summary = page.locator("#outbox-summary").inner_text()
    assert "pacs" in summary and "offline" in summary
    rows = page.locator("#outbox tbody tr")
    assert rows.count() == 4
    assert page.locator("#outbox tbody tr", has_text="retrying").count() == 2
    _shot(page, "outbox")
    page.goto("/series")
    ignored = page.locator("#series tbody tr").first.inner_text()
    assert "localizer" in ignored and "not a structural 3D T1" in ignored
    _shot(page, "series")
    page.goto("/audit")
    assert page.locator("#audit tbody tr", has_text="refused").count() >= 1
    assert "SYN-WEB-0042" not in page.content()


def test_viewer_has_no_audit_page(page: Page, e2e: EndToEnd) -> None:
    _login(page, VIEWER)
    assert page.locator("nav a[href='/audit']").count() == 0
    response = page.goto("/audit")
    assert response is not None and response.status == 403
    assert "administrators only" in page.inner_text("body")


def test_metrics_dispatch_counters_move_when_objects_are_sent(e2e: EndToEnd) -> None:
    before = samples(e2e.metrics_before)
    after = samples(httpx.get(e2e.url + "/metrics").text)
    pacs = (("destination", "pacs"),)
    offline = (("destination", "offline"),)
    assert before.get(("ketanode_dispatch_attempts_total", pacs), 0) == 0
    assert after[("ketanode_dispatch_attempts_total", pacs)] == 2
    assert after[("ketanode_dispatch_sent_total", pacs)] == 2
    assert after[("ketanode_dispatch_failures_total", pacs)] == 0
    assert after[("ketanode_dispatch_failures_total", offline)] >= 2
    assert after[("ketanode_dispatch_sent_total", offline)] == 0
    assert after[("ketanode_results_total", (("status", "scored"),))] == 1
    received = after[("ketanode_instances_received_total", ())]
    assert received > before[("ketanode_instances_received_total", ())] + 100
    assert after[("ketanode_series_completed_total", (("state", "ignored"),))] == 1
    assert after[("ketanode_job_duration_seconds_count", (("state", "done"),))] == 1
    assert len(e2e.orthanc.find("Instance", Modality="SR")) == 1
    health = httpx.get(e2e.url + "/health").json()
    assert health["status"] == "ok" and health["scheduler"]["running"] is True


def test_the_url_is_logged_and_no_patient_identifier_is(e2e: EndToEnd) -> None:
    """Run last in the module: every page above was served by then."""
    assert any(f"dashboard, /metrics and /health at {e2e.url}" in line for line in e2e.log.lines)
    assert len(e2e.log.lines) > 20
    for value in ("SYN-WEB-0042", "SYNTHETIC^BROWSER", "19720304", "SYNACC0042"):
        leaked = [line for line in e2e.log.lines if value in line]
        assert not leaked, leaked[:3]
