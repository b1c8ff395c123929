"""listening: routes by method and path, errors as JSON, bodies bounded."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from datasync import listening
from datasync.sources import embedded


@pytest.fixture
def url() -> Iterator[str]:
    def echo(body: bytes) -> listening.Response:
        return listening.as_json(200, {"got": body.decode()})

    def boom(_: bytes) -> listening.Response:
        raise RuntimeError("broken route")

    port = embedded.free_port()
    server = listening.serve(
        {("GET", "/ping"): lambda _: listening.text(200, "pong\n"), ("POST", "/echo"): echo, ("GET", "/boom"): boom,
         ("GET", "/metrics"): listening.metrics(lambda: b"x 1\n")},
        f"127.0.0.1:{port}", default_host="127.0.0.1", name="test",
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def _call(url: str, data: bytes | None = None) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_routes_answer_by_method_and_path(url: str) -> None:
    assert _call(url + "/ping") == (200, listening.TEXT, b"pong\n")
    assert _call(url + "/ping?x=1")[0] == 200
    code, ctype, body = _call(url + "/echo", b"hello")
    assert (code, ctype, json.loads(body)) == (200, listening.JSON, {"got": "hello"})
    assert _call(url + "/metrics") == (200, listening.METRICS, b"x 1\n")
    assert _call(url + "/nothing")[0] == 404
    assert _call(url + "/echo")[0] == 405  # known path, wrong method
    code, _, body = _call(url + "/boom")
    assert code == 500 and "broken route" in json.loads(body)["error"]
    assert _oversized(url + "/echo") == 413


def _oversized(url: str) -> int:
    """A POST announcing a body over the limit: refused from its Content-Length, before any body is read.

    (Sending the body as well raced the server's early close: a broken pipe on the client instead of the 413.)
    """
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=5)
    try:
        conn.putrequest("POST", parts.path)
        conn.putheader("Content-Length", str(listening.MAX_BODY + 1))
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()
