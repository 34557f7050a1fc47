"""The DICOM listener (SCP): C-ECHO and C-STORE, allow-list, optional TLS."""

from __future__ import annotations

import copy
import logging
import ssl
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from ketanode.config import NodeSettings, TLSSettings
from ketanode.dicom.net import set_nodelay
from ketanode.dicom.sop import ACCEPTED_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES
from ketanode.receive import wakeups
from ketanode.receive.associations import AssociationLog
from ketanode.receive.store import StoreService, handle_store

logger = logging.getLogger(__name__)

# pynetdicom must not log dataset identifiers (patient names, IDs) at any level.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False


def server_tls_context(tls: TLSSettings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    if tls.ca_certificates is None:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _Contexts(list[PresentationContext]):
    """The server's presentation contexts. pynetdicom gives each association its own copy
    (``deepcopy``): of the node's 171 contexts that took about 40 ms of CPU per association,
    holding the GIL while the other associations waited. The same copy is made here in well
    under a millisecond: new context objects with their own transfer syntax lists, whose
    UIDs (immutable strings) are shared."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            twin = copy.copy(context)
            twin._transfer_syntax = list(context._transfer_syntax)
            copies.append(twin)
        return copies


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: always success."""
    return 0x0000


def build_ae(settings: NodeSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.network_timeout = settings.network_timeout_seconds
    # Its own, short: a connection that sends no A-ASSOCIATE-RQ (idle, half-open) is closed
    # after it, so it cannot hold one of max_associations for long.
    ae.acse_timeout = settings.acse_timeout_seconds
    ae.dimse_timeout = settings.dimse_timeout_seconds
    ae.maximum_pdu_size = settings.max_pdu_bytes
    # The allow-list and the called-AE check are ours (EVT_REQUESTED), so they are recorded.
    ae.require_called_aet = False
    ae.add_supported_context(Verification)
    for uid in STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


class Listener:
    def __init__(self, settings: NodeSettings, store: StoreService, log: AssociationLog) -> None:
        self.settings = settings
        self.store = store
        self.log = log
        self.ae = build_ae(settings)
        self.server: ThreadedAssociationServer | None = None

    def start(self) -> tuple[str, int]:
        # pynetdicom's reactors woken by their work, not every millisecond (wakeups.py)
        wakeups.install()
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_CONN_OPEN, wakeups.attach),
            (evt.EVT_CONN_CLOSE, wakeups.detach),
            (evt.EVT_REQUESTED, self.log.handle_requested),
            (evt.EVT_ACCEPTED, self.log.handle_accepted),
            (evt.EVT_REJECTED, self.log.handle_rejected),
            (evt.EVT_RELEASED, self.log.handle_released),
            (evt.EVT_ABORTED, self.log.handle_aborted),
            (evt.EVT_CONN_CLOSE, self.log.handle_conn_closed),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.store]),
        ]
        ctx = server_tls_context(self.settings.tls) if self.settings.tls.enabled else None
        self.server = self.ae.start_server(
            (self.settings.bind_address, self.settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=ctx,
        )
        assert self.server is not None
        self.server.contexts = _Contexts(self.server.contexts)
        host, port = self.server.server_address[:2]
        logger.info(
            "listening as %s on %s:%s%s",
            self.settings.ae_title,
            host,
            port,
            " (TLS)" if ctx else "",
        )
        return str(host), int(port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.ae.shutdown()
