"""The README's first command: the demo runs end to end and its copy checks out."""

from __future__ import annotations

from pathlib import Path

import duckdb

from tests import helpers


def test_demo_runs_and_its_copy_is_consistent(tmp_path: Path) -> None:
    target = str(tmp_path / "demo.duckdb")
    res = helpers.cli("demo", "--target", target, "--seconds", "3", "--scale", "0.05", timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "consistency check under live traffic" in res.stdout and "score 100, 0 rows wrong" in res.stdout
    assert "✗" not in res.stdout  # every table's counts equal in the summary
    con = duckdb.connect(target, read_only=True)
    counts = dict(con.execute(
        "SELECT table_name, estimated_size FROM duckdb_tables() WHERE schema_name = 'public'"
    ).fetchall())
    con.close()
    assert set(counts) == {"users", "projects", "domains", "pages_v2", "project_pages"}
