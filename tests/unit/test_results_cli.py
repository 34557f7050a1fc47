"""``ketanode results ...`` and ``ketanode dispatch ...`` on a small database (SQLite and
PostgreSQL): filters, show, export, no patient identifiers unless asked, re-queueing."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from ketanode.cli.main import app
from ketanode.db.migrate import upgrade
from ketanode.db.models import (
    AuditEvent,
    EmittedObject,
    Job,
    OutboxItem,
    Result,
    Series,
    Study,
)
from ketanode.db.results import requeue
from ketanode.db.session import make_engine, make_session_factory
from ketanode.texts import DEMO_LABEL, RESEARCH_USE_ONLY

SHA_REAL = "a1" * 32
SHA_DEMO = "b2" * 32
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
ROOT = "1.2.826.0.1.3680043.10.777"

# distinctive identifiers: none may appear in any output without --patient
PATIENT_A = {
    "patient_name": "Zebrowski^Quintus",
    "patient_id": "PIDZQ-7781",
    "patient_birth_date": "19510203",
    "accession_number": "ACCZQ991",
}
PATIENT_B = {
    "patient_name": "Marchetti^Ottavia",
    "patient_id": "PIDMO-4410",
    "patient_birth_date": "19660917",
    "accession_number": "ACCMO552",
}
IDENTIFIERS = [v for p in (PATIENT_A, PATIENT_B) for v in p.values()] + [
    "Zebrowski",
    "Marchetti",
]


@dataclass
class Node:
    config: Path
    url: str
    ids: dict[str, int]  # result ids r1 (superseded), r2 (demo model), r3 (not scored), r4
    outbox: dict[str, int]  # outbox row ids by name
    uids: dict[str, str]  # SR / report / series UIDs


def _when(day: int, hour: int = 9) -> dt.datetime:
    return dt.datetime(2024, 3, day, hour, 30, tzinfo=dt.UTC)


@pytest.fixture
def node(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node:
    monkeypatch.delenv("KETANODE_CONFIG", raising=False)
    engine = make_engine(db_url)
    upgrade(engine)
    ids: dict[str, int] = {}
    outbox: dict[str, int] = {}
    uids: dict[str, str] = {}
    with make_session_factory(engine).begin() as s:
        study_a = Study(study_uid=f"{ROOT}.1", study_date="20240301", **PATIENT_A)
        study_b = Study(study_uid=f"{ROOT}.2", study_date="20240310", **PATIENT_B)
        series = {
            "s1": Series(study=study_a, series_uid=f"{ROOT}.1.1", modality="MR", state="done"),
            "s2": Series(study=study_b, series_uid=f"{ROOT}.2.1", modality="MR", state="done"),
            "s3": Series(study=study_b, series_uid=f"{ROOT}.2.2", modality="MR", state="done"),
        }
        s.add_all([study_a, study_b, *series.values()])
        s.flush()
        uids |= {k: v.series_uid for k, v in series.items()}

        def result(name: str, ser: str, day: int, **kw: Any) -> Result:
            job = Job(series_id=series[ser].id, state="done", created_at=_when(day))
            s.add(job)
            s.flush()
            status = kw.pop("status", "scored")
            scored = status == "scored"
            r = Result(
                job_id=job.id,
                series_id=series[ser].id,
                status=status,
                qc_outcome="pass" if scored else "fail",
                qc_checks=[{"name": "snr", "ok": scored, "value": 21.5}],
                volumes={"gm_total_ml": 612.5, "hippocampus_l": 0.0031},
                contributions={"hippocampus_l": 0.4} if scored else {},
                software_version="0.1.0",
                processing_seconds=42.0,
                created_at=_when(day),
                **kw,
            )
            s.add(r)
            s.flush()
            ids[name] = r.id
            for kind, cls, n in (("sr", SR_CLASS, 1), ("report_image", SC_CLASS, 2)):
                uid = f"{ROOT}.9.{r.id}.{n}"
                uids[f"{name}_{kind}"] = uid
                s.add(
                    EmittedObject(
                        result_id=r.id,
                        kind=kind,
                        sop_class_uid=cls,
                        sop_instance_uid=uid,
                        series_uid=f"{ROOT}.9.{r.id}",
                        study_uid=series[ser].study.study_uid,
                        path=f"/reports/{r.id}/{kind}.dcm",
                        size_bytes=1000,
                        sha256="0" * 64,
                    )
                )
            s.flush()
            return r

        def queue(name: str, res: str, kind: str, dest: str, state: str, **kw: Any) -> None:
            obj = s.scalar(
                select(EmittedObject).where(EmittedObject.sop_instance_uid == uids[f"{res}_{kind}"])
            )
            assert obj is not None
            row = OutboxItem(object_id=obj.id, destination=dest, state=state, **kw)
            s.add(row)
            s.flush()
            outbox[name] = row.id

        real = {"model_sha256": SHA_REAL, "model_name": "cohort-2023", "model_label": "cv 0.71"}
        demo = {
            "model_sha256": SHA_DEMO,
            "model_name": "demo",
            "model_synthetic": True,
            "model_label": DEMO_LABEL,
        }
        result(
            "r1",
            "s1",
            1,
            current=False,
            predicted_class="non-responder",
            probability=0.3,
            decision_value=-0.8,
            **real,
        )
        result(
            "r2", "s1", 5, predicted_class="responder", probability=0.8, decision_value=1.1, **demo
        )
        result("r3", "s2", 10, status="not_scored", reason="QC failed: SNR 3.1 below 8")
        s.get(Result, ids["r3"]).volumes = {"gm_total_ml": 590.0}  # type: ignore[union-attr]
        result(
            "r4",
            "s3",
            12,
            predicted_class="non-responder",
            probability=0.2,
            decision_value=-1.4,
            **real,
        )
        sent = {"attempts": 1, "last_status": 0, "sent_at": _when(12, 10)}
        queue("r1_sr_pacs", "r1", "sr", "pacs", "sent", **sent)
        queue("r2_sr_pacs", "r2", "sr", "pacs", "sent", **sent)
        queue(
            "r2_img_pacs",
            "r2",
            "report_image",
            "pacs",
            "dead",
            attempts=5,
            last_status=0xA700,
            last_error="status 0xA700: out of resources",
        )
        queue(
            "r3_sr_pacs",
            "r3",
            "sr",
            "pacs",
            "retrying",
            attempts=2,
            last_error="connection refused",
            next_at=_when(28),
        )
        queue("r3_img_pacs", "r3", "report_image", "pacs", "pending")
        queue("r4_sr_pacs", "r4", "sr", "pacs", "sent", **sent)
        queue("r4_img_pacs", "r4", "report_image", "pacs", "sent", **sent)
        queue(
            "r4_sr_archive",
            "r4",
            "sr",
            "archive",
            "dead",
            attempts=5,
            last_error="association rejected",
        )
    engine.dispose()
    config = tmp_path / "ketanode.toml"
    config.write_text(f'[database]\nurl = "{db_url}"\nauto_upgrade = false\n')
    return Node(config, db_url, ids, outbox, uids)


def run(node: Node, *args: str, code: int = 0) -> Any:
    res = CliRunner().invoke(app, ["-c", str(node.config), *args])
    assert res.exit_code == code, res.output
    return res


def listed(node: Node, *args: str) -> list[int]:
    return [r["id"] for r in json.loads(run(node, "results", "list", "--json", *args).stdout)]


def outbox_states(node: Node) -> dict[str, tuple[str, int, str | None]]:
    engine = make_engine(node.url)
    with make_session_factory(engine)() as s:
        by_id = {o.id: (o.state, o.attempts, o.last_error) for o in s.scalars(select(OutboxItem))}
    engine.dispose()
    return {name: by_id[i] for name, i in node.outbox.items()}


def test_list_filters(node: Node) -> None:
    r1, r2, r3, r4 = (node.ids[k] for k in ("r1", "r2", "r3", "r4"))
    assert listed(node) == [r4, r3, r2]  # newest first, current only
    assert listed(node, "--all") == [r4, r3, r2, r1]
    assert listed(node, "--since", "2024-03-05", "--until", "2024-03-10", "--all") == [r3, r2]
    assert listed(node, "--since", "2024-03-01", "--until", "2024-03-01", "--all") == [r1]
    assert listed(node, "--since", "2024-03-11") == [r4]
    assert listed(node, "--until", "2024-03-04") == []
    assert listed(node, "--status", "not_scored") == [r3]
    assert listed(node, "--status", "scored") == [r4, r2]
    assert listed(node, "--model", "b2b2") == [r2]
    assert listed(node, "--model", SHA_REAL[:10].upper(), "--all") == [r4, r1]
    assert listed(node, "--patient-id", PATIENT_A["patient_id"]) == [r2]
    assert listed(node, "--patient-id", PATIENT_A["patient_id"], "--all") == [r2, r1]
    assert listed(node, "--accession", PATIENT_B["accession_number"]) == [r4, r3]
    assert listed(node, "--accession", "nope") == []
    assert listed(node, "--class", "responder") == [r2]
    assert listed(node, "--limit", "2") == [r4, r3]

    rows = {r["id"]: r for r in json.loads(run(node, "results", "list", "--json", "--all").stdout)}
    assert rows[r1]["current"] is False and rows[r2]["current"] is True
    assert rows[r2]["synthetic"] is True and rows[r2]["model_sha256"] == SHA_DEMO
    assert rows[r2]["sr_uid"] == node.uids["r2_sr"]
    assert rows[r2]["report_uid"] == node.uids["r2_report_image"]
    assert rows[r2]["dispatch"] == "1/2 sent, 1 dead"
    assert rows[r4]["dispatch"] == "2/3 sent, 1 dead"
    assert rows[r3]["dispatch"] == "0/2 sent, 1 retrying, 1 pending"
    assert rows[r3]["reason"].startswith("QC failed") and rows[r3]["predicted_class"] is None
    assert rows[r4]["series_uid"] == node.uids["s3"] and rows[r4]["processing_seconds"] == 42.0

    table = run(node, "results", "list", "--all").stdout  # not a terminal: natural width
    assert "RESEARCH USE ONLY" in table and DEMO_LABEL in table
    assert "superseded" in table and f"cohort-2023 ({SHA_REAL[:12]})" in table


def test_show(node: Node) -> None:
    r1, r2 = node.ids["r1"], node.ids["r2"]
    for key in (str(r2), node.uids["r2_sr"], node.uids["r2_report_image"], node.uids["s1"]):
        data = json.loads(run(node, "results", "show", key, "--json").stdout)
        assert data["id"] == r2, key
    assert data["volumes"] == {"gm_total_ml": 612.5, "hippocampus_l": 0.0031}
    assert data["contributions"] == {"hippocampus_l": 0.4}
    assert data["qc_checks"][0]["name"] == "snr" and data["model_label"] == DEMO_LABEL
    assert [o["kind"] for o in data["objects"]] == ["sr", "report_image"]
    assert data["objects"][0]["path"].endswith("sr.dcm")
    assert [o["state"] for o in data["objects"][1]["outbox"]] == ["dead"]
    assert [o["id"] for o in data["other_results"]] == [r1]
    assert "patient" not in data
    old = json.loads(run(node, "results", "show", str(r1), "--json").stdout)
    assert old["current"] is False and [o["id"] for o in old["other_results"]] == [r2]
    text = run(node, "results", "show", str(r2)).stdout
    assert "RESEARCH USE ONLY" in text and "DEMONSTRATION MODEL" in text
    with_patient = json.loads(run(node, "results", "show", str(r2), "--json", "--patient").stdout)
    assert with_patient["patient"]["id"] == PATIENT_A["patient_id"]
    res = run(node, "results", "show", "1.2.3.4.5", code=1)
    assert "no result" in res.output


def test_export(node: Node, tmp_path: Path) -> None:
    r1, r2, r3, r4 = (node.ids[k] for k in ("r1", "r2", "r3", "r4"))
    rows = list(csv.DictReader(io.StringIO(run(node, "results", "export", "--all").stdout)))
    assert [int(r["id"]) for r in rows] == [r4, r3, r2, r1]
    assert {"vol_gm_total_ml", "vol_hippocampus_l", "sr_uid", "synthetic"} <= set(rows[0])
    assert not {"patient_id", "patient_name", "accession_number"} & set(rows[0])
    by_id = {int(r["id"]): r for r in rows}
    assert float(by_id[r2]["vol_hippocampus_l"]) == 0.0031
    assert by_id[r3]["vol_hippocampus_l"] == "" and by_id[r3]["status"] == "not_scored"

    out = tmp_path / "export.csv"
    res = run(node, "results", "export", "--patient", "--status", "scored", "--output", str(out))
    assert res.stdout == "" and "with patient identifiers" in res.output
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["id"]) for r in rows] == [r4, r2]
    assert rows[1]["patient_id"] == PATIENT_A["patient_id"]
    assert rows[0]["accession_number"] == PATIENT_B["accession_number"]

    for filters in ([], ["--all"], ["--status", "scored"], ["--since", "2024-03-06", "--all"]):
        exported = json.loads(run(node, "results", "export", "--format", "json", *filters).stdout)
        assert exported == json.loads(run(node, "results", "list", "--json", *filters).stdout)
        assert exported

    engine = make_engine(node.url)
    with make_session_factory(engine)() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.kind == "export")))
    engine.dispose()
    assert events and all(e.actor.startswith("cli") for e in events)
    assert not any(i in json.dumps(e.detail) for e in events for i in IDENTIFIERS)

    res = run(node, "results", "export", "--format", "xml", code=2)
    assert "--format" in res.output


def test_no_patient_identifiers_without_patient(node: Node) -> None:
    outputs = [
        run(node, *args).output
        for args in (
            ["results", "list"],
            ["results", "list", "--all", "--json"],
            ["results", "list", "--patient-id", PATIENT_A["patient_id"], "--all"],
            ["results", "list", "--accession", PATIENT_B["accession_number"], "--json"],
            ["results", "show", str(node.ids["r2"])],
            ["results", "show", node.uids["s2"], "--json"],
            ["results", "export"],
            ["results", "export", "--all", "--format", "json"],
            ["dispatch", "list"],
            ["dispatch", "list", "--json"],
        )
    ]
    for args_out in outputs:
        # the patient-id filter value is on the command line, never in what comes back
        for ident in IDENTIFIERS:
            assert ident not in args_out, ident
    shown = run(node, "results", "list", "--all", "--patient", "--json").stdout
    assert all(i in shown for i in IDENTIFIERS)
    table = run(node, "results", "list", "--patient").stdout
    assert PATIENT_B["patient_id"] in table


def test_dispatch_list_and_retry(node: Node) -> None:
    ob = node.outbox
    dead = json.loads(run(node, "dispatch", "list", "--state", "dead", "--json").stdout)
    assert sorted(r["id"] for r in dead) == sorted([ob["r2_img_pacs"], ob["r4_sr_archive"]])
    assert {r["result_id"] for r in dead} == {node.ids["r2"], node.ids["r4"]}
    archive = json.loads(run(node, "dispatch", "list", "--destination", "archive", "--json").stdout)
    assert [r["id"] for r in archive] == [ob["r4_sr_archive"]]
    table = run(node, "dispatch", "list").stdout
    assert "RESEARCH USE ONLY" in table and "0xA700" in table
    run(node, "dispatch", "list", "--state", "lost", code=2)

    before = outbox_states(node)
    res = run(node, "dispatch", "retry", "--dead", "--destination", "archive")
    assert "re-queued 1" in res.stdout
    res = run(node, "dispatch", "retry", "--dead")
    assert "re-queued 1" in res.stdout
    after = outbox_states(node)
    assert after["r4_sr_archive"] == ("pending", 0, "association rejected")
    assert after["r2_img_pacs"] == ("pending", 0, "status 0xA700: out of resources")
    for name in ("r1_sr_pacs", "r2_sr_pacs", "r3_sr_pacs", "r3_img_pacs", "r4_sr_pacs"):
        assert after[name] == before[name], name  # sent, retrying and pending rows untouched
    res = run(node, "dispatch", "retry", "--dead", code=1)
    assert "nothing re-queued" in res.output

    # a retrying row by id; a sent row only with --resend
    run(node, "dispatch", "retry", str(ob["r3_sr_pacs"]))
    assert outbox_states(node)["r3_sr_pacs"] == ("pending", 0, "connection refused")
    res = run(node, "dispatch", "retry", str(ob["r4_sr_pacs"]), code=1)
    assert "nothing re-queued" in res.output and outbox_states(node)["r4_sr_pacs"][0] == "sent"
    res = run(node, "dispatch", "retry", str(ob["r4_sr_pacs"]), "--resend")
    assert "re-queued 1" in res.stdout
    assert outbox_states(node)["r4_sr_pacs"] == ("pending", 0, None)
    assert outbox_states(node)["r2_sr_pacs"][0] == "sent"

    assert "ids" in run(node, "dispatch", "retry", code=1).output
    assert "id" in run(node, "dispatch", "retry", "--dead", "--resend", code=1).output
    engine = make_engine(node.url)
    with make_session_factory(engine)() as s:
        kinds = [e.kind for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    engine.dispose()
    assert kinds.count("requeue") == 4


def test_dispatch_retry_skips_rows_whose_file_was_purged(node: Node) -> None:
    """Retention removed the report image of r2 (its pacs row is dead): re-queueing it could
    only fail, so it is skipped and counted; the other dead row is re-queued."""
    ob = node.outbox
    engine = make_engine(node.url)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        obj = s.scalar(
            select(EmittedObject).where(
                EmittedObject.sop_instance_uid == node.uids["r2_report_image"]
            )
        )
        assert obj is not None
        obj.purged_at = _when(28)
    before = outbox_states(node)

    res = run(node, "dispatch", "retry", str(ob["r2_img_pacs"]), code=1)
    assert "nothing re-queued" in res.output and "skipped 1" in res.output
    assert "purged" in res.output
    assert outbox_states(node) == before

    res = run(node, "dispatch", "retry", "--dead")
    assert "re-queued 1 outbox row(s); skipped 1" in res.stdout and "purged" in res.stdout
    after = outbox_states(node)
    assert after["r2_img_pacs"] == before["r2_img_pacs"]  # still dead
    assert after["r4_sr_archive"] == ("pending", 0, "association rejected")
    with sessions() as s:
        (event,) = s.scalars(select(AuditEvent).where(AuditEvent.kind == "requeue"))
        assert event.detail is not None
        assert (event.detail["requeued"], event.detail["skipped_purged"]) == (1, 1)

    # the library call says so too; nothing else changes
    with sessions.begin() as s:
        outcome = requeue(s, ids=[ob["r2_img_pacs"], ob["r3_sr_pacs"]])
    assert (outcome.requeued, outcome.skipped_purged) == (1, 1)
    assert outbox_states(node)["r2_img_pacs"] == before["r2_img_pacs"]
    engine.dispose()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["results", "list", "--since", "2024-13-01"], "--since"),
        (["results", "list", "--until", "yesterday"], "--until"),
        (["results", "export", "--since", "01/03/2024"], "--since"),
        (["results", "list", "--since", "2024-03-10", "--until", "2024-03-01"], "--until"),
        (["results", "list", "--status", "maybe"], "--status"),
    ],
)
def test_bad_arguments_exit_2(node: Node, args: list[str], option: str) -> None:
    res = run(node, *args, code=2)
    assert option in res.output


def test_research_use_only_in_help() -> None:
    res = CliRunner().invoke(app, ["results", "--help"])
    assert res.exit_code == 0 and RESEARCH_USE_ONLY[:17] in res.output


def test_rule_line_and_indeterminate_caption() -> None:
    """``results show`` states the model's rule and the training cohort's response rate;
    a list with an indeterminate result explains the class (issue 12)."""
    from ketanode.cli.results import INDETERMINATE_NOTE, _demo_caption, rule_line

    data = {
        "predicted_class": "indeterminate",
        "probability": 0.32,
        "decision_rule": {"threshold": 0.3, "margin": 0.05, "training_response_rate": 0.3},
    }
    assert rule_line(data) == (
        "indeterminate: P(response) 32.0 %; responder when >= 35.0 %, non-responder when "
        "<= 25.0 %, indeterminate in between (threshold 30.0 %). P depends on the training "
        "cohort's response rate (30.0 %)."
    )
    assert rule_line(data | {"decision_rule": None}) is None
    rows = [data | {"synthetic": True, "model_label": "DEMONSTRATION MODEL x"}]
    assert _demo_caption(rows) == f"DEMO: DEMONSTRATION MODEL x\n{INDETERMINATE_NOTE}"
