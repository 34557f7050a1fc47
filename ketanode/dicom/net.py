"""What both network sides share: the socket settings of a DICOM association, and a guard
for the requesting side's DIMSE responses."""

from __future__ import annotations

import logging
import socket
from typing import Any

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


def keep_responses_for_caller(assoc: Any) -> None:
    """A requestor's own reactor thread never takes a DIMSE *response* off the queue.

    pynetdicom's requestor runs a reactor thread beside the caller: before each request the
    caller pauses it (``_reactor_checkpoint``) and waits for its ``_is_paused`` flag. That
    flag still says "paused" for a moment after the previous request let the reactor go, so
    on a busy machine the reactor can pass the checkpoint late, find the response meant for
    the caller, drop it as "unexpected" and leave the caller to time out (pynetdicom issue
    #875). The reactor only has to serve requests the peer sends (none, for C-STORE and
    C-ECHO); responses stay queued for the caller, who waits for them.
    """
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block:
            _, msg = dimse.peek_msg()
            if msg is None or not msg.is_valid_request:
                return None, None
        return take(block)

    dimse.get_msg = get_msg
