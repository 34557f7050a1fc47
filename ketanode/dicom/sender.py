"""The node as an SCU: C-ECHO to a peer, C-STORE of files (TCP_NODELAY set)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ketanode.dicom.associations import set_nodelay

logger = logging.getLogger(__name__)

DEFAULT_CALLING_AE = "KETANODE_SCU"


class AssociationFailed(Exception):
    pass


@dataclass
class SendReport:
    sent: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, status: int) -> None:
        key = f"0x{status:04X}"
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if status == 0:
            self.sent += 1


def _ae(calling_ae: str) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
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
        raise AssociationFailed(_why(assoc))
    return assoc


def _why(assoc: Any) -> str:
    if assoc.is_rejected:
        return "association rejected by the peer"
    if assoc.is_aborted:
        return "association aborted by the peer"
    return "no association (peer unreachable or not answering)"


def send_files(
    host: str,
    port: int,
    called_ae: str,
    files: Iterable[Path],
    calling_ae: str = DEFAULT_CALLING_AE,
    tls: ssl.SSLContext | None = None,
) -> SendReport:
    """C-STORE every file on one association, proposing each file's own transfer syntax."""
    files = list(files)
    contexts: dict[tuple[str, str], None] = {}
    for f in files:
        meta = dcmread(str(f), stop_before_pixels=True, specific_tags=["SOPClassUID"])
        contexts[(str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID))] = None
    ae = _ae(calling_ae)
    ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in contexts]
    assoc = _associate(ae, host, port, called_ae, tls)
    report = SendReport()
    try:
        for f in files:
            rsp = assoc.send_c_store(f)
            report.add(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        assoc.release()
    return report
