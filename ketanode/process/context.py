"""One job as its steps see it: what the job works on, and the typed results of the steps
that have run (each step's contract with the steps after it).

The pipeline (:mod:`ketanode.process.pipeline`) runs the steps and fills
:class:`StepResults`; the report writer (:mod:`ketanode.process.emit`) reads them. Both
import this module, neither imports the other's types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import Settings
from ketanode.db.jobqueue import hold_lease
from ketanode.imaging.analysis import Measured, QCResult
from ketanode.imaging.convert import Volume
from ketanode.imaging.preprocess import Preprocessed
from ketanode.imaging.segment import Segmentation
from ketanode.process.predict import Predicted

T = TypeVar("T")


class MissingStep(RuntimeError):
    """A step needs the result of a step that has not run."""


@dataclass
class StepResults:
    """The result of every step that has run (None: not run, or not in this job's steps).
    The ``report`` step's result is stored with the step only: no step reads it."""

    convert: Volume | None = None
    qc_input: QCResult | None = None
    preprocess: Preprocessed | None = None
    qc_registration: QCResult | None = None
    segment: Segmentation | None = None
    measure: Measured | None = None
    qc: QCResult | None = None
    predict: Predicted | None = None

    def qc_steps(self) -> list[QCResult]:
        """The QC steps' results that exist, in step order."""
        return [r for r in (self.qc_input, self.qc_registration, self.qc) if r is not None]


def need(result: T | None, step: str) -> T:
    """A step's result that a later step cannot do without."""
    if result is None:
        raise MissingStep(f"the {step} step has not run")
    return result


@dataclass
class JobContext:
    job_id: int
    attempt: int
    series_id: int
    work_dir: Path
    files: list[Path]
    settings: Settings
    results: StepResults = field(default_factory=StepResults)
    sessions: sessionmaker[Session] | None = None  # for steps that write rows (predict)
    # the lease owner that claimed the job (attempt ``attempt``): the report is written only
    # while it still holds the lease; None: not run under a claim (tests, tools)
    owner: str | None = None

    def hold_lease(self, session: Session) -> None:
        """The lease check before a write of what the job produced (a prediction, the
        result), in that write's transaction: :func:`ketanode.db.jobqueue.hold_lease` for
        this owner and attempt; nothing without an owner."""
        if self.owner is not None:
            hold_lease(
                session,
                self.job_id,
                self.owner,
                self.attempt,
                self.settings.pipeline.lease_seconds,
            )
