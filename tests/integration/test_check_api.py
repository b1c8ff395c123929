"""`datasync check --writer`: the running `sync --follow --api-address` checks its own file."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psycopg

from datasync.sources.embedded import free_port
from tests import helpers


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except OSError:
        return 0, ""


def test_checks_through_the_running_writer(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE t (id bigint PRIMARY KEY, v int, note text);"
               "INSERT INTO t SELECT g, g, md5(g::text) FROM generate_series(1, 20000) g")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sync = subprocess.Popen(
        [sys.executable, "-m", "datasync", "sync", "--source", pg.dsn, "--target", duck_path, "--table", "t",
         "--follow", "--quiet", "--api-address", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=helpers.ROOT,
    )
    stop = threading.Event()
    writes = [0]

    def traffic() -> None:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("UPDATE t SET v = v + 1 WHERE id = %s", (1 + writes[0] % 20000,))
                writes[0] += 1

    mover = threading.Thread(target=traffic, daemon=True)
    try:
        deadline = time.monotonic() + 60
        while _get(url + "/healthz")[0] != 200:
            assert sync.poll() is None, sync.stderr.read() if sync.stderr else ""
            assert time.monotonic() < deadline, "the API did not come up"
            time.sleep(0.2)
        assert _get(url + "/api/v1/data-sync/consistency/status")[0] == 404  # nothing run yet
        mover.start()
        # the file is held: a local check says how to reach the writer instead
        held = helpers.cli("check", "--source", pg.dsn, "--target", duck_path)
        assert held.returncode != 0 and "a running `datasync sync` holds the file" in held.stderr
        for _ in range(30):  # the snapshot may still be running: the writer answers 503 until it streams
            res = helpers.cli("check", "--writer", url, "--json", "--checks", "row_count,data_hash")
            if "not streaming" not in res.stderr:
                break
            time.sleep(1)
        assert res.returncode == 0, res.stdout + res.stderr
        report = json.loads(res.stdout)
        assert report["consistency_score"] == 100.0 and report["aligned"] and report["tables"][0]["rows_source"] == 20000
        assert writes[0] > 50, "changes kept coming during the check"
        readable = helpers.cli("check", "--writer", url, "--table", "public.t")
        assert readable.returncode == 0 and "consistency score 100" in readable.stdout, readable.stdout + readable.stderr
        bad = helpers.cli("check", "--writer", url, "--checks", "nope")
        assert bad.returncode != 0 and "unknown check(s) nope" in bad.stderr
        code, status = _get(url + "/api/v1/data-sync/consistency/status")
        assert code == 200 and json.loads(status)["consistency_score"] == 100.0
        code, metrics = _get(url + "/metrics")
        assert code == 200 and 'datasync_consistency_score{check="api",namespace=""} 100.0' in metrics
        assert pg.server.password not in metrics and pg.server.password not in status
        nothing = helpers.cli("check", "--writer", "http://127.0.0.1:1")
        assert nothing.returncode != 0 and "cannot reach the writer" in nothing.stderr
        usage = helpers.cli("check", "--source", pg.dsn)
        assert usage.returncode == 2 and "give --target" in usage.stderr
    finally:
        stop.set()
        if mover.is_alive():
            mover.join()
        sync.terminate()
        sync.wait(60)
    assert sync.returncode == 0, sync.stderr.read() if sync.stderr else ""
