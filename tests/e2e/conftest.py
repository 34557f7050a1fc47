"""Helpers for the end-to-end tests: the node runs as ``ketanode serve`` in a subprocess,
DCMTK ``storescu`` is the scanner, and results are read through the CLI and the database."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from ketanode.db.session import normalise_url
from ketanode.synthetic.phantom import simple_head
from ketanode.synthetic.series_writer import SeriesSpec, write_series
from tests.support import GE_DIR, STORESCU, NodeProcess, dcmtk_env, wait_for

FINAL_SERIES_STATES = {"done", "failed", "ignored"}


class Db:
    """Read-only look at the node's database from the test process (SQLite or PostgreSQL).

    A plain engine without the node's BEGIN IMMEDIATE hook, so reading never takes the
    SQLite write lock away from the node under test.
    """

    def __init__(self, url: str) -> None:
        self.engine = create_engine(normalise_url(url), poolclass=NullPool)

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def has_tables(self) -> bool:
        try:
            self.scalar("SELECT count(*) FROM instance")
            return True
        except Exception:
            return False

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def db_reader(db_url: str) -> Iterator[Db]:
    db = Db(db_url)
    yield db
    db.close()


def cli_json(node: NodeProcess, *args: str) -> Any:
    proc = node.cli(*args, "--json")
    return json.loads(proc.stdout)


def wait_series_final(
    node: NodeProcess, db: Db, n_series: int = 1, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Wait (polling the database, which is cheap) until ``n_series`` series reached a final
    state, then return what ``series list --json`` says about them."""

    def settled() -> bool:
        if not db.has_tables():
            return False
        states = [r["state"] for r in db.rows("SELECT state FROM series")]
        return len(states) >= n_series and all(s in FINAL_SERIES_STATES for s in states)

    wait_for(settled, timeout, interval=0.2, what=f"{n_series} series to settle")
    return list(cli_json(node, "series", "list"))


def ge_files() -> list[Path]:
    files = sorted(p for p in GE_DIR.iterdir() if p.is_file())
    assert len(files) == 130, f"expected the 130-file GE series in {GE_DIR}"
    return files


def copy_ge(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src in ge_files():
        target = dest / src.name
        shutil.copyfile(src, target)
        out.append(target)
    return out


def generated_series(
    dest: Path, n_slices: int, size: int = 128, spec: SeriesSpec | None = None, seed: int = 0
) -> list[Path]:
    """A sagittal 3D T1-like series (1 mm isotropic) that the default rules select."""
    volume = simple_head((n_slices, size, size), seed=seed) * 1.5
    return write_series(volume, (1.0, 1.0, 1.0), dest, spec or SeriesSpec())


def sha256_file(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pixel_sha256(path: Path | str) -> str:
    """SHA-256 of the PixelData element value (independent of the file meta header)."""
    ds = dcmread(str(path))
    return hashlib.sha256(ds.PixelData).hexdigest()


def sop_uid(path: Path | str) -> str:
    return str(dcmread(str(path), stop_before_pixels=True).SOPInstanceUID)


def spool_files(node: NodeProcess) -> list[Path]:
    """Instance files in the spool (not partial files, not quarantined refusals)."""
    return sorted(
        p
        for p in node.spool.rglob("*.dcm")
        if p.is_file()
        and ".tmp" not in p.parts
        and "rejected" not in p.parts
        and "incoming" not in p.parts  # the native front end's files, before indexing
    )


def part_files(node: NodeProcess) -> list[Path]:
    return sorted(node.spool.rglob("*.part"))


# --- storescu -v transcript ------------------------------------------------------------

_SENDING = re.compile(r"^I: Sending file: (?P<path>.+?)\s*$")
_SUCCESS = re.compile(r"^I: Received Store Response \(Success\)")


def acknowledged_files(transcript: str) -> list[Path]:
    """Files storescu saw answered with success: a 'Sending file' line followed by a
    'Received Store Response (Success)' line before the next file."""
    acked: list[Path] = []
    current: Path | None = None
    for line in transcript.splitlines():
        m = _SENDING.match(line)
        if m:
            current = Path(m.group("path"))
            continue
        if _SUCCESS.match(line) and current is not None:
            acked.append(current)
            current = None
    return acked


@dataclass
class StoreSCUProcess:
    """storescu -v in the background, its transcript in a file."""

    proc: subprocess.Popen[bytes]
    transcript_path: Path

    def transcript(self) -> str:
        return self.transcript_path.read_text(errors="replace")

    def acknowledged(self) -> list[Path]:
        return acknowledged_files(self.transcript())

    def wait(self, timeout: float = 60.0) -> int:
        return int(self.proc.wait(timeout))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_storescu(
    port: int, files: list[Path], transcript: Path, extra: list[str] | None = None
) -> StoreSCUProcess:
    out = transcript.open("wb")
    try:
        proc = subprocess.Popen(
            [
                STORESCU,
                "-v",
                "-aet",
                "STORESCU",
                "-aec",
                "KETANODE",
                *(extra or []),
                "127.0.0.1",
                str(port),
                *[str(f) for f in files],
            ],
            env=dcmtk_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    finally:
        out.close()
    return StoreSCUProcess(proc, transcript)


@pytest.fixture
def storescu_processes() -> Iterator[list[StoreSCUProcess]]:
    """Background storescu processes a test starts; killed at teardown."""
    started: list[StoreSCUProcess] = []
    yield started
    for scu in started:
        scu.kill()


def nifti_arrays_equal(a: np.ndarray, b: np.ndarray) -> bool:
    dtype = np.result_type(a.dtype, b.dtype)
    return bool(a.shape == b.shape and np.array_equal(a.astype(dtype), b.astype(dtype)))


def kill_while_four_associations_store(
    node: NodeProcess,
    files: list[Path],
    logs: Path,
    started: list[StoreSCUProcess],
    kill_after: int,
) -> list[Path]:
    """Four storescu processes at once, a quarter of ``files`` each; SIGKILL of the node once
    ``kill_after`` C-STOREs were acknowledged in all. Checks that the four really ran
    together and in order; returns the files some sender saw acknowledged."""
    quarter = -(-len(files) // 4)
    parts = [files[i : i + quarter] for i in range(0, len(files), quarter)]
    scus = [
        start_storescu(node.port, part, logs / f"storescu-{i}.log") for i, part in enumerate(parts)
    ]
    started.extend(scus)
    wait_for(
        lambda: sum(len(scu.acknowledged()) for scu in scus) >= kill_after,
        60,
        interval=0.01,
        what=f"{kill_after} acknowledged C-STOREs over four associations",
    )
    node.kill()
    for scu in scus:
        scu.wait(30)
    acked = [f for scu in scus for f in scu.acknowledged()]
    assert kill_after <= len(acked) < len(files), len(acked)
    assert sum(1 for scu in scus if scu.acknowledged()) >= 2, "not concurrent"
    for scu, part in zip(scus, parts, strict=True):
        assert scu.acknowledged() == part[: len(scu.acknowledged())]  # in order, one at a time
    return acked
