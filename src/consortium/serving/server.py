"""Runs the HTTP API with uvicorn in a thread of the coordinator process.

`Served` wraps a Coordinator so that the CLI's start/stop cycle (cli/pipeline.py `_serve`)
starts the API after the coordinator and stops it before: the coordinator itself is
unchanged, and the API calls it in-process.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn

from consortium.errors import ConsortiumError
from consortium.serving.config import ServeConfig

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, coordinator, serve: ServeConfig):
        from consortium.serving.api import create_app

        serve.check_exposure()
        serve.tls_context()
        self.serve = serve
        self.app = create_app(coordinator, serve)
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.serve.http_host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        scheme = "https" if self.serve.http_tls_cert is not None else "http"
        return f"{scheme}://{shown}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        """Binds the port here (a taken port fails now, with one line), then serves in a thread."""
        host = self.serve.http_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, self.serve.http_port or 0))
        except OSError as e:
            sock.close()
            raise ConsortiumError(f"cannot serve HTTP on {host}:{self.serve.http_port}: {e.strerror}") from e
        self.port = sock.getsockname()[1]
        tls = {"ssl_certfile": self.serve.http_tls_cert, "ssl_keyfile": self.serve.http_tls_key}
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, timeout_graceful_shutdown=2, lifespan="off", **tls
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, args=([sock],), name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConsortiumError(f"the HTTP API did not start on {host}:{self.port}")
            time.sleep(0.02)
        log.info(
            "HTTP API on %s (auth %s, %s release)",
            self.url,
            "on" if self.serve.auth else "off",
            self.serve.release,
        )

    def request_exit(self) -> None:
        """Stops accepting requests; running streams end as their sessions do."""
        if self._server is not None:
            self._server.should_exit = True

    def stop(self) -> None:
        self.request_exit()
        if self._thread is not None:
            self._thread.join(5.0)


class Served:
    """A Coordinator with the HTTP API: starts and stops both, and is the Coordinator otherwise."""

    def __init__(self, coordinator, serve: ServeConfig, port_file: Path | None = None):
        self.coordinator, self.serve, self.port_file = coordinator, serve, port_file
        self.http: HttpServer | None = None

    def __getattr__(self, name: str):
        return getattr(self.coordinator, name)

    @property
    def http_note(self) -> str:
        """What the coordinator's banner adds."""
        return f"; HTTP API on {self.http.url}" if self.http is not None else ""

    def start(self) -> None:
        self.coordinator.start()
        self.http = HttpServer(self.coordinator, self.serve)
        self.http.start()
        if self.port_file is not None:
            from consortium.coordinator.launcher import write_port_file

            write_port_file(self.port_file, self.http.port)

    def stop(self, grace_s: float = 2.0) -> None:
        if self.http is not None:
            self.http.request_exit()
        self.coordinator.stop(grace_s)
        if self.http is not None:
            self.http.stop()
