"""The dashboard's HTTP(S) server: uvicorn in a thread of the node.

The socket is bound here, before the thread starts, so a port in use fails the node's start
with a clear error and port 0 gives a free port (:attr:`WebServer.address`). HTTPS when
``web.certificate`` and ``web.private_key`` are set. :meth:`WebServer.stop` asks uvicorn to
exit and waits for it (open keep-alive connections are closed after a short grace).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from ketanode.config import Settings
from ketanode.scheduler import Timers
from ketanode.web.app import create_app

logger = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 10.0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class WebServer:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session] | None = None,
        timers: Timers | None = None,
    ) -> None:
        self.settings = settings
        self.app = create_app(settings, sessions, timers)
        self.tls = settings.web.certificate is not None
        self.address: tuple[str, int] | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self.address is None:
            raise RuntimeError("the dashboard is not running")
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{shown}:{port}"

    def start(self) -> tuple[str, int]:
        web = self.settings.web
        sock = _bind(web.bind_address, web.port)
        config = uvicorn.Config(
            self.app,
            loop="asyncio",
            http="h11",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=2,
            ssl_certfile=str(web.certificate) if web.certificate else None,
            ssl_keyfile=str(web.private_key) if web.private_key else None,
        )
        try:
            config.load()  # here, so a bad certificate fails the start with its reason
        except Exception:
            sock.close()
            raise
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="web", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise RuntimeError("the dashboard's HTTP server did not start")
            time.sleep(0.01)
        host, port = sock.getsockname()[:2]
        self.address = (str(host), int(port))
        logger.info("dashboard, /metrics and /health at %s (research use only)", self.url)
        return self.address

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(STOP_TIMEOUT_SECONDS)
        if thread.is_alive():
            server.force_exit = True
            thread.join(STOP_TIMEOUT_SECONDS)
        if thread.is_alive():
            logger.warning("the dashboard's HTTP server did not stop in time")
        else:
            logger.info("dashboard stopped")
        self._server = self._thread = None
