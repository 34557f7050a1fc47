"""Logging set-up. Log lines carry row ids and UIDs, never patient identifiers."""

from __future__ import annotations

import logging
import sys
import warnings

from ketanode.config import LoggingSettings

LIBRARIES = ("pynetdicom", "pydicom", "dicom2nifti", "apscheduler", "alembic", "sqlalchemy")


def quiet_dicom_libraries() -> None:
    """pydicom's validation warnings can quote element values (names, IDs): switch them off."""
    import pydicom.config  # imported here: the admin CLI does not need pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    warnings.filterwarnings("ignore", module=r"dicom2nifti(\..*)?")


def setup_logging(settings: LoggingSettings) -> None:
    quiet_dicom_libraries()
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
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
