"""One small HTTP server for every endpoint DataSync exposes.

The worker's probes and metrics (``working/health.py``) and the writer's check API
(``serving.py``) are both a handful of routes on the standard library's threaded
server: no dependency, and they answer while the engine thread is inside a long
snapshot.  This module is the one place that speaks HTTP; the others only say
which path answers what.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

#: status, body, content type
Response = tuple[int, bytes, str]
#: a route gets the request body (b"" for GET) and answers
Route = Callable[[bytes], Response]

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
METRICS = "text/plain; version=0.0.4; charset=utf-8"
MAX_BODY = 1 << 20


def text(code: int, body: str) -> Response:
    return code, body.encode(), TEXT


def as_json(code: int, doc: dict[str, Any]) -> Response:
    return code, json.dumps(doc, default=str).encode(), JSON


def metrics(exposition: Callable[[], bytes]) -> Route:
    return lambda _: (200, exposition(), METRICS)


def _handler(routes: dict[tuple[str, str], Route], access_log: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            route = routes.get((method, path))
            if route is None:
                known = any(p == path for _, p in routes)
                code, body, ctype = as_json(405 if known else 404, {"error": f"no {method} {path}"})
            else:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    code, body, ctype = as_json(413, {"error": "request body too large"})
                else:
                    try:
                        code, body, ctype = route(self.rfile.read(length) if length else b"")
                    except Exception as exc:  # a failing route answers 500; the server goes on
                        log.exception("http: %s %s failed", method, path)
                        code, body, ctype = as_json(500, {"error": f"{type(exc).__name__}: {exc}"})
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def log_message(self, format: str, *args: object) -> None:
            if access_log:  # probes every few seconds would flood the log
                log.info("http: " + format, *args)

    return Handler


def serve(
    routes: dict[tuple[str, str], Route], address: str, *, default_host: str, name: str, access_log: bool = False
) -> ThreadingHTTPServer:
    """Serve ``routes`` (keyed by method and path) on ``host:port`` in a daemon thread; ``shutdown()`` to stop."""
    host, _, port = address.rpartition(":")
    server = ThreadingHTTPServer((host or default_host, int(port)), _handler(routes, access_log))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server
