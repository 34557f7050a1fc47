"""Real peers started as processes on free ports: Orthanc (the PACS) and DCMTK storescp."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support import STORESCP, dcmtk_env, free_port, wait_for

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
OHIF_VERSION = "3.13.2"
# Where scripts/setup.sh unpacks `npm pack @ohif/app@OHIF_VERSION` (never fetched at test time).
OHIF_DIR = Path(
    os.environ.get("KETANODE_OHIF_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "ketanode"
    / f"ohif-{OHIF_VERSION}"
)


@dataclass
class Orthanc:
    """Orthanc as a plain process with a generated config."""

    workdir: Path
    node_port: int = 11112
    node_ae: str = "KETANODE"
    extra_modalities: dict[str, dict[str, Any]] = field(default_factory=dict)
    dicomweb: bool = False
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
            "Plugins": [DICOMWEB_PLUGIN] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
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

    def post_bytes(self, path: str, body: bytes) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method="POST"
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
    extra_args: tuple[str, ...] = ()

    def start(self) -> StoreSCP:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "storescp.log").open("ab")
        self.proc = subprocess.Popen(
            [
                STORESCP,
                *self.extra_args,
                "-aet",
                self.aet,
                "-od",
                str(self.workdir),
                str(self.port),
            ],
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


# OHIF's data source for Orthanc's DICOMweb plugin, served from the same origin as the viewer
# (the proxy below), so the browser needs no CORS.
OHIF_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  investigationalUseDialog: { option: 'never' },
  maxNumberOfWebWorkers: 2,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (ketanode test PACS)',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""


class _QuietServer(ThreadingHTTPServer):
    """A browser that closes a tab drops connections mid-response: not an error here."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class OhifViewer:
    """The published OHIF build served on loopback, its DICOMweb requests proxied to Orthanc.

    Static files come from ``OHIF_DIR/dist`` (unpacked by scripts/setup.sh); any path that is
    not a file is the single-page app's ``index.html``; ``/app-config.js`` points OHIF at
    ``/dicom-web`` and ``/wado``, which this server forwards to Orthanc's DICOMweb plugin.
    """

    orthanc: Orthanc
    port: int = field(default_factory=free_port)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OhifViewer:
        dist = OHIF_DIR / "dist"
        if not (dist / "index.html").is_file():
            raise AssertionError(f"OHIF is not installed at {dist}: run scripts/setup.sh")
        upstream = f"http://127.0.0.1:{self.orthanc.http_port}"

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(dist), **kwargs)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/app-config.js":
                    self._send(200, "application/javascript", OHIF_CONFIG.encode())
                elif path.startswith(("/dicom-web/", "/wado")):
                    self._proxy()
                elif path != "/" and (dist / path.lstrip("/")).is_file():
                    super().do_GET()
                else:
                    self._send(200, "text/html", (dist / "index.html").read_bytes())

            def _send(self, status: int, ctype: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _proxy(self) -> None:
                headers = {"Accept": self.headers.get("Accept", "*/*")}
                req = urllib.request.Request(upstream + self.path, headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        status, body = r.status, r.read()
                        ctype = r.headers.get("Content-Type", "application/octet-stream")
                except urllib.error.HTTPError as e:
                    status, body = e.code, e.read()
                    ctype = e.headers.get("Content-Type", "text/plain")
                self._send(status, ctype, body)

        self.server = _QuietServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.server = None
