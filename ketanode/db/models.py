"""SQLAlchemy 2 typed models: the node's state. Every state change is one transaction."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on SQLite (which stores naive text) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


UID = String(64)


class AssociationOutcome(enum.StrEnum):
    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    IGNORED = "ignored"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


#: Where a series rests until it is received again (in this order on the metrics page).
FINAL_SERIES_STATES = (SeriesState.IGNORED, SeriesState.DONE, SeriesState.FAILED)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"


#: A job that ran to its end, well or not (a superseded job never ran).
FINISHED_JOB_STATES = (JobState.DONE, JobState.FAILED)
#: A job waiting for a worker or running.
ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)


class JobLane(enum.StrEnum):
    LIVE = "live"  # a scan that just arrived
    BATCH = "batch"  # reprocessing of series already received


class Association(Base):
    """One DICOM association (accepted or rejected): who called, from where, what it carried."""

    __tablename__ = "association"

    id: Mapped[int] = mapped_column(primary_key=True)
    node_name: Mapped[str] = mapped_column(String(128))
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[dt.datetime | None]
    outcome: Mapped[str] = mapped_column(String(16), default=AssociationOutcome.OPEN)
    reason: Mapped[str | None] = mapped_column(Text)
    n_stored: Mapped[int] = mapped_column(Integer, default=0)
    n_duplicate: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_association_open", "outcome", "node_name"),)


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    # Patient identifiers live here (for admins who must find a case), never in logs.
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A series as received: its facts (from the first instance), counters and state."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    series_number: Mapped[int | None]
    description: Mapped[str | None] = mapped_column(String(64))
    protocol_name: Mapped[str | None] = mapped_column(String(64))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    image_type: Mapped[str | None] = mapped_column(String(128))
    mr_acquisition_type: Mapped[str | None] = mapped_column(String(2))
    rows: Mapped[int | None]
    columns: Mapped[int | None]
    pixel_spacing_row: Mapped[float | None] = mapped_column(Float)
    pixel_spacing_col: Mapped[float | None] = mapped_column(Float)
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    spacing_between_slices: Mapped[float | None] = mapped_column(Float)
    expected_instances: Mapped[int | None]
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    n_frames: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    selection: Mapped[dict[str, Any] | None]
    generation: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[dt.datetime | None]
    completion_trigger: Mapped[str | None] = mapped_column(String(32))
    # when retention removed this series' spool files (rows and results are kept)
    purged_at: Mapped[dt.datetime | None]
    last_association_id: Mapped[int | None] = mapped_column(ForeignKey("association.id"))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series")


class Instance(Base):
    """One stored SOP instance: where its file is and its checksum."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("association.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None]
    n_frames: Mapped[int] = mapped_column(Integer, default=1)
    spool_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class StoreFailure(Base):
    """A C-STORE the node refused: the DIMSE status it answered and why."""

    __tablename__ = "store_failure"

    id: Mapped[int] = mapped_column(primary_key=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("association.id"), index=True)
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    quarantine_path: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Job(Base):
    """Work on one series generation. The row is the source of truth; a queue carries only ids."""

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    series_generation: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    failed_step: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    # cluster mode: live scans go before batch reprocessing ("live" | "batch"); when the
    # scheduler last published the job id to the broker, and how often it did
    lane: Mapped[str] = mapped_column(String(8), default=JobLane.LIVE)
    published_at: Mapped[dt.datetime | None]
    publish_count: Mapped[int] = mapped_column(Integer, default=0)

    series: Mapped[Series] = relationship(back_populates="jobs")
    steps: Mapped[list[JobStep]] = relationship(
        back_populates="job", order_by="JobStep.id", cascade="all, delete-orphan"
    )

    __table_args__ = (Index("ix_job_state", "state", "id"),)


class JobStep(Base):
    """One step of one attempt of a job: its wall time and what it produced."""

    __tablename__ = "job_step"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    ok: Mapped[bool] = mapped_column(Boolean)
    seconds: Mapped[float] = mapped_column(Float)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    detail: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="steps")


class ModelRecord(Base):
    """A model file known to the node (registry); at most one is active at a time."""

    __tablename__ = "model"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(String(128))
    spec_name: Mapped[str] = mapped_column(String(128))
    spec_sha256: Mapped[str] = mapped_column(String(64))
    synthetic: Mapped[bool] = mapped_column(Boolean, default=False)
    label: Mapped[str] = mapped_column(Text)
    model_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    registered_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    active: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    activated_at: Mapped[dt.datetime | None]


class Prediction(Base):
    """One model output for one job: class, probability, decision value, region contributions."""

    __tablename__ = "prediction"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    model_sha256: Mapped[str] = mapped_column(String(64), index=True)
    predicted_class: Mapped[str] = mapped_column(String(32))
    probability: Mapped[float] = mapped_column(Float)
    decision_value: Mapped[float] = mapped_column(Float)
    contributions: Mapped[dict[str, Any]]
    synthetic: Mapped[bool] = mapped_column(Boolean, default=False)
    label: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ResultStatus(enum.StrEnum):
    SCORED = "scored"
    NOT_SCORED = "not_scored"  # examined, but quality control stopped it before a prediction
    # the report could not be built from the source header: a minimal "NOT SCORED: report
    # could not be built" SR was sent instead (reporting.py)
    REPORT_FAILED = "report_failed"


class Result(Base):
    """What one job concluded, as sent back to PACS: one row per job.

    The newest result of a series is ``current``; older ones (the series was received again)
    are kept. Class, probability and model are empty for a result that was not scored.
    """

    __tablename__ = "result"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    predicted_class: Mapped[str | None] = mapped_column(String(32))
    probability: Mapped[float | None] = mapped_column(Float)
    decision_value: Mapped[float | None] = mapped_column(Float)
    prediction_id: Mapped[int | None] = mapped_column(ForeignKey("prediction.id"))
    model_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_synthetic: Mapped[bool] = mapped_column(Boolean, default=False)
    model_label: Mapped[str | None] = mapped_column(Text)
    qc_outcome: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str | None] = mapped_column(Text)
    qc_checks: Mapped[list[Any]]
    volumes: Mapped[dict[str, Any]]
    contributions: Mapped[dict[str, Any]]
    software_version: Mapped[str] = mapped_column(String(32))
    current: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    job_started_at: Mapped[dt.datetime | None]
    processing_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)

    objects: Mapped[list[EmittedObject]] = relationship(
        back_populates="result", order_by="EmittedObject.id"
    )


class ObjectKind(enum.StrEnum):
    SR = "sr"
    REPORT_IMAGE = "report_image"


class EmittedObject(Base):
    """A DICOM object the node made (the SR, the report image): its UIDs and file."""

    __tablename__ = "emitted_object"

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("result.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_uid: Mapped[str] = mapped_column(UID)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # when retention removed the file (after every outbox row was sent or dead)
    purged_at: Mapped[dt.datetime | None]

    result: Mapped[Result] = relationship(back_populates="objects")
    outbox: Mapped[list[OutboxItem]] = relationship(back_populates="object")


class DispatchState(enum.StrEnum):
    PENDING = "pending"
    RETRYING = "retrying"
    SENT = "sent"
    DEAD = "dead"


#: Outbox rows still to be sent: the dispatcher sends them when due, retention keeps their
#: objects' files.
UNSENT_STATES = (DispatchState.PENDING, DispatchState.RETRYING)


class OutboxItem(Base):
    """One object to one destination: ``pending -> sent | retrying(attempts, next_at) -> dead``.
    The dispatcher reads only this table; an operator re-queues dead rows."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(primary_key=True)
    object_id: Mapped[int] = mapped_column(ForeignKey("emitted_object.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DispatchState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]

    object: Mapped[EmittedObject] = relationship(back_populates="outbox")

    __table_args__ = (
        Index("ix_outbox_due", "state", "next_at"),
        Index("uq_outbox_object_destination", "object_id", "destination", unique=True),
    )


class UserRole(enum.StrEnum):
    VIEWER = "viewer"  # reads the dashboard (results, jobs, outbox, audit)
    ADMIN = "admin"  # and what a later change may let admins do; the dashboard is read-only


class User(Base):
    """A dashboard user: name, password hash (never the password), role."""

    __tablename__ = "user_account"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16), default=UserRole.VIEWER)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[dt.datetime | None]


class WebSession(Base):
    """A dashboard login: the SHA-256 of the random session id the cookie carries (never the
    id itself). Logout deletes the row, so a cookie saved before it no longer logs in;
    disabling a user or changing the password deletes all of the user's rows."""

    __tablename__ = "web_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)
    address: Mapped[str | None] = mapped_column(String(64))


class AuditEvent(Base):
    """Who did what, when: associations, logins, result views, exports, dispatches, users.

    ``actor`` is a username, a calling AE title or "node"; ``subject`` names what was touched
    ("result:12", "outbox:7", "association:3"); never patient identifiers.
    """

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    address: Mapped[str | None] = mapped_column(String(64))
    subject: Mapped[str | None] = mapped_column(String(128))
    outcome: Mapped[str] = mapped_column(String(16), default="ok")
    detail: Mapped[dict[str, Any] | None]


class ClusterMember(Base):
    """One role process of a cluster (listener, scheduler, worker, web): where it runs and its
    heartbeat. ``detail`` says what it is doing (the active scheduler, a listener's port)."""

    __tablename__ = "cluster_member"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(160), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    stopped_at: Mapped[dt.datetime | None]
    detail: Mapped[dict[str, Any] | None]
