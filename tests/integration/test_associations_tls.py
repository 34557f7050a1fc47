"""Association control with real peers: the calling-AE allow-list (optionally bound to an
address), the called AE title, DICOM TLS with client certificates, TCP_NODELAY."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import evt

from tests.integration.conftest import NodeFactory, RunningNode
from tests.integration.dicomtools import (
    ECHOSCU,
    Pki,
    association,
    echoscu,
    make_pki,
    one_mr,
    require_tool,
    small_series,
)
from tests.support import dcmtk_env, storescu


class NodelayProbe:
    """An extra EVT_ACCEPTED handler on the running server: reads TCP_NODELAY from the
    socket the node accepted (the node sets it at EVT_CONN_OPEN)."""

    def __init__(self, node: RunningNode) -> None:
        self.values: list[int] = []
        self._lock = threading.Lock()
        server = node.node.listener.server
        assert server is not None
        server.bind(evt.EVT_ACCEPTED, self._accepted)

    def _accepted(self, event: Any) -> None:
        sock = event.assoc.dul.socket.socket
        with self._lock:
            self.values.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def _rejected_row(node: RunningNode) -> Any:
    rows = node.wait(
        lambda: [r for r in node.associations() if r.outcome == "rejected"],
        10,
        "a rejected association row",
    )
    assert len(rows) == 1
    row = rows[0]
    assert row.ended_at is not None and row.reason
    return row


def test_unknown_calling_ae_is_rejected_at_association(node: RunningNode, tmp_path: Path) -> None:
    proc = echoscu(node.port, calling_ae="INTRUDER")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Association Rejected" in out and "Calling AE Title Not Recognized" in out, out

    row = _rejected_row(node)
    assert row.calling_ae == "INTRUDER" and row.called_ae == "KETANODE"
    assert "INTRUDER" in row.reason and "allow-list" in row.reason
    assert row.peer_address == "127.0.0.1"

    # DCMTK storescu from an unknown AE: refused too, nothing stored.
    files = small_series(tmp_path / "s", 2)
    sent = storescu(node.port, files, calling_ae="NOT_LISTED", check=False)
    assert sent.returncode != 0
    assert node.instances() == []
    node.wait(
        lambda: (
            sorted(r.calling_ae for r in node.associations() if r.outcome == "rejected")
            == ["INTRUDER", "NOT_LISTED"]
        ),
        10,
        "both rejections to be recorded",
    )

    # The node is fine and a listed caller gets in.
    ok = echoscu(node.port, calling_ae="TESTSCU")
    assert ok.returncode == 0, ok.stderr
    storescu(node.port, files, calling_ae="STORESCU")
    assert len(node.instances()) == 2


def test_wrong_called_ae_is_rejected(node: RunningNode, tmp_path: Path) -> None:
    proc = echoscu(node.port, calling_ae="TESTSCU", called_ae="OTHERNODE")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Association Rejected" in out and "Called AE Title Not Recognized" in out, out
    row = _rejected_row(node)
    assert row.called_ae == "OTHERNODE" and row.calling_ae == "TESTSCU"
    assert "OTHERNODE" in row.reason and "KETANODE" in row.reason

    with pytest.raises(AssertionError) as info, association(node.port, called_ae="OTHERNODE"):
        pass
    assert getattr(info.value, "rejected", False)


def test_allowed_caller_bound_to_an_address(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory(
        {
            "node": {
                "allowed_callers": [
                    {"ae_title": "BOUNDSCU", "address": "127.0.0.2"},
                    {"ae_title": "TESTSCU", "address": "127.0.0.1"},
                ]
            }
        }
    )
    mr = one_mr(tmp_path / "mr")

    # The right AE title from the wrong address.
    with pytest.raises(AssertionError) as info, association(node.port, calling_ae="BOUNDSCU"):
        pass
    assert getattr(info.value, "rejected", False)
    row = _rejected_row(node)
    assert row.calling_ae == "BOUNDSCU" and row.peer_address == "127.0.0.1"
    assert "127.0.0.1" in row.reason

    # The same AE title from its address: the client binds to 127.0.0.2.
    with association(node.port, [mr], calling_ae="BOUNDSCU", bind_address=("127.0.0.2", 0)) as scu:
        assert scu.echo() == 0
        assert scu.store(mr) == 0
    accepted = [r for r in node.wait_association_ended(2) if r.outcome != "rejected"]
    assert [(r.calling_ae, r.peer_address, r.outcome) for r in accepted] == [
        ("BOUNDSCU", "127.0.0.2", "released")
    ]
    assert node.instances()[0].association_id == accepted[0].id

    # Another listed caller is bound to 127.0.0.1: from 127.0.0.2 it is refused.
    with (
        pytest.raises(AssertionError),
        association(node.port, calling_ae="TESTSCU", bind_address=("127.0.0.2", 0)),
    ):
        pass
    node.wait(
        lambda: len([r for r in node.associations() if r.outcome == "rejected"]) == 2,
        10,
        "the second rejection to be recorded",
    )


def test_allow_list_off_accepts_any_caller_but_checks_the_called_ae(
    node_factory: NodeFactory,
) -> None:
    node = node_factory({"node": {"require_allowed_caller": False}})
    assert echoscu(node.port, calling_ae="ANYONE").returncode == 0
    assert echoscu(node.port, calling_ae="ANYONE", called_ae="ELSEWHERE").returncode != 0
    outcomes = sorted(r.outcome for r in node.wait_association_ended(2))
    assert outcomes == ["rejected", "released"]


def test_tcp_nodelay_on_accepted_sockets(node: RunningNode, tmp_path: Path) -> None:
    probe = NodelayProbe(node)
    mr = one_mr(tmp_path / "mr")
    with association(node.port, [mr]) as scu:
        assert scu.store(mr) == 0
    assert echoscu(node.port).returncode == 0  # DCMTK peer
    node.wait(lambda: len(probe.values) == 2, 10, "two accepted associations")
    assert all(v != 0 for v in probe.values), probe.values


# ---------------------------------------------------------------- DICOM TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_node(node_factory: NodeFactory, pki: Pki) -> RunningNode:
    return node_factory(
        {
            "node": {
                "tls": {
                    "enabled": True,
                    "certificate": str(pki.server_cert),
                    "private_key": str(pki.server_key),
                    "ca_certificates": str(pki.ca),
                    "require_client_certificate": True,
                }
            }
        }
    )


def test_tls_association_echo_and_store(tls_node: RunningNode, pki: Pki, tmp_path: Path) -> None:
    node = tls_node
    probe = NodelayProbe(node)
    files = small_series(tmp_path / "s", 3)
    with association(node.port, files, tls=pki.client_context()) as scu:
        assert scu.echo() == 0
        assert scu.store_all(files) == [0, 0, 0]
        sock = scu.assoc.dul.socket.socket  # type: ignore[attr-defined]
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        assert sock.getpeercert()["subject"] == ((("commonName", "ketanode test server"),),)
    (row,) = node.wait_association_ended(1)
    assert row.tls is True and row.outcome == "released" and row.n_stored == 3
    assert len(node.instances()) == 3
    assert probe.values and all(v != 0 for v in probe.values)


def test_tls_with_dcmtk_echoscu(tls_node: RunningNode, pki: Pki) -> None:
    cmd = [
        require_tool(ECHOSCU),
        "-aet",
        "TESTSCU",
        "-aec",
        "KETANODE",
        "+tls",
        str(pki.client_key),
        str(pki.client_cert),
        "+cf",
        str(pki.ca),
        "127.0.0.1",
        str(tls_node.port),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dcmtk_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = tls_node.wait_association_ended(1)
    assert row.tls is True and row.outcome == "released"


def test_tls_node_refuses_plain_tcp_and_clients_without_a_certificate(
    tls_node: RunningNode, pki: Pki, tmp_path: Path
) -> None:
    node = tls_node
    mr = one_mr(tmp_path / "mr")
    # Plain TCP (pynetdicom and DCMTK): no association.
    with pytest.raises(AssertionError), association(node.port, [mr]):
        pass
    assert echoscu(node.port).returncode != 0
    # TLS without a client certificate: the node requires one.
    with (
        pytest.raises(AssertionError),
        association(node.port, [mr], tls=pki.client_context(with_cert=False)),
    ):
        pass
    # A client that does not trust the node's CA refuses the node.
    with (
        pytest.raises((AssertionError, OSError)),
        association(node.port, [mr], tls=ssl.create_default_context()),
    ):
        pass
    assert node.instances() == []
    assert [r for r in node.associations() if r.outcome != "rejected"] == []
    # ... and the node still serves a proper TLS client.
    with association(node.port, [mr], tls=pki.client_context()) as scu:
        assert scu.store(mr) == 0
    assert len(node.instances()) == 1
