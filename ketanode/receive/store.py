"""Where a C-STORE is handled: check the dataset, make it durable, commit its row, answer.

The handler answers 0x0000 only after the file is fsynced and linked into the spool and
its row is committed. Refusals get a DIMSE status and a stored reason; nothing here raises.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import io
import logging
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import numpy as np
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from sqlalchemy import Row, Table, bindparam, select, update
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
from ketanode.dicom.structure import Malformed, ShortValue, check_structure, inflate
from ketanode.logs import exception_summary, safe
from ketanode.spool import Spool, SpoolFull, is_valid_uid

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PIXEL_DATA_INCONSISTENT = 0xC001
PROCESSING_FAILURE = 0xC002
#: PS3.7 Annex C: a SOP Instance UID the node already holds, with other content.
DUPLICATE_SOP_INSTANCE = 0x0111


class Refused(Exception):
    """A refusal: ``reason`` is stored; ``logged`` (the reason unless given) is what the log
    line says; ``detail`` (which may quote the dataset) is only stored."""

    def __init__(
        self, status: int, reason: str, detail: str | None = None, logged: str | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.logged = logged or reason

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

# The hot path's statements are built once: SQLAlchemy then reuses their compiled form and
# cache key. Building four ad hoc statements per instance cost about 2 ms of CPU; these
# take about 0.4 ms (bench/ingest.py, docs/architecture.md).
_INSTANCE, _SERIES = cast(Table, Instance.__table__), cast(Table, Series.__table__)
_KNOWN = select(
    _INSTANCE.c.id,
    _INSTANCE.c.series_id,
    _INSTANCE.c.sha256,
    _INSTANCE.c.transfer_syntax_uid,
    _INSTANCE.c.spool_path,
).where(_INSTANCE.c.sop_instance_uid == bindparam("b_uid"))
_BUMP_SERIES = (
    update(_SERIES)
    .where(
        _SERIES.c.series_uid == bindparam("b_series_uid"), _SERIES.c.state == SeriesState.RECEIVING
    )
    .values(
        n_instances=_SERIES.c.n_instances + 1,
        n_frames=_SERIES.c.n_frames + bindparam("b_frames", type_=_SERIES.c.n_frames.type),
        last_received_at=bindparam("b_now", type_=_SERIES.c.last_received_at.type),
        last_association_id=bindparam("b_assoc", type_=_SERIES.c.last_association_id.type),
    )
    .returning(_SERIES.c.id, _SERIES.c.n_instances, _SERIES.c.expected_instances)
)
_INSERT_INSTANCE = _INSTANCE.insert()
_Known = Row[Any, Any, Any, Any, Any]  # a row of _KNOWN
# A C-STORE whose transaction lost a race to create the same study or series row (two
# associations bringing a new series at once, on PostgreSQL) is tried again.
_ATTEMPTS = 3


T = TypeVar("T")


class _Work(Generic[T]):
    __slots__ = ("done", "error", "value", "work")

    def __init__(self, work: Callable[[Session], T]) -> None:
        self.work = work
        self.done = False
        self.value: T | None = None
        self.error: BaseException | None = None


class GroupCommit:
    """The row transactions of concurrent C-STOREs, committed together.

    A caller whose transaction finds no commit in progress runs it at once (alone: one
    association pays nothing for this). While one commits, the transactions queued by the
    others wait; the first of them to wake then runs all that queued in one database
    transaction, each in its own savepoint (an error, such as a duplicate SOP Instance UID,
    rolls back only that one), and commits once: one fsync of the database for all. Every
    caller returns only after the commit that holds its rows has returned, with its own
    result, its own exception, or the commit's exception: an acknowledgement never gets
    ahead of its row.
    """

    def __init__(
        self, sessions: sessionmaker[Session], lock: AbstractContextManager[object]
    ) -> None:
        self.sessions = sessions
        self.lock = lock
        self._cond = threading.Condition()
        self._pending: list[_Work[Any]] = []
        self._busy = False
        #: transactions committed, and commits (the ratio is the mean group size)
        self.transactions = 0
        self.commits = 0

    def run(self, work: Callable[[Session], T]) -> T:
        item = _Work(work)
        with self._cond:
            self._pending.append(item)
            while self._busy and not item.done:
                self._cond.wait()
            if not item.done:  # lead: take every transaction queued so far
                batch, self._pending = self._pending, []
                self._busy = True
        if not item.done:
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error
        return cast(T, item.value)

    def _commit(self, batch: list[_Work[Any]]) -> None:
        try:
            with self.lock, self.sessions.begin() as session:
                if len(batch) == 1:
                    batch[0].value = batch[0].work(session)
                else:
                    for item in batch:
                        try:
                            with session.begin_nested():
                                item.value = item.work(session)
                        except Exception as exc:  # its own statements are rolled back
                            item.error = exc
        except BaseException as exc:  # the transaction or its commit failed: all of it
            for item in batch:
                if item.error is None:
                    item.error, item.value = exc, None
        finally:
            self.transactions += len(batch)
            self.commits += 1
            for item in batch:
                item.done = True


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
        # SQLite has one writer at a time. Associations that wait for it in SQLite's busy
        # handler sleep 1, 2, 5, 10... ms between tries; queueing on a lock here hands the
        # database over as soon as the previous C-STORE commits (PostgreSQL needs none).
        bind = sessions.kw.get("bind")
        sqlite = getattr(getattr(bind, "dialect", None), "name", "") == "sqlite"
        self.writer_lock: AbstractContextManager[object] = (
            threading.Lock() if sqlite else contextlib.nullcontext()
        )
        self.commits = GroupCommit(sessions, self.writer_lock)

    def _lock_for(self, uid: str) -> threading.Lock:
        return self._locks[hash(uid) % len(self._locks)]


def handle_store(event: Event, service: StoreService) -> int:
    """EVT_C_STORE handler: returns a DIMSE status and never raises."""
    assoc_id: int | None = None
    raw = b""
    sop_class = sop_uid = None
    try:
        assoc_id = service.association_ids(event.assoc)
        request = cast(C_STORE, event.request)
        sop_class = str(request.AffectedSOPClassUID or "") or None
        sop_uid = str(request.AffectedSOPInstanceUID or "") or None
        ts = str(event.context.transfer_syntax)
        raw = _part10(event, sop_class or "", sop_uid or "", ts)
        outcome = _store(service, raw, ts, sop_class, sop_uid, assoc_id)
    except Refused as refusal:
        _record_failure(service, assoc_id, refusal, raw, sop_class, sop_uid)
        return refusal.status
    except Exception as exc:  # a bug or an unexpected fault must not end the association
        # One line: the exception's type and where it happened, never its text (which can
        # quote the dataset); the text is stored with the refusal.
        logger.error(
            "C-STORE failed unexpectedly (association %s, SOP %s): %s",
            assoc_id,
            safe(sop_uid),
            exception_summary(exc),
        )
        failure = Refused(
            PROCESSING_FAILURE, f"internal error ({type(exc).__name__})", safe(str(exc), 1000)
        )
        _record_failure(service, assoc_id, failure, raw, sop_class, sop_uid)
        return failure.status
    _notify(service, outcome)
    return outcome.status


class Retry(Exception):
    """A file the front end acknowledged could not be indexed now (the database or the spool
    is unavailable): it stays where it is and is indexed again later."""


def index_file(
    service: StoreService,
    path: Path,
    ts: str,
    sop_class: str | None,
    sop_uid: str | None,
    assoc_id: int | None,
) -> int:
    """Index a file that the native front end made durable and acknowledged: the same
    checks, spool layout and rows as :func:`handle_store` (the file is linked into the spool,
    not written again), then the front end's file is removed. Returns the DIMSE status the
    node's checks give it; a refusal is recorded (and the dataset kept in the spool's
    rejected files) like a refused C-STORE, noting that the sender was told success. Raises
    :class:`Retry` when it cannot be decided now; an unexpected fault keeps the file (renamed
    ``.failed``) with a recorded refusal, so an acknowledged dataset is never lost."""
    raw = b""
    try:
        raw = path.read_bytes()
        outcome = _store(service, raw, ts, sop_class, sop_uid, assoc_id, source=path)
    except Refused as refusal:
        if refusal.status == OUT_OF_RESOURCES:
            raise Retry(refusal.reason) from refusal
        refusal.reason += " (after the front end had answered success)"
        _record_failure(service, assoc_id, refusal, raw, sop_class, sop_uid)
        path.unlink(missing_ok=True)
        return refusal.status
    except Exception as exc:
        logger.error(
            "indexing a received file failed unexpectedly (association %s, SOP %s): %s",
            assoc_id,
            safe(sop_uid),
            exception_summary(exc),
        )
        kept = path.with_suffix(".failed")
        with contextlib.suppress(OSError):
            path.rename(kept)
        failure = Refused(
            PROCESSING_FAILURE,
            f"internal error ({type(exc).__name__}) after the front end had answered success; "
            f"the file is kept as {kept.name}",
            safe(str(exc), 1000),
        )
        _record_failure(service, assoc_id, failure, b"", sop_class, sop_uid)
        return failure.status
    path.unlink(missing_ok=True)
    _notify(service, outcome)
    return outcome.status


def _notify(service: StoreService, outcome: StoreOutcome) -> None:
    if outcome.series_id is not None and service.on_series_stored is not None:
        try:
            service.on_series_stored(outcome.series_id, outcome.expected_reached)
        except Exception as exc:
            logger.error(
                "series notification failed for series %s: %s",
                outcome.series_id,
                exception_summary(exc),
            )


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # 4-byte length after two reserved bytes
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


def _part10(event: Event, sop_class: str, sop_uid: str, ts: str) -> bytes:
    """The C-STORE dataset as a DICOM file: preamble, file meta, then the bytes as received.

    Byte for byte what ``event.encoded_dataset(include_meta=True)`` returns, without
    building and encoding a pydicom FileMetaDataset per instance (about 0.4 ms).
    """
    dataset = event.encoded_dataset(include_meta=False)
    try:
        body = b"".join(
            (
                _meta_element(0x0001, b"OB", b"\x00\x01"),
                _meta_element(0x0002, b"UI", _padded(sop_class, b"\x00")),
                _meta_element(0x0003, b"UI", _padded(sop_uid, b"\x00")),
                _meta_element(0x0010, b"UI", _padded(ts, b"\x00")),
                _meta_element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
                _meta_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
            )
        )
    except (UnicodeEncodeError, struct.error):
        # Not ASCII, or too long for a meta element: not a UID (the checks refuse the
        # dataset). Its bytes are kept after a meta that names no SOP instance.
        return _part10_without_uids(dataset, ts)
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"".join((_PREAMBLE, group_length, body, dataset))


def _part10_without_uids(dataset: bytes, ts: str) -> bytes:
    try:
        transfer_syntax = _padded(ts, b"\x00")
    except UnicodeEncodeError:
        transfer_syntax = b""
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", b""),
            _meta_element(0x0003, b"UI", b""),
            _meta_element(0x0010, b"UI", transfer_syntax),
            _meta_element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _meta_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"".join((_PREAMBLE, group_length, body, dataset))


def _dataset_offset(raw: bytes) -> int:
    """Where the dataset starts in a file from ``_part10`` (after the meta group)."""
    return 144 + int(struct.unpack_from("<I", raw, 140)[0])


@functools.lru_cache(maxsize=64)
def _encoding(ts: str) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of a transfer syntax read as is, or None (deflated,
    unknown): those go through dcmread, which inflates and guesses."""
    uid = UID(ts)
    if not uid.is_transfer_syntax or uid.is_deflated:
        return None
    return uid.is_implicit_VR, uid.is_little_endian


# Only these elements are decoded on the hot path (the whole file is still walked, so a
# truncated or malformed dataset is still refused); the spool keeps every byte.
_NEEDED = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "InstanceNumber",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyDate",
    "StudyDescription",
    "SeriesNumber",
    "SeriesDescription",
    "ProtocolName",
    "Manufacturer",
    "ImageType",
    "MRAcquisitionType",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "ImagesInAcquisition",
    "SharedFunctionalGroupsSequence",
    # Enhanced MR: pixel measures and orientation per frame (some scanners), and the frame
    # positions a slice spacing is taken from when none is stated
    "PerFrameFunctionalGroupsSequence",
    "ImageOrientationPatient",
)


_NEEDED_TAGS: list[BaseTag | int] = [BaseTag(tag_for_keyword(k) or 0) for k in _NEEDED]


_PIXEL_DATA_TAG = 0x7FE00010


def _walk(raw: bytes, ts: str) -> None:
    """Every element of the dataset must parse to its declared length (any SOP class);
    a fixed-width value (US, UL, FD...) of another length is an invalid attribute."""
    uid = UID(ts)
    offset = _dataset_offset(raw)
    try:
        if uid.is_deflated:
            structure = check_structure(inflate(raw[offset:]), 0, False, True)
        elif uid.is_transfer_syntax:
            structure = check_structure(raw, offset, uid.is_implicit_VR, uid.is_little_endian)
        else:  # pragma: no cover (the listener accepts only the syntaxes in dicom/sop.py)
            raise Malformed("unknown transfer syntax")
    except ShortValue as exc:
        if exc.tag == _PIXEL_DATA_TAG:
            raise Refused(
                PIXEL_DATA_INCONSISTENT,
                f"pixel data has {exc.remaining} bytes, its element declares {exc.declared}",
            ) from exc
        raise _unparsable(exc) from exc
    except Malformed as exc:
        raise _unparsable(exc) from exc
    if structure.bad_widths:
        widths = structure.bad_widths[:3]
        raise Refused(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "invalid attribute: " + "; ".join(b.describe() for b in widths),
            logged="invalid attribute: " + "; ".join(b.describe(with_tag=False) for b in widths),
        )


def _unparsable(exc: Malformed) -> Refused:
    return Refused(
        CANNOT_UNDERSTAND,
        f"cannot parse dataset: {exc}",
        logged=f"cannot parse dataset: {exc.summary}",
    )


@contextlib.contextmanager
def _parse_errors_refused() -> Iterator[None]:
    """Any exception of the parse as a refusal: pydicom raises many kinds on bytes it cannot
    decode, all of them about the input. Their text can quote values: it is stored (for the
    unexpected kinds), never logged."""
    try:
        yield
    except (InvalidDicomError, EOFError, RecursionError, zlib.error, struct.error) as exc:
        raise Refused(CANNOT_UNDERSTAND, f"cannot parse dataset ({type(exc).__name__})") from exc
    except Exception as exc:
        raise Refused(
            CANNOT_UNDERSTAND, f"cannot parse dataset ({type(exc).__name__})", safe(str(exc), 500)
        ) from exc


def _parse(raw: bytes, ts: str) -> Dataset:
    _walk(raw, ts)
    ds: Dataset
    with _parse_errors_refused():
        encoding = _encoding(ts)
        if encoding is None:
            ds = dcmread(io.BytesIO(raw), force=False, specific_tags=list(_NEEDED))
        else:
            # The file meta is our own (``_part10``): read the dataset after it in the
            # context's transfer syntax, as dcmread would, without re-parsing the meta.
            fp = io.BytesIO(raw)
            fp.seek(_dataset_offset(raw))
            ds = read_dataset(fp, *encoding, specific_tags=_NEEDED_TAGS)
    # The image attributes are checked on their bytes first: pydicom's decoding of a bad
    # value raises (or not, by its validation mode) and would make it a parse failure.
    for keyword in _IMAGE_LIMITS:
        _image_value(ds, keyword)
    with _parse_errors_refused():
        for _ in ds:  # the elements the node reads must decode now (ds holds only those)
            pass
    if len(ds) == 0:
        # pydicom reads almost any byte stream without raising; a "dataset" holding none
        # of the elements every stored object has (UIDs, patient, modality) is not one.
        raise Refused(
            CANNOT_UNDERSTAND,
            "cannot parse dataset: no DICOM elements the node recognises "
            "(not a dataset, or not in its context's transfer syntax)",
        )
    return ds


def _check(ds: Dataset, ts: str, sop_class: str | None, sop_uid: str | None) -> None:
    missing = [
        k
        for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if not is_valid_uid(_text_value(ds, k))
    ]
    if missing:
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"missing or invalid {', '.join(missing)}")
    if sop_class and str(ds.SOPClassUID) != sop_class:
        raise Refused(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"dataset SOP Class {ds.SOPClassUID} differs from the request's {safe(sop_class)}",
        )
    if sop_uid and str(ds.SOPInstanceUID) != sop_uid:
        raise Refused(
            DATASET_DOES_NOT_MATCH_SOP_CLASS, "dataset SOP Instance UID differs from the request's"
        )
    _check_pixel_length(ds, ts, {k: _image_value(ds, k) for k in _IMAGE_LIMITS})
    if str(ds.SOPClassUID) in PROCESSED_SOP_CLASSES:
        _check_mr_image(ds)


def _text_value(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or not isinstance(value, str):
        return None
    return str(value)


def _whole(value: object) -> int | None:
    """A single integer value (IS as text or a number), or None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, (str, bytes)):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        text = text.strip(" \x00")
        if text[:1] in "+-":
            sign, digits = text[:1], text[1:]
        else:
            sign, digits = "", text
        return int(sign + digits) if digits.isdigit() and len(digits) <= 12 else None
    return None


#: Image Pixel attributes checked in every dataset that has them: (keyword, lowest, highest).
_IMAGE_LIMITS = {
    "Rows": (1, 65535),
    "Columns": (1, 65535),
    "SamplesPerPixel": (1, 4),
    "BitsAllocated": (1, 64),
    "NumberOfFrames": (1, 2**31 - 1),
}
_IMAGE_TAGS = {k: BaseTag(tag_for_keyword(k) or 0) for k in _IMAGE_LIMITS}


def _raw_number(ds: Dataset, keyword: str) -> tuple[bool, int | None, str]:
    """(present with a value, its integer or None if not one, a short safe rendering),
    from the element's bytes when pydicom has not decoded it (its conversion of a bad value
    raises, or depends on pydicom's validation mode)."""
    tag = _IMAGE_TAGS[keyword]
    if tag not in ds:
        return False, None, ""
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        raw = elem.value or b""
        if not raw:
            return False, None, ""
        vr = elem.VR or ("IS" if keyword == "NumberOfFrames" else "US")
        if vr in ("US", "SS"):
            if len(raw) != 2:
                return True, None, f"{len(raw)} bytes"
            fmt = ("<" if elem.is_little_endian else ">") + ("H" if vr == "US" else "h")
            number = int(struct.unpack(fmt, raw)[0])
            return True, number, str(number)
        text = raw.decode("ascii", "replace").strip(" \x00")
        if not text:
            return False, None, ""
        return True, (None if "\\" in text else _whole(text)), safe(text, 24)
    value = ds[tag].value
    if value is None or value == "" or value == b"":
        return False, None, ""
    return True, _whole(value), safe(value if isinstance(value, (str, int)) else repr(value), 24)


def _image_value(ds: Dataset, keyword: str) -> int | None:
    """The attribute's integer value, None when absent or empty; Refused when invalid."""
    present, number, shown = _raw_number(ds, keyword)
    if not present:
        return None
    low, high = _IMAGE_LIMITS[keyword]
    if number is None or not low <= number <= high:
        raise Refused(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"invalid {keyword}: not a single integer from {low} to {high}",
            f"{keyword} = {shown}",
        )
    if keyword == "BitsAllocated" and number != 1 and number % 8:
        raise Refused(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"invalid BitsAllocated {number}: must be 1 or a multiple of 8",
        )
    return number


def _check_pixel_length(ds: Dataset, transfer_syntax: str, values: dict[str, int | None]) -> None:
    """Whatever the SOP class: native pixel data holds at least what the (valid) image
    attributes describe."""
    rows, cols, bits = values["Rows"], values["Columns"], values["BitsAllocated"]
    if "PixelData" not in ds or rows is None or cols is None or bits is None:
        return
    ts = UID(transfer_syntax)
    if ts.is_compressed:
        return
    frames = values["NumberOfFrames"] or 1
    samples = values["SamplesPerPixel"] or 1
    expected = (rows * cols * samples * frames * bits + 7) // 8
    got = len(ds.PixelData or b"")
    if got < expected:
        raise Refused(
            PIXEL_DATA_INCONSISTENT,
            f"pixel data has {got} bytes, the header implies {expected}",
        )


def _check_mr_image(ds: Dataset) -> None:
    absent = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        absent.append("PixelData")
    if absent:
        raise Refused(
            DATASET_DOES_NOT_MATCH_SOP_CLASS, f"MR image without required {', '.join(absent)}"
        )


def _store(
    service: StoreService,
    raw: bytes,
    ts: str,
    sop_class: str | None,
    sop_uid: str | None,
    assoc_id: int | None,
    source: Path | None = None,
) -> StoreOutcome:
    try:
        service.spool.check_space(0 if source is not None else len(raw))
    except SpoolFull as exc:
        raise Refused(OUT_OF_RESOURCES, str(exc)) from exc
    ds = _parse(raw, ts)
    _check(ds, ts, sop_class, sop_uid)
    uid = str(ds.SOPInstanceUID)
    with service._lock_for(uid):
        return _store_locked(service, raw, ts, ds, assoc_id, source)


def _store_locked(
    service: StoreService,
    raw: bytes,
    ts: str,
    ds: Dataset,
    assoc_id: int | None,
    source: Path | None = None,
) -> StoreOutcome:
    uid = str(ds.SOPInstanceUID)
    study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    digest = hashlib.sha256(raw).hexdigest()
    try:
        # Never overwrites: a file already there is a duplicate, or an orphan of a crash
        # (its row was never committed). Either is told apart in the transaction below,
        # and a duplicate is answered from there without writing anything.
        spooled = service.spool.store(raw, study_uid, series_uid, uid, digest, source)
    except SpoolFull as exc:
        raise Refused(OUT_OF_RESOURCES, str(exc)) from exc
    except OSError as exc:
        raise Refused(OUT_OF_RESOURCES, f"cannot write to the spool: {exc.strerror}") from exc

    frames = _whole(ds.get("NumberOfFrames")) or 1

    def transaction(session: Session) -> tuple[Row[Any] | None, _Known | None]:
        """(the series counts, or the row of the instance already stored). The common
        case is two prebuilt statements: count the instance into its receiving series,
        insert its row. The same UID stored by another process meanwhile is caught by the
        unique SOP Instance UID (this transaction, or its savepoint, then rolls back)."""
        nonlocal spooled
        conn = session.connection()
        if not spooled.created:
            known = conn.execute(_KNOWN, {"b_uid": uid}).first()
            if known is not None:
                return None, known
            # an orphan from a crash before its row was committed
            spooled = service.spool.replace(raw, study_uid, series_uid, uid)
        now = utcnow()
        bump = {"b_series_uid": series_uid, "b_frames": frames, "b_now": now, "b_assoc": assoc_id}
        counts = conn.execute(_BUMP_SERIES, bump).first()
        if counts is None:  # a new series, or a late instance that reopens one
            _series_for(session, ds)
            session.flush()
            counts = conn.execute(_BUMP_SERIES, bump).one()
        conn.execute(
            _INSERT_INSTANCE,
            {
                "series_id": counts.id,
                "association_id": assoc_id,
                "sop_instance_uid": uid,
                "sop_class_uid": str(ds.SOPClassUID),
                "transfer_syntax_uid": ts,
                "instance_number": _int_or_none(ds.get("InstanceNumber")),
                "n_frames": frames,
                "spool_path": service.spool.files.stored(spooled.path),
                "size_bytes": spooled.size,
                "sha256": spooled.sha256,
                "received_at": now,
            },
        )
        return counts, None

    counts: Row[Any] | None = None
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            # Committed with the rows of the other associations' C-STOREs of the moment
            # (GroupCommit): returns once the commit holding this row is done.
            counts, known = service.commits.run(transaction)
            if known is not None:
                return _known_instance(service, uid, known, raw, digest, ts, assoc_id)
            break
        except IntegrityError:
            with service.sessions() as session:
                known = session.connection().execute(_KNOWN, {"b_uid": uid}).first()
                stored_path = _spool_path(service, session, known.id) if known is not None else None
            if known is not None:  # stored before, under other study or series UIDs, or
                # concurrently by another process
                if spooled.created and spooled.path != stored_path:
                    service.spool.discard(spooled.path)  # ours has no row: no orphan
                return _known_instance(service, uid, known, raw, digest, ts, assoc_id)
            if attempt == _ATTEMPTS:
                if spooled.created:
                    service.spool.discard(spooled.path)
                raise
            # Not a duplicate: another association created this study or series row first
            # (PostgreSQL runs those transactions concurrently). It is there now.
            logger.info("SOP instance %s: its series row was created concurrently; again", uid)
        except OperationalError as exc:
            if spooled.created:
                service.spool.discard(spooled.path)
            raise Refused(
                OUT_OF_RESOURCES, "database unavailable", safe(str(exc.orig), 500)
            ) from exc
        except SpoolFull as exc:
            raise Refused(OUT_OF_RESOURCES, str(exc)) from exc
    assert counts is not None  # the last attempt has returned or raised otherwise
    series_id = int(counts.id)
    reached = bool(counts.expected_instances and counts.n_instances >= counts.expected_instances)
    logger.debug("stored SOP instance %s in series row %s", uid, series_id)
    return StoreOutcome(SUCCESS, series_id=series_id, expected_reached=reached)


def _spool_path(service: StoreService, session: Session, instance_id: int) -> Path:
    stored = session.scalar(select(Instance.spool_path).where(Instance.id == instance_id))
    return service.spool.files.resolve(str(stored))


def _same_content(stored: Path, raw: bytes) -> bool:
    """The stored file and ``raw`` (another transfer syntax) hold the same attribute values
    and the same decoded pixels. Only for a resend in another transfer syntax (rare): both
    are decoded in full."""
    try:
        first, second = dcmread(stored), dcmread(io.BytesIO(raw))

        def tags(ds: Dataset) -> set[BaseTag]:
            return {e.tag for e in ds if e.tag.element != 0 and e.tag not in _NOT_CONTENT}

        if tags(first) != tags(second):
            return False
        if any(first[t].value != second[t].value for t in tags(first)):
            return False
        if ("PixelData" in first) != ("PixelData" in second):
            return False
        return "PixelData" not in first or bool(
            np.array_equal(first.pixel_array, second.pixel_array)
        )
    except Exception as exc:  # cannot decode one of them: not shown to be the same
        logger.info("could not compare two copies of an instance: %s", exception_summary(exc))
        return False


_NOT_CONTENT = {BaseTag(0x7FE00010), BaseTag(0xFFFCFFFC)}  # pixel data (compared decoded), padding


def _known_instance(
    service: StoreService,
    uid: str,
    known: Row[Any, Any, Any, Any, Any],
    raw: bytes,
    digest: str,
    ts: str,
    assoc_id: int | None,
) -> StoreOutcome:
    """A SOP Instance UID the node holds: the same content is a duplicate, answered with
    success (the same bytes; or, in another transfer syntax, the same attribute values and
    the same decoded pixels); other content is refused with 0x0111 (the first copy stays;
    the refusal keeps the other in spool/rejected like any refused dataset)."""
    first = service.spool.files.resolve(known.spool_path)
    same = known.sha256 == digest or (known.transfer_syntax_uid != ts and _same_content(first, raw))
    if same:
        if assoc_id is not None:
            with service.writer_lock, service.sessions.begin() as session:
                _count(session, assoc_id, duplicate=True)
        logger.info(
            "duplicate SOP instance %s: kept the first copy (series row %s)", uid, known.series_id
        )
        return StoreOutcome(SUCCESS, duplicate=True)
    other = (
        "with other content (in another transfer syntax)"
        if known.transfer_syntax_uid != ts
        else "with other content (same transfer syntax)"
    )
    raise Refused(
        DUPLICATE_SOP_INSTANCE,
        f"SOP Instance UID already stored (instance row {known.id}, series row "
        f"{known.series_id}) {other}; the stored copy is kept",
        f"stored sha256 {known.sha256}, received {digest}",
    )


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
        series = Series(
            study_id=study.id,
            series_uid=series_uid,
            n_instances=0,
            n_frames=0,
            state=SeriesState.RECEIVING,
            generation=1,
            **series_facts(ds).as_dict(),
        )
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
        .values(
            state=JobState.SUPERSEDED,
            finished_at=utcnow(),
            error="superseded: the series received more instances",
        )
    )
    series.state = SeriesState.RECEIVING
    series.generation += 1
    series.reason = None
    series.completed_at = None
    series.completion_trigger = None


def _count(
    session: Session, assoc_id: int | None, duplicate: bool = False, failed: bool = False
) -> None:
    if assoc_id is None:
        return
    column = (
        Association.n_failed
        if failed
        else Association.n_duplicate
        if duplicate
        else Association.n_stored
    )
    session.execute(
        update(Association).where(Association.id == assoc_id).values({column: column + 1})
    )


def _record_failure(
    service: StoreService,
    assoc_id: int | None,
    refusal: Refused,
    raw: bytes,
    sop_class: str | None,
    sop_uid: str | None,
) -> None:
    logger.warning(
        "C-STORE refused with 0x%04X (association %s, SOP %s): %s",
        refusal.status,
        assoc_id,
        safe(sop_uid),
        safe(refusal.logged, 300),
    )
    try:
        path = None
        reason = refusal.stored_reason
        if raw and refusal.status != OUT_OF_RESOURCES:
            path, not_kept = service.spool.quarantine(raw, refusal.status)
            if not_kept:
                reason = f"{reason} [dataset not kept: {not_kept}]"
        with service.writer_lock, service.sessions.begin() as session:
            session.add(
                StoreFailure(
                    association_id=assoc_id,
                    status=refusal.status,
                    reason=reason[:2000],
                    sop_class_uid=sop_class if sop_class and is_valid_uid(sop_class) else None,
                    sop_instance_uid=sop_uid if sop_uid and is_valid_uid(sop_uid) else None,
                    quarantine_path=service.spool.files.stored(path) if path else None,
                    received_at=dt.datetime.now(dt.UTC),
                )
            )
            _count(session, assoc_id, failed=True)
    except Exception as exc:
        logger.error(
            "could not record the refusal of SOP %s: %s", safe(sop_uid), exception_summary(exc)
        )
