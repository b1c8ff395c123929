"""The worker's HTTP endpoints: ``/healthz`` (alive), ``/readyz`` (doing its job), ``/metrics``.

Served by ``listening`` (answers while the engine thread is busy inside a long
snapshot). Liveness means the control loop still ticks
(a wedged loop gets the pod restarted); readiness means the engine runs every table it should
(or there is nothing to run).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer

from datasync import listening

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


def serve(health: Health, address: str, metrics: Callable[[], bytes] | None = None) -> ThreadingHTTPServer:
    """Start serving on ``host:port`` in a daemon thread; ``shutdown()`` the result to stop."""

    def probe(check: Callable[[], bool]) -> listening.Route:
        def answer(_: bytes) -> listening.Response:
            ok = check()
            return listening.text(200 if ok else 503, ("ok" if ok else "not ok") + f": {health.detail}\n")

        return answer

    routes = {("GET", "/healthz"): probe(health.alive), ("GET", "/readyz"): probe(lambda: health.ready)}
    if metrics is not None:
        routes[("GET", "/metrics")] = listening.metrics(metrics)
    return listening.serve(routes, address, default_host="0.0.0.0", name="health")
