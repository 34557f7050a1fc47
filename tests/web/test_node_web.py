"""The node serves the dashboard when ``[web] enabled``: off by default and on loopback; on
a free port (``node.web_address``) with HTTPS from ``web.certificate``/``private_key`` (the
session cookie then carries Secure); stopped with the node."""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from ketanode.admin.users import add_user
from ketanode.config import Settings
from ketanode.node import Node
from tests.integration.conftest import build_settings
from tests.integration.dicomtools import make_pki
from tests.web.webtools import csrf_of


def test_off_by_default_and_on_loopback() -> None:
    web = Settings().web
    assert web.enabled is False
    assert web.bind_address == "127.0.0.1"


def test_node_serves_https_and_stops_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pki = make_pki(tmp_path / "pki")
    settings = build_settings(
        tmp_path / "node",
        f"sqlite:///{tmp_path / 'ketanode.db'}",
        {
            "web": {
                "enabled": True,
                "port": 0,
                "certificate": str(pki.server_cert),
                "private_key": str(pki.server_key),
            }
        },
    )
    node = Node(settings)
    caplog.set_level(logging.INFO, logger="ketanode.web.server")
    node.start()
    try:
        assert node.web_address is not None
        host, port = node.web_address
        assert host == "127.0.0.1" and port > 0
        url = f"https://127.0.0.1:{port}"
        assert any(url in r.getMessage() for r in caplog.records), "the URL is not logged"
        with node.sessions.begin() as s:
            add_user(s, "tls-viewer", "tls-viewer-password", role="viewer")
        trust = ssl.create_default_context(cafile=str(pki.ca))
        with httpx.Client(base_url=url, verify=trust, follow_redirects=False) as client:
            health = client.get("/health")
            assert health.status_code == 200, health.text
            assert health.json()["scheduler"]["running"] is True  # the node's own timers
            form = client.get("/login")
            r = client.post(
                "/login",
                data={
                    "username": "tls-viewer",
                    "password": "tls-viewer-password",
                    "csrf": csrf_of(form.text),
                },
            )
            assert r.status_code == 303
            cookie = r.headers["set-cookie"].lower()
            assert "secure" in cookie and "httponly" in cookie and "samesite=lax" in cookie
            assert client.get("/results").status_code == 200
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the HTTPS port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        node.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
