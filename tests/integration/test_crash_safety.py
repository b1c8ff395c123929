"""SIGKILL the sync at random moments under live writes: the target still equals the source."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import psycopg

from tests import helpers


def _writer(dsn: str, stop: threading.Event, seed: int) -> int:
    rnd = random.Random(seed)
    txns = 0
    with psycopg.connect(dsn, autocommit=False) as conn:
        next_id = 100_000 + seed * 1_000_000
        while not stop.is_set():
            for _ in range(rnd.randint(1, 20)):
                op = rnd.random()
                k = rnd.randint(1, 3000)
                if op < 0.35:
                    conn.execute("UPDATE acct SET balance = balance + %s, note = md5(random()::text) WHERE id = %s",
                                 (rnd.randint(-50, 50), k))
                elif op < 0.6:
                    next_id += 1
                    conn.execute("INSERT INTO acct VALUES (%s, %s, 'new', now())", (next_id, rnd.randint(0, 999)))
                elif op < 0.8:
                    conn.execute("DELETE FROM acct WHERE id = %s", (k,))
                elif op < 0.9:
                    next_id += 1
                    conn.execute("UPDATE acct SET id = %s WHERE id = %s", (next_id, k))
                else:
                    conn.execute("INSERT INTO ledger (acct, amount) VALUES (%s, %s)", (k, rnd.randint(1, 100)))
            if rnd.random() < 0.1:
                conn.rollback()
            else:
                conn.commit()
                txns += 1
            time.sleep(rnd.random() * 0.005)
    return txns


def _start_follow(dsn: str, target: str, *tables: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "datasync", "--log-level", "WARNING", "sync", "--source", dsn, "--target", target,
            "--follow", "--quiet",
            "--max-batch-seconds", "0.05", "--batch-size", "500"]
    for t in tables:
        args += ["--table", t]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=helpers.ROOT)


def test_sigkill_mid_stream_loses_and_duplicates_nothing(pg: helpers.Source, duck_path: str) -> None:
    pg.execute(
        """CREATE TABLE acct (id bigint PRIMARY KEY, balance bigint, note text, at timestamptz);
           CREATE TABLE ledger (id bigserial PRIMARY KEY, acct bigint, amount int);
           INSERT INTO acct SELECT g, g % 1000, md5(g::text), now() FROM generate_series(1, 3000) g;
           CREATE TABLE late (id int PRIMARY KEY, v text);
           INSERT INTO late SELECT g, repeat('x', 200) FROM generate_series(1, 200000) g;"""
    )
    first = helpers.cli("sync", "--source", pg.dsn, "--target", duck_path, "--table", "acct", "--table", "ledger",
                        "--once", "--quiet")
    assert first.returncode == 0, first.stderr
    stop = threading.Event()
    writers = [threading.Thread(target=_writer, args=(pg.dsn, stop, s)) for s in (1, 2)]
    for w in writers:
        w.start()
    rnd = random.Random(7)
    kills = 0
    try:
        for round_ in range(5):
            tables = ["acct", "ledger"] + (["late"] if round_ >= 3 else [])  # round 3 is killed mid-snapshot
            proc = _start_follow(pg.dsn, duck_path, *tables)
            time.sleep(0.4 if round_ == 3 else rnd.uniform(0.8, 3.0))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            _out, err = proc.communicate(timeout=30)
            assert proc.returncode in (-signal.SIGKILL, 0), err
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert kills >= 4
    final = helpers.cli("sync", "--source", pg.dsn, "--target", duck_path, "--table", "acct", "--table", "late",
                        "--once", "--quiet")
    assert final.returncode == 0, final.stderr
    assert helpers.assert_same(pg, duck_path, "acct") > 1000
    assert helpers.assert_same(pg, duck_path, "ledger") > 0
    assert helpers.assert_same(pg, duck_path, "late") == 200000


def test_follow_stops_cleanly_on_sigterm(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE f (id int PRIMARY KEY, v int); INSERT INTO f SELECT g, 0 FROM generate_series(1, 100) g")
    proc = _start_follow(pg.dsn, duck_path, "f")
    time.sleep(2.0)
    pg.execute("UPDATE f SET v = 1 WHERE id <= 50")
    pg.execute("INSERT INTO f VALUES (101, 1)")
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert helpers.assert_same(pg, duck_path, "f") == 101  # streamed before the signal, no --once needed


def test_follow_survives_a_source_restart(pg: helpers.Source, duck_path: str) -> None:
    pg.execute("CREATE TABLE r (id int PRIMARY KEY, v int); INSERT INTO r SELECT g, 0 FROM generate_series(1, 100) g")
    proc = _start_follow(pg.dsn, duck_path, "r")
    try:
        time.sleep(2.0)
        pg.execute("UPDATE r SET v = 1 WHERE id <= 10")
        time.sleep(1.0)
        pg.server.restart()  # the walsender and every connection die
        pg.execute("UPDATE r SET v = 2 WHERE id > 90; INSERT INTO r VALUES (101, 3)")
        time.sleep(4.0)
        assert proc.poll() is None, proc.communicate()[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "reconnecting" in err
    assert helpers.assert_same(pg, duck_path, "r") == 101
