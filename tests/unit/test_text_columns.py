"""The C staging of folded CDC rows equals pyarrow's own conversion."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from datasync.engine import applying, pgoutput


@pytest.mark.skipif(not pgoutput.SPEEDUPS, reason="C extension not built")
def test_text_columns_match_pyarrow() -> None:
    rng = random.Random(7)
    alphabet = ["a", "ü", "😀", "", " ", "\n", "x" * 300]

    def value() -> str | None:
        return None if rng.random() < 0.2 else "".join(rng.choice(alphabet) for _ in range(rng.randrange(4)))

    rows: list[list[str | None] | None] = [
        None if rng.random() < 0.1 else [value() for _ in range(5)] for _ in range(3000)
    ]
    got = applying._text_arrays(rows, 5)
    for i, arr in enumerate(got):
        want = [None if r is None else r[i] for r in rows]
        assert arr.type == pa.large_string()
        assert arr.to_pylist() == want
    keys = [f"k{i}" for i in range(100)] + [None]
    assert applying._text_arrays(keys, 0)[0].to_pylist() == keys


@pytest.mark.skipif(not pgoutput.SPEEDUPS, reason="C extension not built")
def test_text_columns_turn_markers_into_nulls_and_refuse_short_rows() -> None:
    arr = applying._text_arrays([["a", pgoutput.UNCHANGED]], 2)
    assert [a.to_pylist() for a in arr] == [["a"], [None]]
    with pytest.raises(ValueError, match="row too short"):
        applying._text_arrays([["a"]], 2)
