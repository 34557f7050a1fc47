"""Where a C-STORE is handled: check the dataset, make it durable, commit its row, answer.

The handler answers 0x0000 only after the file is fsynced and linked into the spool and
its row is committed. Refusals get a DIMSE status and a stored reason; nothing here raises.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom.events import Event
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ketanode.db.models import (
    Association,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    StoreFailure,
    Study,
    utcnow,
)
from ketanode.dicom.facts import series_facts
from ketanode.dicom.sop import PROCESSED_SOP_CLASSES
from ketanode.dicom.spool import Spool, SpoolFull, is_valid_uid

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PIXEL_DATA_INCONSISTENT = 0xC001
PROCESSING_FAILURE = 0xC002


class Refused(Exception):
    """A refusal: ``reason`` is safe to log; ``detail`` (which may quote the dataset) is only stored."""

    def __init__(self, status: int, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail

    @property
    def stored_reason(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass
class StoreOutcome:
    status: int
    series_id: int | None = None
    expected_reached: bool = False
    duplicate: bool = False


SeriesCallback = Callable[[int, bool], None]


class StoreService:
    """State shared by the C-STORE handler across associations."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        spool: Spool,
        association_ids: Callable[[object], int | None],
        on_series_stored: SeriesCallback | None = None,
    ) -> None:
        self.sessions = sessions
        self.spool = spool
        self.association_ids = association_ids
        self.on_series_stored = on_series_stored
        self._locks = [threading.Lock() for _ in range(64)]

    def _lock_for(self, uid: str) -> threading.Lock:
        return self._locks[hash(uid) % len(self._locks)]


def handle_store(event: Event, service: StoreService) -> int:
    """EVT_C_STORE handler: returns a DIMSE status and never raises."""
    assoc_id: int | None = None
    raw = b""
    sop_class = sop_uid = None
    try:
        assoc_id = service.association_ids(event.assoc)
        request = event.request
        sop_class = str(request.AffectedSOPClassUID or "") or None
        sop_uid = str(request.AffectedSOPInstanceUID or "") or None
        raw = event.encoded_dataset(include_meta=True)
        outcome = _store(service, raw, sop_class, sop_uid, assoc_id)
    except Refused as refusal:
        _record_failure(service, assoc_id, refusal, raw, sop_class, sop_uid)
        return refusal.status
    except Exception as exc:  # a bug or an unexpected fault must not end the association
        logger.exception("C-STORE failed unexpectedly (association %s, SOP %s)", assoc_id, sop_uid)
        refusal = Refused(PROCESSING_FAILURE, f"internal error ({type(exc).__name__})", str(exc))
        _record_failure(service, assoc_id, refusal, raw, sop_class, sop_uid)
        return refusal.status
    if outcome.series_id is not None and service.on_series_stored is not None:
        try:
            service.on_series_stored(outcome.series_id, outcome.expected_reached)
        except Exception:
            logger.exception("series notification failed for series %s", outcome.series_id)
    return outcome.status


# Only these elements are decoded on the hot path (the whole file is still walked, so a
# truncated or malformed dataset is still refused); the spool keeps every byte.
_NEEDED = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
    "SeriesInstanceUID", "Modality", "Rows", "Columns", "BitsAllocated", "SamplesPerPixel",
    "NumberOfFrames", "PixelData", "FloatPixelData", "DoubleFloatPixelData", "InstanceNumber",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate",
    "StudyDescription", "SeriesNumber", "SeriesDescription", "ProtocolName", "Manufacturer",
    "ImageType", "MRAcquisitionType", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "ImagesInAcquisition", "SharedFunctionalGroupsSequence",
)


def _parse(raw: bytes) -> Dataset:
    try:
        ds = dcmread(io.BytesIO(raw), force=False, specific_tags=list(_NEEDED))
        for keyword in _NEEDED:  # the elements the node reads must decode now
            _ = ds.get(keyword)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, IndexError,
            NotImplementedError, OverflowError, AttributeError) as exc:
        raise Refused(CANNOT_UNDERSTAND, f"cannot parse dataset ({type(exc).__name__})",
                      str(exc)) from exc
    return ds


def _check(ds: Dataset, sop_class: str | None, sop_uid: str | None) -> None:
    missing = [
        k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if not is_valid_uid(str(ds.get(k, "")) or None)
    ]
    if missing:
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                      f"missing or invalid {', '.join(missing)}")
    if sop_class and str(ds.SOPClassUID) != sop_class:
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                      f"dataset SOP Class {ds.SOPClassUID} differs from the request's {sop_class}")
    if sop_uid and str(ds.SOPInstanceUID) != sop_uid:
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                      "dataset SOP Instance UID differs from the request's")
    if str(ds.SOPClassUID) in PROCESSED_SOP_CLASSES:
        _check_image(ds)


def _check_image(ds: Dataset) -> None:
    absent = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        absent.append("PixelData")
    if absent:
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                      f"MR image without required {', '.join(absent)}")
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if ts and not ts.is_compressed:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        expected = int(ds.Rows) * int(ds.Columns) * samples * frames * int(ds.BitsAllocated) // 8
        got = len(ds.get("PixelData") or b"")
        if got < expected:
            raise Refused(PIXEL_DATA_INCONSISTENT,
                          f"pixel data has {got} bytes, the header implies {expected}")


def _store(
    service: StoreService, raw: bytes, sop_class: str | None, sop_uid: str | None,
    assoc_id: int | None,
) -> StoreOutcome:
    try:
        service.spool.check_space(len(raw))
    except SpoolFull as exc:
        raise Refused(OUT_OF_RESOURCES, str(exc)) from exc
    ds = _parse(raw)
    _check(ds, sop_class, sop_uid)
    uid = str(ds.SOPInstanceUID)
    with service._lock_for(uid):
        return _store_locked(service, raw, ds, assoc_id)


def _store_locked(service: StoreService, raw: bytes, ds: Dataset, assoc_id: int | None) -> StoreOutcome:
    uid = str(ds.SOPInstanceUID)
    study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    try:
        # Never overwrites: a file already there is either a duplicate or a crash orphan.
        spooled = service.spool.store(raw, study_uid, series_uid, uid)
    except SpoolFull as exc:
        raise Refused(OUT_OF_RESOURCES, str(exc)) from exc
    except OSError as exc:
        raise Refused(OUT_OF_RESOURCES, f"cannot write to the spool: {exc.strerror}") from exc

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    instances, series_t = Instance.__table__, Series.__table__
    try:
        # The hot path in SQLAlchemy Core: one short transaction, a few cached statements.
        with service.sessions.begin() as session:
            known = session.execute(
                select(instances.c.series_id).where(instances.c.sop_instance_uid == uid)
            ).scalar()
            if known is not None:
                _count(session, assoc_id, duplicate=True)
                logger.info("duplicate SOP instance %s: kept the first copy (series row %s)",
                            uid, known)
                return StoreOutcome(SUCCESS, duplicate=True)
            if not spooled.created:  # an orphan from a crash before its row was committed
                spooled = service.spool.replace(raw, study_uid, series_uid, uid)
            row = session.execute(
                select(series_t.c.id, series_t.c.state).where(series_t.c.series_uid == series_uid)
            ).first()
            if row is None or row.state != SeriesState.RECEIVING:
                series_id = _series_for(session, ds).id
            else:
                series_id = row.id
            now = utcnow()
            session.execute(instances.insert().values(
                series_id=series_id,
                association_id=assoc_id,
                sop_instance_uid=uid,
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                instance_number=_int_or_none(ds.get("InstanceNumber")),
                n_frames=frames,
                spool_path=str(spooled.path),
                size_bytes=spooled.size,
                sha256=spooled.sha256,
                received_at=now,
            ))
            counts = session.execute(
                update(series_t).where(series_t.c.id == series_id).values(
                    n_instances=series_t.c.n_instances + 1,
                    n_frames=series_t.c.n_frames + frames,
                    last_received_at=now,
                    last_association_id=assoc_id,
                ).returning(series_t.c.n_instances, series_t.c.expected_instances)
            ).one()
            reached = bool(counts.expected_instances and counts.n_instances >= counts.expected_instances)
    except IntegrityError:
        logger.info("duplicate SOP instance %s stored concurrently; kept the first", uid)
        with service.sessions.begin() as session:
            _count(session, assoc_id, duplicate=True)
        return StoreOutcome(SUCCESS, duplicate=True)
    except OperationalError as exc:
        raise Refused(OUT_OF_RESOURCES, "database unavailable", str(exc.orig)) from exc
    except SpoolFull as exc:
        raise Refused(OUT_OF_RESOURCES, str(exc)) from exc
    logger.debug("stored SOP instance %s in series row %s", uid, series_id)
    return StoreOutcome(SUCCESS, series_id=series_id, expected_reached=reached)


def _int_or_none(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


def _series_for(session: Session, ds: Dataset) -> Series:
    study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    series = session.scalar(select(Series).where(Series.series_uid == series_uid))
    if series is None:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            study = Study(
                study_uid=study_uid,
                patient_name=str(ds.get("PatientName", "") or "")[:324] or None,
                patient_id=str(ds.get("PatientID", "") or "")[:64] or None,
                patient_birth_date=str(ds.get("PatientBirthDate", "") or "")[:8] or None,
                patient_sex=str(ds.get("PatientSex", "") or "")[:16] or None,
                accession_number=str(ds.get("AccessionNumber", "") or "")[:16] or None,
                study_date=str(ds.get("StudyDate", "") or "")[:8] or None,
                study_description=str(ds.get("StudyDescription", "") or "")[:64] or None,
            )
            session.add(study)
            session.flush()
        series = Series(study_id=study.id, series_uid=series_uid, n_instances=0, n_frames=0,
                        state=SeriesState.RECEIVING, generation=1, **series_facts(ds).as_dict())
        session.add(series)
        session.flush()
        logger.info("new series row %s (study row %s)", series.id, study.id)
    elif series.state != SeriesState.RECEIVING:
        _reopen(session, series)
    return series


def _reopen(session: Session, series: Series) -> None:
    """A late instance: the series receives again; a queued job for the old data is dropped."""
    logger.info("series row %s reopened by a late instance (was %s)", series.id, series.state)
    session.execute(
        update(Job)
        .where(Job.series_id == series.id, Job.state == JobState.QUEUED)
        .values(state=JobState.SUPERSEDED, finished_at=utcnow(),
                error="superseded: the series received more instances")
    )
    series.state = SeriesState.RECEIVING
    series.generation += 1
    series.reason = None
    series.completed_at = None
    series.completion_trigger = None


def _count(session: Session, assoc_id: int | None, duplicate: bool = False, failed: bool = False) -> None:
    if assoc_id is None:
        return
    column = (Association.n_failed if failed else
              Association.n_duplicate if duplicate else Association.n_stored)
    session.execute(update(Association).where(Association.id == assoc_id)
                    .values({column: column + 1}))


def _record_failure(
    service: StoreService, assoc_id: int | None, refusal: Refused, raw: bytes,
    sop_class: str | None, sop_uid: str | None,
) -> None:
    logger.warning("C-STORE refused with 0x%04X (association %s, SOP %s): %s",
                   refusal.status, assoc_id, sop_uid, refusal.reason)
    try:
        path = None
        if raw and refusal.status != OUT_OF_RESOURCES:
            path = service.spool.quarantine(raw, refusal.status)
        with service.sessions.begin() as session:
            session.add(StoreFailure(
                association_id=assoc_id, status=refusal.status,
                reason=refusal.stored_reason[:2000],
                sop_class_uid=sop_class if sop_class and is_valid_uid(sop_class) else None,
                sop_instance_uid=sop_uid if sop_uid and is_valid_uid(sop_uid) else None,
                quarantine_path=str(path) if path else None,
                received_at=dt.datetime.now(dt.UTC),
            ))
            _count(session, assoc_id, failed=True)
    except Exception:
        logger.exception("could not record the refusal of SOP %s", sop_uid)
