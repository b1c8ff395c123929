"""The worker's HTTP endpoints: ``/healthz`` (alive), ``/readyz`` (doing its job), ``/metrics``.

A thread with the standard library's HTTP server: no dependency, and it answers while the
engine thread is busy inside a long snapshot. Liveness means the control loop still ticks
(a wedged loop gets the pod restarted); readiness means the engine runs every table it should
(or there is nothing to run).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: The control loop is considered wedged when it has not ticked for this long.
STALE_SECONDS = 120.0


class Health:
    def __init__(self) -> None:
        self.last_tick = time.monotonic()
        self.ready = False
        self.detail = "starting"

    def tick(self, ready: bool, detail: str) -> None:
        self.last_tick = time.monotonic()
        self.ready = ready
        self.detail = detail

    def alive(self) -> bool:
        return time.monotonic() - self.last_tick < STALE_SECONDS


def _handler(health: Health, metrics: Callable[[], bytes] | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if metrics is not None and self.path.split("?", 1)[0] == "/metrics":
                body = metrics()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            checks: dict[str, Callable[[], bool]] = {"/healthz": health.alive, "/readyz": lambda: health.ready}
            check = checks.get(self.path.split("?", 1)[0])
            if check is None:
                self.send_error(404)
                return
            ok = check()
            body = (("ok" if ok else "not ok") + f": {health.detail}\n").encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: no access log
            pass

    return Handler


def serve(health: Health, address: str, metrics: Callable[[], bytes] | None = None) -> ThreadingHTTPServer:
    """Start serving on ``host:port`` in a daemon thread; ``shutdown()`` the result to stop."""
    host, _, port = address.rpartition(":")
    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), _handler(health, metrics))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
