"""pynetdicom's two reactor loops, woken by their work instead of polling every millisecond.

Each association runs two pynetdicom threads that poll: the DUL reactor (``dul.py``) sleeps
``_run_loop_delay`` (1 ms) whenever a loop found nothing to do, and the association reactor
(``association.py``) sleeps 1 ms before every look for a DIMSE message. A C-STORE crosses
both three times (the request's PDUs in, the assembled message to the handler, the response
out), so each instance waited about 2 to 3 ms in sleeps: with a handler that did nothing,
pynetdicom took about 100 to 150 instances per second on one association.

Here those two sleeps (only those: they are told apart by the calling function) wait on what
ends them instead: the DUL reactor in ``select()`` on its socket and on a wake-up socket that
a primitive queued for sending writes to; the association reactor on its DIMSE message
queue. The timeout is unchanged, so every other check of both loops (timers, release, abort,
the DUL's end) runs at least as often as before, and an idle association costs no more.
Installed once, by the listener (:func:`install`); a thread that is not one of those reactors
sleeps as before.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import sys
import threading
import time
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom.events import Event

logger = logging.getLogger(__name__)

_real_sleep = time.sleep
_installed = threading.Lock()
_done = False
# the DUL attribute that holds its wake-up socket (the reading end)
_WAKE = "_ketanode_wake_reader"


class _WakingQueue(queue.Queue[Any]):
    """The DUL's ``to_provider_queue``: a put also wakes the DUL reactor's ``select()``."""

    def __init__(self, waker: socket.socket) -> None:
        super().__init__()
        self.waker = waker

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        # full (already woken) or closed (the association ended): nothing to do
        with contextlib.suppress(OSError):
            self.waker.send(b"\0")


class _Clock:
    """Stands in for the ``time`` module inside one pynetdicom module: everything is the
    real module's but ``sleep``, which ``reactor_wait`` replaces when ``reactor`` (the name
    of the calling function) calls it."""

    def __init__(self, reactor: str, reactor_wait: Any) -> None:
        self._reactor = reactor
        self._wait = reactor_wait

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if sys._getframe(1).f_code.co_name != self._reactor:
            _real_sleep(seconds)
            return
        try:
            self._wait(threading.current_thread(), seconds)
        except Exception:  # a closed socket, a thread that is not what it seems
            _real_sleep(seconds)


def _dul_wait(thread: Any, seconds: float) -> None:
    """Until the peer sends something, a primitive is queued to send, or ``seconds``."""
    reader = getattr(thread, _WAKE, None)
    transport = getattr(thread, "socket", None)
    sock = getattr(transport, "socket", None)
    if reader is None or sock is None:
        _real_sleep(seconds)
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return  # decrypted bytes already buffered: select() would not see them
    readable, _, _ = select.select([sock, reader], [], [], seconds)
    if reader in readable:
        try:
            while reader.recv(4096):
                pass
        except OSError:  # drained (BlockingIOError) or closed
            pass


def _association_wait(thread: Any, seconds: float) -> None:
    """Until a DIMSE message is queued for the association reactor, or ``seconds``."""
    messages = getattr(getattr(thread, "dimse", None), "msg_queue", None)
    if not isinstance(messages, queue.Queue) or not getattr(thread, "is_acceptor", False):
        # A requestor's caller waits on the same queue for its responses: a put wakes one
        # waiter, and it must be the caller, so the requestor's reactor sleeps as it did.
        _real_sleep(seconds)
        return
    with messages.not_empty:
        if not messages.queue:
            messages.not_empty.wait(seconds)


def install() -> None:
    """Put the waiting clocks into pynetdicom's dul and association modules (once)."""
    global _done
    with _installed:
        if _done:
            return
        _dul.time = _Clock("run_reactor", _dul_wait)  # type: ignore[attr-defined,assignment]
        _association.time = _Clock(  # type: ignore[attr-defined,assignment]
            "_run_reactor", _association_wait
        )
        _done = True


def attach(event: Event) -> None:
    """EVT_CONN_OPEN handler: give the association's DUL its wake-up socket pair (before
    its reactor starts; without one it sleeps as pynetdicom does)."""
    dul = event.assoc.dul
    try:
        reader, writer = socket.socketpair()
    except OSError:
        logger.debug("no wake-up socket for the DUL reactor", exc_info=True)
        return
    reader.setblocking(False)
    writer.setblocking(False)
    pending = dul.to_provider_queue
    waking = _WakingQueue(writer)
    while True:  # nothing is queued yet at connection open; keep it if something is
        try:
            waking.put(pending.get_nowait())
        except queue.Empty:
            break
    dul.to_provider_queue = waking
    setattr(dul, _WAKE, reader)


def detach(event: Event) -> None:
    """EVT_CONN_CLOSE handler: close the association's wake-up sockets."""
    dul = event.assoc.dul
    reader = getattr(dul, _WAKE, None)
    waking = dul.to_provider_queue
    setattr(dul, _WAKE, None)
    if reader is not None:
        reader.close()
    if isinstance(waking, _WakingQueue):
        waking.waker.close()
