"""Stored paths relative to the configured roots (ketanode/roots.py) and migration 0007,
which makes the absolute paths of older rows relative from their own shape."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import select

from ketanode.db.migrate import alembic_config, upgrade
from ketanode.db.models import (
    EmittedObject,
    Instance,
    Job,
    Result,
    Series,
    StoreFailure,
    Study,
)
from ketanode.db.session import make_engine, make_session_factory
from ketanode.roots import Root

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def test_a_root_stores_relative_and_resolves_relative_and_absolute(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    root = Root.at(tmp_path / "link")  # symlinks resolved once
    assert root.path == tmp_path / "real"
    inside = root.path / STUDY / SERIES / f"{SOP}.dcm"
    assert root.stored(inside) == f"{STUDY}/{SERIES}/{SOP}.dcm"
    assert root.resolve(f"{STUDY}/{SERIES}/{SOP}.dcm") == inside
    # outside the root: kept absolute, and read as it is
    assert root.stored(tmp_path / "elsewhere.dcm") == str(tmp_path / "elsewhere.dcm")
    assert root.resolve("/old/spool/a.dcm") == Path("/old/spool/a.dcm")
    # another host mounts the same tree elsewhere: the same stored path, its own file
    other = Root.at(tmp_path / "mnt")
    assert other.resolve(root.stored(inside)) == tmp_path / "mnt" / STUDY / SERIES / f"{SOP}.dcm"


def test_migration_0007_makes_the_paths_of_the_node_s_layout_relative(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0006")
    sessions = make_session_factory(engine)
    odd = "/somewhere/else/not-a-uid.dcm"
    with sessions.begin() as s:
        study = Study(study_uid=STUDY)
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid=SERIES)
        s.add(series)
        s.flush()
        common = {"sop_class_uid": "1.2", "transfer_syntax_uid": "1.2.840.10008.1.2.1"}
        s.add_all(
            [
                Instance(
                    series_id=series.id,
                    sop_instance_uid=SOP,
                    spool_path=f"/var/lib/ketanode/spool/{STUDY}/{SERIES}/{SOP}.dcm",
                    size_bytes=1,
                    sha256="0",
                    **common,
                ),
                Instance(  # its file name is not its SOP Instance UID: left as it is
                    series_id=series.id,
                    sop_instance_uid=f"{SOP}.9",
                    spool_path=odd,
                    size_bytes=1,
                    sha256="0",
                    **common,
                ),
                Instance(  # relative already
                    series_id=series.id,
                    sop_instance_uid=f"{SOP}.8",
                    spool_path=f"{STUDY}/{SERIES}/{SOP}.8.dcm",
                    size_bytes=1,
                    sha256="0",
                    **common,
                ),
            ]
        )
        rejected = "A900-" + "0123456789abcdef" * 2 + ".dcm"
        s.add_all(
            [
                StoreFailure(
                    status=0xA900, reason="r", quarantine_path=f"/srv/k/rejected/{rejected}"
                ),
                StoreFailure(status=0xA900, reason="r", quarantine_path=odd),
                StoreFailure(status=0xA700, reason="r", quarantine_path=None),
            ]
        )
        job = Job(series_id=series.id)
        s.add(job)
        s.flush()
        result = Result(
            job_id=job.id,
            series_id=series.id,
            status="not_scored",
            qc_outcome="pass",
            qc_checks=[],
            volumes={},
            contributions={},
            software_version="0",
        )
        s.add(result)
        s.flush()
        for uid, path in ((f"{SOP}.1", None), (f"{SOP}.2", odd)):
            s.add(
                EmittedObject(
                    result_id=result.id,
                    kind="sr",
                    sop_class_uid="1.2",
                    sop_instance_uid=uid,
                    series_uid="1.2.3.7",
                    study_uid=STUDY,
                    path=path or f"/mnt/reports/{STUDY}/1.2.3.7/{uid}.dcm",
                    size_bytes=1,
                    sha256="0",
                )
            )

    upgrade(engine)
    with sessions() as s:
        assert sorted(s.scalars(select(Instance.spool_path))) == sorted(
            [f"{STUDY}/{SERIES}/{SOP}.dcm", odd, f"{STUDY}/{SERIES}/{SOP}.8.dcm"]
        )
        assert list(s.scalars(select(StoreFailure.quarantine_path).order_by(StoreFailure.id))) == [
            f"rejected/{rejected}",
            odd,
            None,
        ]
        assert list(s.scalars(select(EmittedObject.path).order_by(EmittedObject.id))) == [
            f"{STUDY}/1.2.3.7/{SOP}.1.dcm",
            odd,
        ]
    # down and up again: the relative paths stay as they are
    command.downgrade(alembic_config(engine), "0006")
    upgrade(engine)
    with sessions() as s:
        assert f"{STUDY}/{SERIES}/{SOP}.dcm" in s.scalars(select(Instance.spool_path)).all()
    engine.dispose()
