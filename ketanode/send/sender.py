"""The node as an SCU: C-ECHO, and C-STORE of its own uncompressed files (TCP_NODELAY set)."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ketanode.dicom.net import keep_responses_for_caller, set_nodelay

logger = logging.getLogger(__name__)

DEFAULT_CALLING_AE = "KETANODE_SCU"


class AssociationFailed(Exception):
    pass


def _ae(calling_ae: str, timeout: float = 60.0) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = min(30.0, timeout)
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae


_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, set_nodelay)]


def echo(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = DEFAULT_CALLING_AE,
    tls: ssl.SSLContext | None = None,
) -> int:
    """C-ECHO; returns the DIMSE status. Raises AssociationFailed when not accepted."""
    ae = _ae(calling_ae)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, host, port, called_ae, tls)
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else -1
    finally:
        assoc.release()


def _associate(ae: AE, host: str, port: int, called_ae: str, tls: ssl.SSLContext | None) -> Any:
    """An established association (TCP_NODELAY set), or AssociationFailed with the reason."""
    assoc = ae.associate(
        host,
        port,
        ae_title=called_ae,
        evt_handlers=_HANDLERS,
        tls_args=(tls, host) if tls else None,
    )
    if not assoc.is_established:
        raise AssociationFailed(_why(assoc, host, port))
    keep_responses_for_caller(assoc)
    return assoc


def _why(assoc: Any, host: str, port: int) -> str:
    if assoc.is_rejected:
        return "association rejected by the peer (called/calling AE title or address not accepted)"
    try:  # pynetdicom reports a refused TCP connection as an abort: tell them apart
        with socket.create_connection((host, port), timeout=2.0):
            pass
    except OSError as exc:
        return f"no association: peer unreachable ({exc.strerror or exc})"
    if assoc.is_aborted:
        return "association aborted by the peer"
    return "no association (peer not answering)"


@dataclass(frozen=True)
class StoreOutcome:
    """One file's C-STORE: the DIMSE status, or why it was not sent (status None)."""

    path: Path
    status: int | None
    error: str | None = None

    @property
    def stored(self) -> bool:
        """Success (0x0000) or a warning (0x0001, 0xB0xx: stored, with a remark)."""
        return self.status is not None and (
            self.status in (0x0000, 0x0001) or (self.status & 0xF000) == 0xB000
        )


def client_tls_context(
    ca_certificates: Path | None, certificate: Path | None, private_key: Path | None
) -> ssl.SSLContext:
    """TLS 1.2+ towards a peer: verify it with the CA bundle, present our certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_certificates)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # DICOM peers are addressed by IP; the CA is the trust anchor
    if certificate is not None and private_key is not None:
        ctx.load_cert_chain(certificate, private_key)
    return ctx


def store_uncompressed(
    host: str,
    port: int,
    called_ae: str,
    files: Iterable[Path],
    calling_ae: str = DEFAULT_CALLING_AE,
    tls: ssl.SSLContext | None = None,
    timeout: float = 60.0,
) -> list[StoreOutcome]:
    """C-STORE files written in an uncompressed transfer syntax (the node's own objects) on
    one association, proposing Explicit and Implicit VR Little Endian for each SOP class:
    each file goes in whichever the peer accepted. A file that cannot be read or has no
    accepted context is reported with its reason; the others are still sent; after a lost
    association the rest are reported unsent. Raises AssociationFailed when no association
    is established."""
    files = list(files)
    ae = _ae(calling_ae, timeout)
    classes: dict[str, None] = {}
    outcomes: dict[Path, StoreOutcome] = {}
    for f in files:
        try:
            meta = dcmread(str(f), stop_before_pixels=True, specific_tags=["SOPClassUID"])
            classes[str(meta.SOPClassUID)] = None
        except Exception as exc:  # unreadable or missing: report it, send the rest
            outcomes[f] = StoreOutcome(f, None, f"cannot read {f.name}: {exc}")
    if not classes:
        return [outcomes[f] for f in files]
    ae.requested_contexts = [
        build_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for sop in classes
    ]
    assoc = _associate(ae, host, port, called_ae, tls)
    try:
        for f in files:
            if f in outcomes:
                continue
            try:
                rsp = assoc.send_c_store(f)
            except ValueError as exc:  # no accepted presentation context for this object
                outcomes[f] = StoreOutcome(f, None, str(exc))
                continue
            if "Status" not in rsp and not assoc.is_established:
                lost = "association lost while sending (aborted or timed out)"
                for g in files:
                    outcomes.setdefault(g, StoreOutcome(g, None, lost))
                break
            if "Status" not in rsp:
                outcomes[f] = StoreOutcome(f, None, "no response (timeout or connection lost)")
                continue
            status = int(rsp.Status)
            comment = str(rsp.get("ErrorComment", "") or "")
            outcomes[f] = StoreOutcome(f, status, comment or None)
    finally:
        if assoc.is_established:
            assoc.release()
    return [outcomes[f] for f in files]
