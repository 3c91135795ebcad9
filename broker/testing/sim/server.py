"""The HTTP server: one handler class over the simulator's request entry point."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import sys
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from broker.testing.sim.graphql import _json
from broker.testing.sim.pods import PodInfo

if TYPE_CHECKING:
    from broker.testing.runpod_sim import RunPodSimulator

log = logging.getLogger("broker.testing.runpod_sim")


class _QuietServer(ThreadingHTTPServer):
    """No traceback on stderr when a client hangs up mid-answer (BrokenPipe, reset)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            log.debug("client %s went away: %s", client_address, exc)
            return
        log.exception("simulator error while serving %s", client_address)


_API_KEY_IN_URL = re.compile(r"(?i)(api_key=)[^&\s\"]+")


def _make_handler(sim: RunPodSimulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "runpod-sim/1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length > 0 else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                status, extra, body = sim._handle(self.path, headers, raw)
            except Exception:
                log.exception("simulator error")
                status, extra, body = _json(500, {"error": "Internal Server Error"})
            if body is None:
                # The pod exists, but the client never hears about it.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if urlsplit(self.path).path.rstrip("/") in ("", "/_sim/pods"):
                payload = {
                    "simulator": "runpod",
                    "graphql": f"{sim.url}/graphql",
                    "pods": [_info_json(p) for p in sim.pods()],
                }
                status, extra, body = _json(200, payload)
            else:
                status, extra, body = _json(404, {"error": "Not Found"})
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def handle(self) -> None:
            # A client that gives up (timeout, Ctrl-C) closes its end: not worth a traceback.
            with contextlib.suppress(ConnectionError):
                super().handle()

        def log_message(self, format: str, *args: Any) -> None:
            # The default writes every request line to stderr; the request line may carry
            # ?api_key=..., so that is redacted (headers never appear).
            log.debug("http: %s", _API_KEY_IN_URL.sub(r"\1***", format % args))

    return Handler


def _info_json(info: PodInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in info.__dict__.items():
        out[k] = (
            v.isoformat() if isinstance(v, datetime) else list(v) if isinstance(v, tuple) else v
        )
    return out


# -- command line ---------------------------------------------------------------------------------
