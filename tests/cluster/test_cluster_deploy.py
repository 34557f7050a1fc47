"""deploy/ for cluster mode: the compose file against the Compose Specification, its roles
and shared volume; the systemd units per role with ``systemd-analyze verify``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO
from tests.unit.test_deploy import _schema_errors

DEPLOY = REPO / "deploy"
ROLES = ("listener", "scheduler", "worker", "web")


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_cluster_compose_matches_the_compose_specification() -> None:
    assert _schema_errors(_compose()) == []


def test_cluster_compose_runs_every_role_on_one_shared_volume() -> None:
    services = _compose()["services"]
    assert {"postgres", "rabbitmq", "orthanc", *ROLES} <= set(services)
    commands = {name: services[name]["command"] for name in ROLES}
    assert commands == {
        "listener": ["serve", "--role", "listener"],
        "scheduler": ["serve", "--role", "scheduler"],
        "worker": ["worker"],
        "web": ["serve", "--role", "web"],
    }
    for name in ROLES:
        svc = services[name]
        assert svc["entrypoint"] == ["ketanode"]  # the image's is `ketanode serve`
        assert "shared-data:/var/lib/ketanode" in svc["volumes"]
        assert svc["environment"]["KETANODE__CLUSTER__ENABLED"] == "true"
        assert svc["environment"]["KETANODE__DATABASE__URL"].startswith("postgresql://")
    # `--scale worker=N` needs a worker without a fixed name or published port
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    # only the web role serves /health, which judges the cluster (its active scheduler)
    for name in ("listener", "scheduler", "worker"):
        assert services[name]["healthcheck"] == {"disable": True}
    probe = services["web"]["healthcheck"]["test"]
    assert probe[:3] == ["CMD", "python", "-c"] and "KETANODE_HEALTH_URL" in probe[3]
    compile(probe[3], "<healthcheck>", "exec")


@pytest.mark.parametrize("role", ROLES)
def test_role_unit_passes_systemd_analyze_verify(role: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = (DEPLOY / f"ketanode-{role}.service").read_text()
    # the venv of the install guide does not exist here: point at an executable that does
    unit = tmp_path / f"ketanode-{role}.service"
    unit.write_text(text.replace("/opt/ketanode/venv/bin/ketanode", "/bin/true"))
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert f"serve --role {role}" in text or (role == "worker" and "ketanode worker" in text)
