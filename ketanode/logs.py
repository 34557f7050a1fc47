"""Logging set-up. Log lines carry row ids and UIDs, never patient identifiers."""

from __future__ import annotations

import logging
import re
import sys
import traceback
import warnings

from ketanode.config import LoggingSettings

LIBRARIES = ("pynetdicom", "pydicom", "dicom2nifti", "apscheduler", "alembic", "sqlalchemy")


# Anything but printable ASCII (control characters, DEL, and non-ASCII that a terminal or a
# log shipper could take for a control sequence or a line break, such as U+2028).
_UNSAFE = re.compile(r"[^\x20-\x7e]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: object, limit: int = 80) -> str:
    """A value that came from the network, fit for a log line: every character outside
    printable ASCII escaped (so it cannot forge a line or a terminal sequence), at most
    ``limit`` characters of the original (the rest counted, not shown)."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else str(value)
    shown, rest = text[:limit], len(text) - limit
    escaped = _UNSAFE.sub(_escape, shown)
    return f"{escaped}...(+{rest} chars)" if rest > 0 else escaped


def exception_summary(exc: BaseException, frames: int = 3) -> str:
    """The exception's type and the last ``frames`` places it passed, on one line; never its
    text (which can quote the data being parsed)."""
    where = [
        f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
        for frame in traceback.extract_tb(exc.__traceback__)[-frames:]
    ]
    return (
        f"{type(exc).__name__} at " + " <- ".join(reversed(where)) if where else type(exc).__name__
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class SafeFormatter(logging.Formatter):
    """Escapes control characters in the message itself (a traceback keeps its lines): a
    value that slipped into a message unescaped still cannot forge a log line."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = _CONTROL.sub(_escape, record.message)
        return super().formatMessage(record)


def quiet_dicom_libraries() -> None:
    """pydicom's validation warnings can quote element values (names, IDs): switch them off."""
    import pydicom.config  # imported here: the admin CLI does not need pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    warnings.filterwarnings("ignore", module=r"dicom2nifti(\..*)?")


def setup_logging(settings: LoggingSettings) -> None:
    quiet_dicom_libraries()
    fmt = SafeFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file is not None:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(settings.file, encoding="utf-8"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(settings.level)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(settings.library_level)
