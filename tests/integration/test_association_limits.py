"""The association limit and connections that never associate (issue 13, item 10).

- A caller refused because ``node.max_associations`` are open leaves what every other
  refusal leaves: an association row (rejected, with the reason), an audit event and a log
  line.
- TCP connections that never send an A-ASSOCIATE-RQ cannot hold the slots: one that closes
  frees its slot at once, one that stays open idle (or half-open) is closed after
  ``node.acse_timeout_seconds``; an allowed scanner is then accepted.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from ketanode.db.models import AuditEvent
from tests.integration.conftest import NodeFactory, RunningNode
from tests.integration.dicomtools import NotEstablished, association, one_mr
from tests.support import storescu


def _idle_connections(port: int, n: int) -> list[socket.socket]:
    conns = []
    for _ in range(n):
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conns.append(conn)
    time.sleep(0.3)  # the server has accepted them and started their association threads
    return conns


def _rejected(node: RunningNode) -> list[object]:
    return [a for a in node.associations() if a.outcome == "rejected"]


def _wait_accepting(node: RunningNode, path: Path, within: float) -> float:
    """Seconds until an association is accepted and a C-STORE succeeds (fails after
    ``within``)."""
    start = time.monotonic()
    while True:
        try:
            with association(node.port, [path]) as scu:
                assert scu.store(path) == 0
            return time.monotonic() - start
        except NotEstablished:
            if time.monotonic() - start > within:
                raise
            time.sleep(0.2)


def test_association_limit_is_recorded_like_other_refusals(
    node_factory: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = node_factory({"node": {"max_associations": 2, "acse_timeout_seconds": 30}})
    mr = one_mr(tmp_path / "mr")
    caplog.set_level(logging.INFO, logger="ketanode")
    with association(node.port, [mr]) as first, association(node.port, [mr]) as second:
        assert first.echo() == 0 and second.echo() == 0
        with pytest.raises(NotEstablished) as refused, association(node.port, [mr]):
            pass
        assert refused.value.rejected
    (row,) = node.wait(lambda: _rejected(node), what="rejected association row")
    assert row.reason is not None and "association limit reached (2" in row.reason
    assert (row.calling_ae, row.called_ae, row.peer_address) == ("TESTSCU", "KETANODE", "127.0.0.1")
    assert row.ended_at is not None
    events = node.all(AuditEvent, AuditEvent.kind == "association")
    (event,) = [e for e in events if e.outcome == "rejected"]
    assert event.subject == f"association:{row.id}" and event.actor == "TESTSCU"
    assert event.detail is not None and "association limit reached" in event.detail["reason"]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("rejected: association limit reached" in line for line in lines), lines
    # DCMTK sees the rejection too, and nothing is left open afterwards
    node.wait_association_ended(3)


def test_closed_and_idle_connections_do_not_hold_slots(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory({"node": {"max_associations": 2, "acse_timeout_seconds": 2}})
    mr = one_mr(tmp_path / "mr")

    # two connections that never associate and then close: their slots are free at once
    conns = _idle_connections(node.port, 2)
    for conn in conns:
        conn.close()
    waited = _wait_accepting(node, mr, within=1.5)
    assert waited < 1.5, waited

    # two that stay open and silent (or whose peer vanished): closed after the ACSE timeout
    conns = _idle_connections(node.port, 2)
    try:
        start = time.monotonic()
        proc = storescu(node.port, [mr], check=False)  # DCMTK, as a scanner would
        waited = time.monotonic() - start
        while proc.returncode != 0 and time.monotonic() - start < 6:
            time.sleep(0.2)
            proc = storescu(node.port, [mr], check=False)
        waited = time.monotonic() - start
        assert proc.returncode == 0, proc.stderr[-500:]
        assert waited < 6, waited  # the 2 s ACSE timeout, not the 30 s network timeout
        for conn in conns:  # the node closed them
            conn.settimeout(5)
            assert conn.recv(1) == b""
    finally:
        for conn in conns:
            conn.close()
    assert len(node.instances()) == 1
