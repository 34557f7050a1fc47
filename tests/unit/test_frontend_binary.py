"""The native receive front end, frontend/ketanode-scp.cc, driven as a black box.

The binary is built into a temporary directory with scripts/build-frontend.sh, started on a
free port with a temporary incoming directory, and fed with DCMTK's own storescu and echoscu.
The tests read its stdout line protocol (see frontend/README.md) and the files it leaves.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support import dcmtk_env, free_port

REPO = Path(__file__).resolve().parents[2]
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
LINE_TIMEOUT = 20.0
DEFAULT_CONTEXTS = f"{MR_IMAGE_STORAGE}\t{ExplicitVRLittleEndian},{ImplicitVRLittleEndian}\n"


@pytest.fixture(scope="session")
def scp_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("frontend") / "ketanode-scp"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "build-frontend.sh"), str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert out.is_file()
    return out


def make_mr(path: Path, size: int = 64, seed: int = 0) -> Dataset:
    """A small MR Image Storage Part-10 file (Explicit VR Little Endian, uint16 pixels)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Frontend^Test"
    ds.PatientID = "FRONTEND1"
    ds.Modality = "MR"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.InstanceNumber = seed + 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, size * size, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


class Scp:
    """A running ketanode-scp with its stdout lines collected by a reader thread."""

    def __init__(self, proc: subprocess.Popen[str], port: int, incoming: Path) -> None:
        self.proc = proc
        self.port = port
        self.incoming = incoming
        self.prefix = ""  # from the READY line
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[list[str]] = []
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=self._read, args=(stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def next_line(self, timeout: float = LINE_TIMEOUT) -> list[str]:
        line = self.lines.get(timeout=timeout)
        assert line.endswith("\n")
        fields = line[:-1].split("\t")
        self.seen.append(fields)
        return fields

    def wait_for(self, kind: str, timeout: float = LINE_TIMEOUT) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            fields = self.next_line(max(0.1, deadline - time.monotonic()))
            if fields[0] == kind:
                return fields

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


@pytest.fixture
def start_scp(scp_binary: Path, tmp_path: Path) -> Iterator[Callable[..., Scp]]:
    started: list[Scp] = []

    def start(
        *extra: str,
        max_associations: int = 4,
        bind: str = "127.0.0.1",
        contexts_text: str = DEFAULT_CONTEXTS,
    ) -> Scp:
        incoming = tmp_path / f"incoming{len(started)}"
        incoming.mkdir()
        contexts = tmp_path / f"contexts{len(started)}.txt"
        contexts.write_text(contexts_text)
        port = free_port()
        cmd = [
            str(scp_binary),
            "--port", str(port),
            "--bind", bind,
            "--aet", "KETANODE",
            "--incoming", str(incoming),
            "--contexts", str(contexts),
            "--max-associations", str(max_associations),
            "--acse-timeout", "10",
            "--dimse-timeout", "20",
            "--max-pdu", "65536",
            *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dcmtk_env()
        )
        scp = Scp(proc, port, incoming)
        started.append(scp)
        ready = scp.next_line()
        assert ready[:2] == ["READY", str(port)], ready
        scp.prefix = ready[2]  # <pid>-<start time in ns>: every file name starts with it
        assert ready[2].startswith(f"{scp.proc.pid}-"), ready
        return scp

    try:
        yield start
    finally:
        for scp in started:
            if scp.proc.poll() is None:
                scp.proc.kill()
            scp.proc.wait(timeout=20)
            for stream in (scp.proc.stdout, scp.proc.stderr):
                if stream is not None:
                    stream.close()


def storescu(
    port: int, files: list[Path], calling: str = "STORESCU", called: str = "KETANODE"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STORESCU, "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def echoscu(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ECHOSCU, "-aet", "ECHOSCU", "-aec", "KETANODE", "127.0.0.1", str(port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_store_is_durable_byte_identical_and_reported(
    start_scp: Callable[..., Scp], tmp_path: Path
) -> None:
    scp = start_scp()
    sent = [make_mr(tmp_path / f"mr{i}.dcm", seed=i) for i in range(3)]
    result = storescu(scp.port, [tmp_path / f"mr{i}.dcm" for i in range(3)])
    assert result.returncode == 0, result.stderr

    request = scp.wait_for("REQUEST")
    serial = request[1]
    assert request == ["REQUEST", serial, "STORESCU", "KETANODE", "127.0.0.1"]
    assert scp.next_line() == ["ACCEPT", serial]
    stored = [scp.next_line() for _ in sent]
    assert scp.next_line() == ["END", serial, "released"]

    for seq, (fields, ds) in enumerate(zip(stored, sent, strict=True), start=1):
        assert fields[0] == "STORED" and fields[1] == serial
        assert fields[2] == f"{scp.prefix}-{serial}-{seq}.dcm"
        assert fields[3:] == [MR_IMAGE_STORAGE, ds.SOPInstanceUID, ExplicitVRLittleEndian]
        got = pydicom.dcmread(scp.incoming / fields[2])
        assert got.SOPInstanceUID == ds.SOPInstanceUID
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got.PixelData == ds.PixelData
        assert got.PatientID == ds.PatientID

    names = sorted(p.name for p in scp.incoming.iterdir())
    assert names == sorted(f[2] for f in stored)
    assert not list(scp.incoming.glob("*.part"))
    assert scp.stop() == 0


def test_echo_is_answered(start_scp: Callable[..., Scp]) -> None:
    scp = start_scp()
    result = echoscu(scp.port)
    assert result.returncode == 0, result.stderr
    serial = scp.wait_for("REQUEST")[1]
    assert scp.next_line() == ["ACCEPT", serial]
    assert scp.next_line() == ["END", serial, "released"]
    assert scp.stop() == 0


def test_connection_closed_before_its_request_is_not_an_association(
    start_scp: Callable[..., Scp], tmp_path: Path
) -> None:
    """A port probe (connect, close) prints no line: it was never a request."""
    import socket

    scp = start_scp()
    for _ in range(3):
        socket.create_connection(("127.0.0.1", scp.port), timeout=5).close()
    make_mr(tmp_path / "a.dcm")
    sent = storescu(scp.port, [tmp_path / "a.dcm"])
    assert sent.returncode == 0, sent.stderr
    first = scp.next_line()
    assert first[0] == "REQUEST" and first[2] == "STORESCU", first
    assert scp.next_line() == ["ACCEPT", first[1]]
    assert scp.stop() == 0


def test_calling_ae_not_on_allow_list_is_rejected(
    start_scp: Callable[..., Scp], tmp_path: Path
) -> None:
    scp = start_scp(
        "--allow", "STORESCU@127.0.0.1", "--allow", "OTHER@10.0.0.9", "--allow", "ANY@*",
        "--allow", "NET@127.0.0.0/8", "--allow", "FARNET@10.0.0.0/8",
    )  # fmt: skip
    make_mr(tmp_path / "a.dcm")
    denied = storescu(scp.port, [tmp_path / "a.dcm"], calling="OTHER")
    assert denied.returncode != 0
    request = scp.wait_for("REQUEST")
    assert request[2:] == ["OTHER", "KETANODE", "127.0.0.1"]
    assert scp.next_line() == ["REJECT", request[1], "calling AE not allowed"]

    allowed = storescu(scp.port, [tmp_path / "a.dcm"])
    assert allowed.returncode == 0, allowed.stderr
    serial = scp.wait_for("REQUEST")[1]
    assert scp.next_line() == ["ACCEPT", serial]
    assert scp.next_line()[0] == "STORED"
    assert len(list(scp.incoming.glob("*.dcm"))) == 1

    wildcard = storescu(scp.port, [tmp_path / "a.dcm"], calling="ANY")
    assert wildcard.returncode == 0, wildcard.stderr
    serial = scp.wait_for("REQUEST")[1]
    assert scp.next_line() == ["ACCEPT", serial]
    assert len(list(scp.incoming.glob("*.dcm"))) == 2

    # a network in CIDR form (node.allowed_callers accepts one) covers the peer or not
    network = storescu(scp.port, [tmp_path / "a.dcm"], calling="NET")
    assert network.returncode == 0, network.stderr
    serial = scp.wait_for("REQUEST")[1]
    assert scp.next_line() == ["ACCEPT", serial]
    elsewhere = storescu(scp.port, [tmp_path / "a.dcm"], calling="FARNET")
    assert elsewhere.returncode != 0
    serial = scp.wait_for("REQUEST")[1]
    assert scp.next_line() == ["REJECT", serial, "calling AE not allowed"]
    assert scp.stop() == 0


def test_wrong_called_ae_is_rejected(start_scp: Callable[..., Scp], tmp_path: Path) -> None:
    scp = start_scp()
    make_mr(tmp_path / "a.dcm")
    result = storescu(scp.port, [tmp_path / "a.dcm"], called="NOTKETA")
    assert result.returncode != 0
    request = scp.wait_for("REQUEST")
    assert request[2:4] == ["STORESCU", "NOTKETA"]
    assert scp.next_line() == ["REJECT", request[1], "called AE title"]
    assert list(scp.incoming.iterdir()) == []
    assert scp.stop() == 0


def test_no_acceptable_context_is_rejected(start_scp: Callable[..., Scp]) -> None:
    scp = start_scp()
    ae = AE(ae_title="PYNET")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CT_IMAGE_STORAGE)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="KETANODE")
    assert assoc.is_rejected
    serial = scp.wait_for("REQUEST")[1]
    fields = scp.next_line()
    assert fields[:2] == ["REJECT", serial]
    assert scp.stop() == 0


def test_association_limit_rejects_with_reason(start_scp: Callable[..., Scp]) -> None:
    scp = start_scp(max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", scp.port, ae_title="KETANODE")
    try:
        assert held.is_established
        first = scp.wait_for("ACCEPT")[1]
        result = echoscu(scp.port)
        assert result.returncode != 0
        request = scp.wait_for("REQUEST")
        assert request[2] == "ECHOSCU"
        assert scp.next_line() == ["REJECT", request[1], "too many associations"]
    finally:
        held.release()
    assert scp.wait_for("END") == ["END", first, "released"]
    assert scp.stop() == 0


def test_sigterm_lets_current_association_finish_and_exits_zero(
    start_scp: Callable[..., Scp],
) -> None:
    scp = start_scp()
    ae = AE(ae_title="HOLDER")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", scp.port, ae_title="KETANODE")
    assert held.is_established
    serial = scp.wait_for("ACCEPT")[1]
    scp.proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    assert scp.proc.poll() is None  # still serving the open association
    assert held.send_c_echo().Status == 0x0000
    held.release()
    assert scp.proc.wait(timeout=20) == 0
    assert scp.wait_for("END") == ["END", serial, "released"]


def test_bind_address_is_honoured(start_scp: Callable[..., Scp]) -> None:
    scp = start_scp()
    # /proc/net/tcp: local address 0100007F:PORT in state 0A (LISTEN) = 127.0.0.1 only.
    table = Path("/proc/net/tcp").read_text()
    listen = [line.split()[1] for line in table.splitlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{scp.port:04X}" in listen
    assert f"00000000:{scp.port:04X}" not in listen
    assert scp.stop() == 0


def test_bad_command_line_exits_nonzero(scp_binary: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(scp_binary), "--port", "104"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert re.search(r"missing --bind", result.stderr)


def test_failed_rename_answers_failure_and_keeps_association(
    start_scp: Callable[..., Scp], tmp_path: Path
) -> None:
    scp = start_scp()
    # The first association is serial 1 and its first C-STORE is seq 1: put a directory
    # where that file must go, so rename() fails (EISDIR) after the data was received.
    blocker = scp.incoming / f"{scp.prefix}-1-1.dcm"
    (blocker / "occupied").mkdir(parents=True)
    first = make_mr(tmp_path / "a.dcm", seed=1)
    second = make_mr(tmp_path / "b.dcm", seed=2)
    ae = AE(ae_title="PYNET")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(MR_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="KETANODE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(first).Status == 0xC000
        assert assoc.send_c_store(second).Status == 0x0000
    finally:
        assoc.release()
    assert scp.wait_for("ACCEPT") == ["ACCEPT", "1"]
    failed = scp.next_line()
    assert failed[:3] == ["FAILED", "1", "C000"]
    assert failed[3].startswith("rename: ")
    stored = scp.next_line()
    assert stored[:4] == ["STORED", "1", f"{scp.prefix}-1-2.dcm", MR_IMAGE_STORAGE]
    assert stored[4] == second.SOPInstanceUID
    assert scp.next_line() == ["END", "1", "released"]
    assert not list(scp.incoming.glob("*.part"))
    assert scp.stop() == 0


def test_contexts_file_groups_and_more_than_128_abstract_syntaxes(
    start_scp: Callable[..., Scp], tmp_path: Path
) -> None:
    # 200 made-up SOP classes (DcmSCPConfig alone refuses more than 128 contexts), MR with
    # Explicit VR Little Endian only, CT with Implicit VR Little Endian only.
    lines = [f"1.2.826.0.1.3680043.8.498.999.{i}\t{ExplicitVRLittleEndian}\n" for i in range(200)]
    lines.append(f"{MR_IMAGE_STORAGE}\t{ExplicitVRLittleEndian}\n")
    lines.append(f"# comment\n\n{CT_IMAGE_STORAGE}\t{ImplicitVRLittleEndian}\n")
    scp = start_scp(contexts_text="".join(lines))
    mr = make_mr(tmp_path / "mr.dcm", seed=3)
    ct = make_mr(tmp_path / "ct.dcm", seed=4)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ct.Modality = "CT"
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    result = storescu(scp.port, [tmp_path / "mr.dcm", tmp_path / "ct.dcm"])
    assert result.returncode == 0, result.stderr
    serial = scp.wait_for("ACCEPT")[1]
    stored = [scp.next_line(), scp.next_line()]
    assert [f[3:] for f in stored] == [
        [MR_IMAGE_STORAGE, mr.SOPInstanceUID, ExplicitVRLittleEndian],
        [CT_IMAGE_STORAGE, ct.SOPInstanceUID, ImplicitVRLittleEndian],
    ]
    assert scp.next_line() == ["END", serial, "released"]
    got = pydicom.dcmread(scp.incoming / stored[1][2])
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert got.PixelData == ct.PixelData
    assert scp.stop() == 0


def test_a_file_already_at_the_name_is_never_replaced(
    start_scp: Callable[..., Scp], tmp_path: Path
) -> None:
    """The rename into place never replaces a file (RENAME_NOREPLACE): a file another run
    acknowledged stays as it was, and this C-STORE is answered with a failure instead."""
    scp = start_scp()
    earlier = scp.incoming / f"{scp.prefix}-1-1.dcm"
    earlier.write_bytes(b"acknowledged by an earlier run")
    make_mr(tmp_path / "a.dcm")
    storescu(scp.port, [tmp_path / "a.dcm"])
    failed = scp.wait_for("FAILED")
    assert failed[:3] == ["FAILED", "1", "C000"] and "rename" in failed[3], failed
    assert earlier.read_bytes() == b"acknowledged by an earlier run"
    assert not list(scp.incoming.glob("*.part"))
    assert scp.stop() == 0
