"""What both network sides share: the socket settings of a DICOM association."""

from __future__ import annotations

import logging
import socket

from pynetdicom.events import Event

logger = logging.getLogger(__name__)


def set_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler (both roles): turn Nagle off, pynetdicom leaves it on."""
    try:
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        logger.debug("could not set TCP_NODELAY", exc_info=True)
