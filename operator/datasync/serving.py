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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from datasync import errors, identifiers
from datasync.engine import pinning
from datasync.validation import comparing, references, rules, running

log = logging.getLogger(__name__)

CHECK_PATH = "/api/v1/data-sync/consistency/check"
STATUS_PATH = "/api/v1/data-sync/consistency/status"
MAX_BODY = 1 << 20


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


def _handler(api: Api) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, doc: dict[str, Any]) -> None:
            self._send(code, json.dumps(doc, default=str).encode())

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            elif path == "/metrics" and api.metrics is not None:
                self._send(200, api.metrics(), "text/plain; version=0.0.4; charset=utf-8")
            elif path == STATUS_PATH:
                if api.last_run is None:
                    self._json(404, {"error": "no check has run yet", "hint": f"POST {CHECK_PATH}"})
                else:
                    self._json(200, api.last_run.as_json())
            else:
                self._json(404, {"error": f"no such endpoint {path}"})

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != CHECK_PATH:
                self._json(404, {"error": f"no such endpoint {self.path}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._json(413, {"error": "request body too large"})
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as exc:
                self._json(400, {"error": f"the body is not JSON: {exc}"})
                return
            code, doc = api.check(body)
            self._json(code, doc)

        def log_message(self, format: str, *args: object) -> None:
            log.info("api: " + format, *args)

    return Handler


def serve(api: Api, address: str) -> ThreadingHTTPServer:
    """Serve ``api`` on ``host:port`` in a daemon thread; ``shutdown()`` the result to stop."""
    host, _, port = address.rpartition(":")
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), _handler(api))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    return server
