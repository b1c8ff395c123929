"""Consistency validation: compare the DuckDB copy with PostgreSQL, exactly."""
