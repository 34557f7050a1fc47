"""Temporary files of the imaging libraries, kept inside one folder that is removed after.

ANTsPy writes its intermediate files (registration transforms, Atropos prior images) with
``tempfile.mktemp`` into the system temporary folder and leaves many of them there: about
three files and 1.4 MB per job, which fills a node's disk over thousands of scans. Inside
:func:`scratch_dir`, Python's temporary folder (``tempfile.tempdir``, and ``TMPDIR`` for
child processes) is a folder of the job's own, removed with everything in it on the way out,
whatever the library left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch_dir(path: str | Path) -> Iterator[Path]:
    """Redirect temporary files to ``path`` (created, then removed with its content).

    Process-wide: meant for a job's own process (the node runs each job in one) or a
    command-line run, not for threads that share a process."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(folder)
    os.environ["TMPDIR"] = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(folder, ignore_errors=True)
