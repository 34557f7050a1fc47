"""Driving the OHIF viewer (tests/peers.py OhifViewer) in headless Chromium: open a study,
load its SR, step through its measurements and read what OHIF draws (the SVG labels)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from playwright.sync_api import Browser, Page
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.support import REPO

SR_SERIES = "ketamine response SR"  # the end of the SR's series description
REPORT_SERIES = "ketamine response report"
DATE_KEYWORDS = (
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "InstanceCreationDate",
    "PatientBirthDate",
)
SUMMARY = re.compile(r"(RESPONDER|NON-RESPONDER|INDETERMINATE), P\(response\) [\d.]+ %")


@dataclass
class SrView:
    """What OHIF drew while stepping through the SR's measurements."""

    labels: list[str] = field(default_factory=list)  # per step, the joined SVG texts
    outlines: int = 0  # long SVG paths/polylines seen on the last step
    errors: list[str] = field(default_factory=list)

    def region_drawn(self, volume_ml: float) -> bool:
        text = f"Grey matter volume: {volume_ml:.2f} ml"
        return any(text in step for step in self.labels)

    @property
    def overall_drawn(self) -> bool:
        return any(
            "Probability of response to ketamine" in s and SUMMARY.search(s) for s in self.labels
        )


@contextmanager
def study_page(browser: Browser, url: str, study_uid: str) -> Iterator[Page]:
    """A new tab on the study in OHIF's viewer, its first-visit tour dismissed; page errors
    are collected in ``page.errors`` (a list attribute added here)."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{url}/viewer?StudyInstanceUIDs={study_uid}")
    page.get_by_text("Skip all").click(timeout=120_000)  # OHIF's first-visit tour
    # the study browser lists the study's series (the SR's among them) once QIDO answered
    page.get_by_text(SR_SERIES, exact=False).wait_for(timeout=120_000)
    page.locator("[data-cy='study-browser-thumbnail']").first.wait_for(timeout=120_000)
    try:
        yield page
    finally:
        context.close()
    if errors:
        raise AssertionError(f"page errors in OHIF: {errors}")


def _labels(page: Page) -> str:
    texts = page.eval_on_selector_all(
        "[data-cy='viewport-pane'] svg text", "els => els.map(e => e.textContent)"
    )
    return " | ".join(str(t) for t in texts)


def view_sr(page: Page, steps: int, shot: Callable[[Page, int], None] | None = None) -> SrView:
    """Load the SR into the viewport and step ``steps`` times through its measurements
    (``shot(page, step)`` after each step is drawn)."""
    # on a busy host OHIF may still be loading the images when the SR is opened: try again
    arrows = "[data-cy='viewport-action-arrows-right']"
    for attempt in range(3):
        page.get_by_text(SR_SERIES, exact=False).dblclick()
        try:
            page.wait_for_selector(arrows, timeout=60_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
    view = SrView()
    for i in range(steps):
        page.wait_for_timeout(1500)
        view.labels.append(_labels(page))
        if shot is not None:
            shot(page, i)
        page.click("[data-cy='viewport-action-arrows-right']")
    page.wait_for_timeout(1500)
    view.outlines = int(
        page.eval_on_selector_all(
            "[data-cy='viewport-pane'] svg path, [data-cy='viewport-pane'] svg polyline",
            "els => els.filter(e => (e.getAttribute('d') || e.getAttribute('points') || '')"
            ".length > 40).length",
        )
    )
    if "Something went wrong" in page.inner_text("body"):
        view.errors.append("OHIF: Something went wrong")
    return view


@dataclass
class Panel:
    """OHIF's measurement panel after the SR's measurements were restored (tracked)."""

    titles: list[str]
    rows: list[str]

    def lists_region(self, feature: str, volume_ml: float) -> bool:
        return f"{region_label(feature)}: {volume_ml:.2f} ml" in self.titles

    @property
    def lists_overall(self) -> bool:
        return any(SUMMARY.search(t) and "RESEARCH USE ONLY" in t for t in self.titles)


def region_label(feature: str) -> str:
    """The name the SR gives a model input's group (``gm_left_frontal`` -> ``left frontal GM``)."""
    return feature.removeprefix("gm_").replace("_", " ") + " GM"


def track_sr(page: Page, shot: Callable[[Page, int], None] | None = None) -> Panel:
    """Open the SR, accept OHIF's offer to track its measurements, open the measurement panel
    and read its rows (``shot(page, 0)`` once the panel is drawn)."""
    page.get_by_text(SR_SERIES, exact=False).dblclick()
    page.locator("[data-cy='yes-hydrate-btn']").click(timeout=120_000)
    panel = page.locator("[data-cy='trackedMeasurements-panel']")
    for button in ("side-panel-header-right", "trackedMeasurements-btn"):
        if panel.count() and panel.first.is_visible():
            break
        page.locator(f"[data-cy='{button}']").first.click()
        page.wait_for_timeout(1000)
    panel.first.wait_for(timeout=60_000)
    page.locator("[data-cy='measurement-table-row-0']").wait_for(timeout=60_000)
    page.wait_for_timeout(1500)
    if shot is not None:
        shot(page, 0)
    titles = panel.first.locator("[data-cy='data-row-title']").all_inner_texts()
    rows = panel.first.locator("[data-cy^='measurement-table-row-']").all_inner_texts()
    return Panel([t.strip() for t in titles], [" ".join(r.split()) for r in rows])


def drivers_by_contribution(contributions: Mapping[str, float]) -> Sequence[str]:
    return [f for f, _ in sorted(contributions.items(), key=lambda kv: -abs(kv[1]))]


def screenshot(name: str, steps: Sequence[int] = (0, 1)) -> Callable[[Page, int], None]:
    """A ``view_sr`` callback saving ``<name>-<step>.png`` for ``steps`` into the folder that
    ``KETANODE_SCREENSHOTS`` names (relative to the repository), or doing nothing."""

    def shot(page: Page, step: int) -> None:
        folder = os.environ.get("KETANODE_SCREENSHOTS")
        if folder and step in steps:
            out = Path(folder) if Path(folder).is_absolute() else REPO / folder
            out.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out / f"{name}-{step}.png"))

    return shot


def with_valid_dates(path: Path, date: str = "20180925") -> bytes:
    """The file's bytes with anonymised dates ("***", not a DA) set to ``date``.

    OHIF 3.13.2 cannot show a series whose dates are not DA values: its study browser drops
    the series and the viewer stops ("ViewportId is required to set display sets for
    viewport"; seen with the UIH head of the shared data, whose anonymiser wrote "***"). A
    real archive holds dates; the node's own objects go to the PACS unchanged.
    """
    ds = pydicom.dcmread(path)
    for keyword in DATE_KEYWORDS:
        if keyword in ds and not re.fullmatch(r"\d{8}", str(ds.data_element(keyword).value)):
            setattr(ds, keyword, date)
    out = BytesIO()
    ds.save_as(out)
    return out.getvalue()
