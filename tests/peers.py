"""Real peers started as processes on free ports: Orthanc (the PACS) and DCMTK storescp."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import STORESCP, dcmtk_env, free_port, wait_for

ORTHANC = "/usr/sbin/Orthanc"


@dataclass
class Orthanc:
    """Orthanc as a plain process with a generated config (DESIGN.md section 10)."""

    workdir: Path
    node_port: int = 11112
    node_ae: str = "KETANODE"
    extra_modalities: dict[str, dict[str, Any]] = field(default_factory=dict)
    aet: str = "PACS"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        modalities = {
            "ketanode": {"AET": self.node_ae, "Host": "127.0.0.1", "Port": self.node_port}
        }
        modalities.update(self.extra_modalities)
        return {
            "Name": "ketanode-test-pacs",
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowStore": False,
            "DicomModalities": modalities,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StableAge": 5,
            "SaveJobs": False,
            "HttpServerEnabled": True,
            "Plugins": [],
        }

    def start(self, timeout: float = 60.0) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        log = (self.workdir / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(
            [ORTHANC, str(cfg)], env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT
        )
        wait_for(self._up, timeout, what="Orthanc to answer GET /system")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.proc.returncode}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return bytes(r.read())

    def post(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def find(self, level: str = "Instance", **query: str) -> list[str]:
        return list(self.post("/tools/find", {"Level": level, "Query": query}))

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@dataclass
class StoreSCP:
    """DCMTK storescp writing to a directory (the raw speed of the sender and the disk)."""

    workdir: Path
    aet: str = "KETANODE"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "storescp.log").open("ab")
        self.proc = subprocess.Popen(
            [STORESCP, "-aet", self.aet, "-od", str(self.workdir), str(self.port)],
            env=dcmtk_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        import socket

        def listening() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_for(listening, 20, what="storescp to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
