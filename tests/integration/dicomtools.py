"""Helpers for the integration tests: a real SCU (pynetdicom), DCMTK tools, test data.

Everything here talks to a real node over TCP; nothing is mocked. Files are sent without
being decoded (pynetdicom's chunked mode sends the bytes after the file meta as they are
on disk), so broken datasets reach the node exactly as written and stored copies can be
compared byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ketanode.config import MR_IMAGE_STORAGE
from ketanode.dicom.net import keep_responses_for_caller
from ketanode.synthetic.phantom import simple_head
from ketanode.synthetic.series_writer import SeriesSpec, write_series

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ECHOSCU = "/usr/bin/echoscu"
DCMCJPEG = "/usr/bin/dcmcjpeg"
DCMCJPLS = "/usr/bin/dcmcjpls"
DCMCRLE = "/usr/bin/dcmcrle"
OPENSSL = "/usr/bin/openssl"
TEST_AE = "TESTSCU"


def require_tool(path: str) -> str:
    """A missing tool is a failure, never a skip."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise AssertionError(f"required tool {path} is not installed")
    return path


# ---------------------------------------------------------------- the SCU


class NotEstablished(AssertionError):
    def __init__(self, assoc: object) -> None:
        self.rejected = bool(getattr(assoc, "is_rejected", False))
        self.aborted = bool(getattr(assoc, "is_aborted", False))
        super().__init__(
            f"association not established (rejected={self.rejected}, aborted={self.aborted})"
        )


@dataclass
class Scu:
    assoc: object

    def store(self, path: Path) -> int:
        """C-STORE one file as it is on disk (not decoded); returns the DIMSE status."""
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            rsp = self.assoc.send_c_store(path)  # type: ignore[attr-defined]
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
        assert "Status" in rsp, f"no C-STORE response for {path} (association dropped?)"
        return int(rsp.Status)

    def store_all(self, paths: Sequence[Path]) -> list[int]:
        return [self.store(p) for p in paths]

    def echo(self) -> int:
        rsp = self.assoc.send_c_echo()  # type: ignore[attr-defined]
        assert "Status" in rsp, "no C-ECHO response"
        return int(rsp.Status)

    @property
    def established(self) -> bool:
        return bool(self.assoc.is_established)  # type: ignore[attr-defined]


def contexts_for(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) from each file's meta, as pynetdicom will send it."""
    seen: dict[tuple[str, str], None] = {}
    for p in paths:
        meta, _ = split_dataset(Path(p))
        seen[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
    return list(seen)


@contextmanager
def association(
    port: int,
    paths: Sequence[Path] = (),
    *,
    calling_ae: str = TEST_AE,
    called_ae: str = "KETANODE",
    host: str = "127.0.0.1",
    bind_address: tuple[str, int] | None = None,
    tls: ssl.SSLContext | None = None,
    server_hostname: str = "localhost",
    extra_contexts: Sequence[tuple[str, str]] = (),
) -> Iterator[Scu]:
    """One association proposing Verification plus a context for every file's (class, TS).
    Released on exit; raises NotEstablished if the node did not accept it."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    for sop, ts in [*contexts_for(paths), *extra_contexts]:
        ae.add_requested_context(sop, [ts])
    kwargs: dict[str, object] = {"ae_title": called_ae}
    if bind_address is not None:
        kwargs["bind_address"] = bind_address
    if tls is not None:
        kwargs["tls_args"] = (tls, server_hostname)
    assoc = ae.associate(host, port, **kwargs)  # type: ignore[arg-type]
    if not assoc.is_established:
        ae.shutdown()
        raise NotEstablished(assoc)
    keep_responses_for_caller(assoc)
    try:
        yield Scu(assoc)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def send(port: int, paths: Sequence[Path], **kwargs: object) -> list[int]:
    """Every file on one association; the statuses in order."""
    with association(port, paths, **kwargs) as scu:  # type: ignore[arg-type]
        return scu.store_all(paths)


def echoscu(
    port: int, calling_ae: str = TEST_AE, called_ae: str = "KETANODE"
) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool(ECHOSCU), "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"}
    )


# ---------------------------------------------------------------- test data


def t1_series(
    out_dir: Path, n_slices: int = 40, size: int = 64, seed: int = 0, **spec: object
) -> list[Path]:
    """A structural 3D T1 (1 mm isotropic, sagittal) that the default rules select."""
    volume = simple_head((n_slices, size, size), seed=seed)
    return write_series(volume, (1.0, 1.0, 1.0), out_dir, SeriesSpec(**spec))  # type: ignore[arg-type]


def small_series(
    out_dir: Path,
    n_slices: int,
    voxel_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
    size: int = 32,
    **spec: object,
) -> list[Path]:
    volume = simple_head((n_slices, size, size))
    return write_series(volume, voxel_mm, out_dir, SeriesSpec(**spec))  # type: ignore[arg-type]


def one_mr(out_dir: Path, **spec: object) -> Path:
    """A single valid MR image (its own series)."""
    return small_series(out_dir, 1, **spec)[0]


def write_raw_file(
    path: Path,
    ds: Dataset,
    meta_sop_class: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """Write ``ds`` with a file meta that may disagree with it (the request's SOP class
    comes from the meta)."""
    meta = FileMetaDataset()
    sop_class = meta_sop_class or str(ds.get("SOPClassUID", MR_IMAGE_STORAGE))
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(str(ds.get("SOPInstanceUID", generate_uid())))
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return path


def with_garbage(valid: Path, out: Path, n_bytes: int = 4096, seed: int = 7) -> Path:
    """The valid file meta of ``valid`` followed by random bytes instead of a dataset."""
    raw = valid.read_bytes()
    _, offset = split_dataset(valid)
    garbage = np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    out.write_bytes(raw[:offset] + garbage)
    return out


def truncated(valid: Path, out: Path, cut: int = 1000) -> Path:
    """``valid`` with its last ``cut`` bytes (pixel data) gone."""
    out.write_bytes(valid.read_bytes()[:-cut])
    return out


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta, as it travels over the network."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dcmtk_compress(tool: str, src: Path, dst: Path, *args: str) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [require_tool(tool), *args, str(src), str(dst)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"{tool} failed: {proc.stderr}"
    return dst


def transfer_syntax(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


# ---------------------------------------------------------------- TLS material


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self, with_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        if with_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


def make_pki(directory: Path) -> Pki:
    """A CA and a server and a client certificate, made with the openssl CLI."""
    openssl = require_tool(OPENSSL)
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        proc = subprocess.run(
            [openssl, *args], cwd=directory, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"openssl {' '.join(args)} failed: {proc.stderr}"

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ketanode test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    for name, usage, san in (
        ("server", "serverAuth", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "clientAuth", "subjectAltName=DNS:testscu"),
    ):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=ketanode test {name}",
        )
        (directory / f"{name}.ext").write_text(
            f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{san}\n"
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return Pki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )


def copy_files(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(p, out_dir / p.name)) for p in paths]
