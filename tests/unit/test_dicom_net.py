"""The requesting side's guard: its reactor thread leaves DIMSE responses for the caller.

pynetdicom's requestor reactor takes any queued DIMSE message when it is not paused, and
drops a response as "unexpected"; the caller then waits for a response that is gone (seen
in CI as a C-STORE with no response on a loaded machine). An idle association's reactor
loops with its checkpoint open, so a response queued there is taken within milliseconds
unless the guard keeps it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ketanode.dicom.net import keep_responses_for_caller
from tests.support import free_port


@pytest.fixture
def echo_scp() -> Iterator[int]:
    port = free_port()
    ae = AE(ae_title="ECHOSCP")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        yield port
    finally:
        server.shutdown()


def _association(port: int) -> object:
    ae = AE(ae_title="GUARDTEST")
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ECHOSCP")
    assert assoc.is_established
    return assoc


def _response() -> C_ECHO:
    rsp = C_ECHO()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = Verification
    rsp.Status = 0x0000
    return rsp


def _left_after(assoc: object, seconds: float) -> int:
    """Queue a response as the DIMSE layer would; how many are still queued after a while."""
    dimse = assoc.dimse  # type: ignore[attr-defined]
    dimse.msg_queue.put((1, _response()))
    time.sleep(seconds)
    return int(dimse.msg_queue.qsize())


def test_an_unguarded_reactor_takes_the_response(echo_scp: int) -> None:
    """The failure the guard is for, shown on pynetdicom as it is."""
    assoc = _association(echo_scp)
    try:
        assert _left_after(assoc, 0.3) == 0
    finally:
        assoc.release()  # type: ignore[attr-defined]


def test_the_guarded_reactor_leaves_the_response_for_the_caller(echo_scp: int) -> None:
    assoc = _association(echo_scp)
    keep_responses_for_caller(assoc)
    try:
        assert _left_after(assoc, 0.3) == 1
        # the caller gets it, and the association still works both ways afterwards
        _, msg = assoc.dimse.get_msg(block=True)  # type: ignore[attr-defined]
        assert isinstance(msg, C_ECHO) and msg.Status == 0
        assert assoc.send_c_echo().Status == 0  # type: ignore[attr-defined]
        assert assoc.send_c_echo().Status == 0  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
