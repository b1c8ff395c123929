"""The writer's HTTP API: consistency checks through the process that owns the file.

While ``datasync sync --follow`` runs, no other process can open its DuckDB file, not even
read-only, so ``datasync check --target`` cannot look at it.  With ``--api-address`` the
sync process serves the check itself, aligned at one LSN by its own stream:

* ``POST /api/v1/data-sync/consistency/check`` — body ``{"tables": [...], "check_types":
  [...], "rules": [{"name", "sql", "compare_with_source"}], "foreign_keys": ["child(c) ->
  parent(c)"], "repair": false, "timeout_seconds": 60}`` (all optional); answers the report ``datasync check --json``
  prints (``datasync check --writer URL`` is the client);
* ``GET /api/v1/data-sync/consistency/status`` — the latest report (404 before the first);
* ``GET /metrics`` — Prometheus text; ``GET /healthz`` — 200 while the server runs.

It binds to loopback unless told otherwise: business rules are SELECTs run by the writer, so
whoever reaches the port can read the copy.  One check runs at a time (409 while busy).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

from datasync import errors, identifiers, listening
from datasync.engine import pinning
from datasync.validation import comparing, references, rules, running

log = logging.getLogger(__name__)

CHECK_PATH = "/api/v1/data-sync/consistency/check"
STATUS_PATH = "/api/v1/data-sync/consistency/status"


class Api:
    def __init__(self, dsn: str, pins: pinning.Pins, metrics: Callable[[], bytes] | None = None,
                 on_run: Callable[[comparing.Run], None] | None = None) -> None:
        self.dsn, self.pins, self.metrics, self.on_run = dsn, pins, metrics, on_run
        self.last_run: comparing.Run | None = None
        self._busy = threading.Lock()

    def request(self, body: dict[str, Any]) -> running.Request:
        if not isinstance(body, dict):
            raise errors.DataSyncError("the request body must be a JSON object", "send {\"tables\": [...], ...}")
        unknown = set(body) - {"tables", "check_types", "rules", "foreign_keys", "repair", "timeout_seconds"}
        if unknown:
            raise errors.DataSyncError(f"unknown field(s) {', '.join(sorted(unknown))}",
                                       "use tables, check_types, rules, foreign_keys, repair")
        rule_list = [
            rules.Rule(str(r["name"]), str(r["sql"]), bool(r.get("compare_with_source", False)))
            for r in body.get("rules") or []
        ]
        return running.Request(
            [identifiers.TableName.parse(str(t)) for t in body.get("tables") or []],
            [str(c) for c in body.get("check_types") or ["row_count", "data_hash"]],
            rule_list,
            bool(body.get("repair", False)),
            [references.parse(str(k)) for k in body.get("foreign_keys") or []],
            float(body["timeout_seconds"]) if body.get("timeout_seconds") else None,
        )

    def check(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            request = self.request(body)
        except (errors.DataSyncError, KeyError, TypeError, ValueError) as exc:
            return 400, _error(exc)
        if not self._busy.acquire(blocking=False):
            return 409, {"error": "a check is already running", "hint": "wait for it, then ask again"}
        try:
            run: comparing.Run = running.run_aligned(self.dsn, self.pins, request)
        except pinning.NotStreaming as exc:
            return 503, _error(exc)
        except errors.DataSyncError as exc:
            return 422, _error(exc)
        finally:
            self._busy.release()
        self.last_run = run
        if self.on_run is not None:
            self.on_run(run)
        return 200, run.as_json()


def _error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, errors.DataSyncError):
        return {"error": exc.message, "hint": exc.hint}
    return {"error": f"{type(exc).__name__}: {exc}"}


def serve(api: Api, address: str) -> ThreadingHTTPServer:
    """Serve ``api`` on ``host:port`` in a daemon thread; ``shutdown()`` the result to stop."""

    def check(body: bytes) -> listening.Response:
        try:
            doc = json.loads(body or b"{}")
        except json.JSONDecodeError as exc:
            return listening.as_json(400, {"error": f"the body is not JSON: {exc}"})
        return listening.as_json(*api.check(doc))

    def status(_: bytes) -> listening.Response:
        if api.last_run is None:
            return listening.as_json(404, {"error": "no check has run yet", "hint": f"POST {CHECK_PATH}"})
        return listening.as_json(200, api.last_run.as_json())

    routes: dict[tuple[str, str], listening.Route] = {
        ("POST", CHECK_PATH): check,
        ("GET", STATUS_PATH): status,
        ("GET", "/healthz"): lambda _: listening.text(200, "ok\n"),
    }
    if api.metrics is not None:
        routes[("GET", "/metrics")] = listening.metrics(api.metrics)
    return listening.serve(routes, address, default_host="127.0.0.1", name="api", access_log=True)
