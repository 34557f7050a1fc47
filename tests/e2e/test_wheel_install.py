"""A non-editable install works end to end (issue 14): a wheel built from the repository,
installed into a fresh virtual environment, migrates an empty SQLite and an empty PostgreSQL
database to head and runs ``ketanode demo`` through to Orthanc (the demo's one end-to-end
test: the installed node is the one a site runs).

The virtual environment sees the machine's site-packages (``--system-site-packages``), so the
heavy dependencies (torch, antspyx, ...) come from there and nothing is downloaded; the
wheel goes in with ``--no-deps --no-index --ignore-installed``, in front of the machine's
editable install. Every command runs from a directory outside the repository, with no
``KETANODE_*`` variable from the test's environment. The wheel is built and installed once
for the module; each check is its own test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from ketanode.model.files import DEMO_LABEL
from tests.peers import Orthanc
from tests.support import REPO, postgres_database, write_config

# What the build reads: the files deploy/Dockerfile copies (tests/unit/test_deploy.py).
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "ketanode", "migrations")


def _repo_head() -> str:
    cfg = Config()
    cfg.set_main_option("script_location", str(REPO / "migrations"))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KETANODE") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _run(
    argv: list[str | Path], cwd: Path, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, argv))} exited {proc.returncode}\n"
        f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    )
    return proc


def _build_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` on a copy of the build inputs (a build in the repository would leave
    build/ there and could pick up stale files from an earlier build)."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
         "--no-build-isolation", "-w", dist, src],
        cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = dist.glob("ketanode-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("ketanode/migrations/")}
    expected = {
        f"ketanode/migrations/{p.relative_to(REPO / 'migrations').as_posix()}"
        for p in (REPO / "migrations").rglob("*")
        if p.is_file() and p.suffix in (".py", ".mako") and "__pycache__" not in p.parts
    }
    assert "ketanode/migrations/env.py" in expected
    assert shipped == expected, f"migrations in the wheel: {sorted(shipped)}"
    return wheel


def _db_upgrade(ketanode: Path, url: str, cwd: Path) -> str:
    """``ketanode db upgrade`` then ``db current`` on ``url``; returns the revision."""
    up = _run([ketanode, "db", "upgrade"], cwd, KETANODE__DATABASE__URL=url)
    current = _run([ketanode, "db", "current"], cwd, KETANODE__DATABASE__URL=url)
    match = re.search(r"current (\S+), head (\S+)", current.stdout)
    assert match, current.stdout
    assert match.group(1) == match.group(2), current.stdout
    assert f"database at revision {match.group(1)}" in up.stdout, up.stdout
    return match.group(1)


@dataclass
class Installed:
    wheel: Path
    venv: Path
    python: Path
    ketanode: Path
    outside: Path  # the working directory of every command: not the repository
    scratch: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel, built and installed into a fresh virtual environment (once per module)."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp)
    venv = tmp / "venv"
    # Without a pip of its own (ensurepip's would bring an old setuptools in front of the
    # machine's): the machine's pip, seen through the system site-packages, installs into it.
    _run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
        cwd=tmp,
    )
    python = venv / "bin" / "python"
    _run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
         wheel],
        cwd=tmp,
    )  # fmt: skip
    outside = tmp / "elsewhere"
    outside.mkdir()
    return Installed(wheel, venv, python, venv / "bin" / "ketanode", outside, tmp)


def _migrations_in_venv(installed: Installed) -> tuple[Path, Path]:
    where = _run(
        [installed.python, "-c",
         "import ketanode; from ketanode.db.migrate import migrations_dir; "
         "print(ketanode.__file__); print(migrations_dir())"],
        installed.outside,
    ).stdout.split()  # fmt: skip
    package, migrations = (Path(p).resolve() for p in where)
    return package, migrations


@pytest.mark.timeout(600)  # the build and the install: under a minute, more when busy
def test_the_venv_runs_the_wheel_and_its_migrations(installed: Installed) -> None:
    assert installed.ketanode.is_file(), "the wheel installs no ketanode console script"
    package, migrations = _migrations_in_venv(installed)
    assert package.is_relative_to(installed.venv.resolve()), (
        f"ketanode imported from {package}, not from the venv"
    )
    assert migrations == package.parent / "migrations", migrations
    assert not package.is_relative_to(REPO) and not migrations.is_relative_to(REPO)


@pytest.mark.timeout(600)
def test_db_upgrade_on_an_empty_sqlite(installed: Installed) -> None:
    url = f"sqlite:///{installed.scratch / 'empty.db'}"
    assert _db_upgrade(installed.ketanode, url, installed.outside) == _repo_head()


@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_db_upgrade_on_an_empty_postgresql(installed: Installed) -> None:
    with postgres_database() as url:
        assert _db_upgrade(installed.ketanode, url, installed.outside) == _repo_head()


@pytest.mark.timeout(1200)  # a minute or two idle, several on a busy 2-core host
def test_demo_runs_from_the_wheel_and_reaches_the_pacs(installed: Installed) -> None:
    """``ketanode demo``, the README's first command, from the wheel and end to end: a
    generated study goes in over DICOM, the localizer is ignored, the T1 is measured and
    scored with the demonstration model, the SR and the report image (and a PNG of the page)
    are written and, with a destination in the settings, reach the PACS (Orthanc) in the
    same study."""
    pacs = Orthanc(installed.scratch / "orthanc").start()
    try:
        data_dir = installed.scratch / "demo"
        destination = {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1"}
        config = write_config(
            installed.scratch / "demo.toml",
            {"destinations": [{**destination, "port": pacs.dicom_port}]},  # type: ignore[dict-item]
        )
        demo = _run(
            [installed.ketanode, "-c", config, "demo", "--data-dir", data_dir, "--json"],
            installed.outside,
            timeout=900,
        )
        out = json.loads(demo.stdout)
        assert sorted(s["state"] for s in out["series"]) == ["done", "ignored"], out["series"]
        (result,) = out["results"]
        assert result["status"] == "scored" and result["model_label"] == DEMO_LABEL, result
        assert result["predicted_class"] in ("responder", "non-responder", "indeterminate")
        kinds = {o["kind"]: o for o in result["objects"]}
        assert set(kinds) == {"sr", "report_image"}
        for o in kinds.values():
            assert Path(o["path"]).is_file() and Path(o["path"]).is_relative_to(data_dir), o
            assert o["dispatch"] == {"pacs": "sent"}, o
        assert kinds["report_image"]["png"] and Path(kinds["report_image"]["png"]).is_file()
        study = str(pydicom.dcmread(kinds["sr"]["path"]).StudyInstanceUID)
        (sr,) = pacs.find("Instance", StudyInstanceUID=study, Modality="SR")
        tags = pacs.get(f"/instances/{sr}/simplified-tags")
        assert tags["SOPInstanceUID"] == kinds["sr"]["sop_instance_uid"]
        # the demo switches the demonstration model on, and its results say DEMO (issue 12)
        assert tags["SeriesDescription"].startswith("DEMO "), tags["SeriesDescription"]
        assert len(pacs.find("Instance", StudyInstanceUID=study, Modality="OT")) == 1
    finally:
        pacs.stop()
    print(
        f"ketanode demo from {installed.wheel.name}: {result['status']} "
        f"{result['predicted_class']} (p={result['probability']}), "
        f"objects {sorted(kinds)}"
    )


@pytest.mark.timeout(600)
def test_without_its_migrations_the_installed_node_stops(installed: Installed) -> None:
    """The migrations found above are the wheel's: with them gone, ``db upgrade`` stops with
    the message rather than finding the repository's."""
    _, migrations = _migrations_in_venv(installed)
    hidden = migrations.with_name("migrations-hidden")
    migrations.rename(hidden)
    try:
        proc = subprocess.run(
            [str(installed.ketanode), "db", "upgrade"],
            cwd=installed.outside,
            env=_env(KETANODE__DATABASE__URL=f"sqlite:///{installed.scratch / 'other.db'}"),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        hidden.rename(migrations)
    assert proc.returncode != 0
    assert "Alembic migrations not found" in proc.stderr, proc.stderr[-2000:]
