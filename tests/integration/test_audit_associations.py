"""Audit rows written by the node itself, against real peers, on SQLite and PostgreSQL.

- Associations: one ASSOCIATION row per association when it ends (calling AE, address,
  stored / duplicate / failed counts, outcome), and one for a rejected calling AE title.
- Dispatch: one DISPATCH row per outbox row sent (destination, SOP Instance UID), and one
  when a row gives up (dead), from a Dispatcher run against DCMTK storescp and a closed port.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from sqlalchemy import select

from ketanode.config import Settings
from ketanode.db.migrate import upgrade
from ketanode.db.models import (
    Association,
    AuditEvent,
    EmittedObject,
    Job,
    OutboxItem,
    Result,
    Series,
    Study,
)
from ketanode.db.session import make_engine, make_session_factory
from ketanode.send.dispatcher import Dispatcher
from tests.integration.conftest import NodeFactory, RunningNode
from tests.integration.dicomtools import TEST_AE, association, echoscu, one_mr, truncated
from tests.peers import StoreSCP
from tests.support import free_port


def _events(node: RunningNode, kind: str) -> list[AuditEvent]:
    return node.all(AuditEvent, AuditEvent.kind == kind)


def test_association_audit_rows(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory()
    good = [one_mr(tmp_path / "a"), one_mr(tmp_path / "b")]
    broken = truncated(one_mr(tmp_path / "c", size=64), tmp_path / "broken.dcm", cut=1000)
    with association(node.port, [*good, broken]) as scu:
        statuses = scu.store_all([*good, good[0], broken])
    assert statuses[:3] == [0, 0, 0] and statuses[3] != 0
    (assoc,) = node.wait_association_ended(count=1)
    (event,) = node.wait(lambda: _events(node, "association"), what="association audit row")
    assert (event.actor, event.address, event.outcome) == (TEST_AE, "127.0.0.1", "released")
    assert event.subject == f"association:{assoc.id}"
    assert event.detail is not None
    assert (event.detail["stored"], event.detail["duplicate"], event.detail["failed"]) == (2, 1, 1)
    assert event.detail["called_ae"] == "KETANODE"

    # a calling AE title not on the allow-list: rejected, and audited with the reason
    proc = echoscu(node.port, calling_ae="INTRUDER")
    assert proc.returncode != 0
    rejected = node.wait(
        lambda: [e for e in _events(node, "association") if e.outcome == "rejected"],
        what="rejected association audit row",
    )
    (row,) = rejected
    assert (row.actor, row.address) == ("INTRUDER", "127.0.0.1")
    assert row.detail is not None and "allow-list" in row.detail["reason"]
    assert row.detail["stored"] == 0
    # one audit row per association, nothing more
    assert len(_events(node, "association")) == len(node.associations()) == 2

    # an association a dead process left open is closed (aborted) at start, and audited
    with node.node.sessions.begin() as s:
        s.add(
            Association(
                node_name=node.node.node_name,
                calling_ae="STORESCU",
                called_ae="KETANODE",
                peer_address="127.0.0.1",
                peer_port=1234,
            )
        )
    assert node.node.associations.close_stale() == 1
    aborted = [e for e in _events(node, "association") if e.outcome == "aborted"]
    assert [(e.actor, (e.detail or {}).get("reason")) for e in aborted] == [
        ("STORESCU", "node stopped while the association was open")
    ]


def test_dispatch_audit_rows(tmp_path: Path, db_url: str) -> None:
    scp = StoreSCP(tmp_path / "storescp", aet="ARCHIVE").start()
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        sessions = make_session_factory(engine)
        settings = Settings.model_validate(
            {
                "database": {"url": db_url},
                "destinations": [
                    {
                        "name": "archive",
                        "ae_title": "ARCHIVE",
                        "host": "127.0.0.1",
                        "port": scp.port,
                    },
                    # nothing listens there: with one try allowed the row is dead at once
                    {"name": "gone", "ae_title": "GONE", "host": "127.0.0.1", "port": free_port()},
                ],
                "dispatch": {"max_attempts": 1, "timeout_seconds": 5},
            }
        )
        mr = one_mr(tmp_path / "obj")
        header = pydicom.dcmread(mr, stop_before_pixels=True)
        uid = str(header.SOPInstanceUID)
        with sessions.begin() as s:
            study = Study(study_uid="1.2.3.4")
            s.add(study)
            s.flush()
            series = Series(study_id=study.id, series_uid="1.2.3.4.5", state="done")
            s.add(series)
            s.flush()
            job = Job(series_id=series.id, state="done")
            s.add(job)
            s.flush()
            result = Result(
                job_id=job.id,
                series_id=series.id,
                status="scored",
                qc_outcome="pass",
                qc_checks=[],
                volumes={},
                contributions={},
                software_version="test",
            )
            s.add(result)
            s.flush()
            obj = EmittedObject(
                result_id=result.id,
                kind="sr",
                sop_class_uid=str(header.SOPClassUID),
                sop_instance_uid=uid,
                series_uid="1.2.3.4.6",
                study_uid="1.2.3.4",
                path=str(mr),
                size_bytes=mr.stat().st_size,
                sha256="0" * 64,
            )
            s.add(obj)
            s.flush()
            s.add_all([OutboxItem(object_id=obj.id, destination=d) for d in ("archive", "gone")])
        run = Dispatcher(sessions, settings).run()
        assert (run.sent, run.dead) == (1, 1)
        with sessions() as s:
            rows = {r.destination: r for r in s.scalars(select(OutboxItem))}
            events = list(
                s.scalars(
                    select(AuditEvent).where(AuditEvent.kind == "dispatch").order_by(AuditEvent.id)
                )
            )
        assert (rows["archive"].state, rows["gone"].state) == ("sent", "dead")
        by_outcome = {e.outcome: e for e in events}
        assert len(events) == 2 and set(by_outcome) == {"sent", "dead"}
        sent, dead = by_outcome["sent"], by_outcome["dead"]
        assert sent.actor == "node" and sent.subject == f"outbox:{rows['archive'].id}"
        assert sent.detail == {"destination": "archive", "sop_instance_uid": uid}
        assert dead.subject == f"outbox:{rows['gone'].id}"
        assert dead.detail is not None
        assert (dead.detail["destination"], dead.detail["sop_instance_uid"]) == ("gone", uid)
        assert dead.detail["attempts"] == 1 and dead.detail["error"]
        # nothing due any more: a second run records nothing
        Dispatcher(sessions, settings).run()
        with sessions() as s:
            n = len(s.scalars(select(AuditEvent).where(AuditEvent.kind == "dispatch")).all())
        assert n == 2
    finally:
        engine.dispose()
        scp.stop()
