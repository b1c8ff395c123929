"""The README's type table is the code's mapping table."""

from __future__ import annotations

from pathlib import Path

from datasync.sources import typemaps

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_type_table_matches_code() -> None:
    text = README.read_text()
    rows = [f"| {pg} | {duck} | {note} |" for pg, duck, note in typemaps.DOC_ROWS]
    table = "\n".join(["| PostgreSQL | DuckDB | round trip |", "|---|---|---|", *rows])
    assert table in text, "README type table differs from datasync.sources.typemaps.DOC_ROWS"


def test_readme_starts_with_the_two_commands() -> None:
    head = README.read_text()[:1200]
    assert "make demo" in head and "make test" in head
