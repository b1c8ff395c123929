"""Which partial row groups a snapshot moves to the table's end (``snapshotting.rows_to_gather``)."""

from __future__ import annotations

from datasync.engine import snapshotting

FULL, BIG, SMALL = 122_880, 100_000, 5_000


def test_small_partial_groups_move_and_the_last_group_with_them() -> None:
    # rowids: [0, F) full, [F, F+S) small, ..., the last group small too
    counts = [FULL, SMALL, FULL, BIG, FULL, SMALL]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    assert snapshotting.rows_to_gather(counts) == [(starts[1], starts[1] + SMALL), (starts[5], starts[5] + SMALL)]


def test_a_big_last_group_stays_and_small_ones_move_after_it() -> None:
    counts = [FULL, SMALL, FULL, BIG]
    assert snapshotting.rows_to_gather(counts) == [(FULL, FULL + SMALL)]


def test_nothing_moves_when_only_the_last_group_is_small_or_every_partial_group_is_big() -> None:
    assert snapshotting.rows_to_gather([FULL, BIG, FULL, 7_000]) == []
    assert snapshotting.rows_to_gather([FULL, BIG, FULL, BIG]) == []
    assert snapshotting.rows_to_gather([FULL, FULL]) == []
    assert snapshotting.rows_to_gather([SMALL]) == []
    assert snapshotting.rows_to_gather([]) == []  # an empty table


def test_the_threshold_is_half_a_row_group() -> None:
    half = FULL // 2
    assert snapshotting.rows_to_gather([half - 1, FULL]) == [(0, half - 1)]
    assert snapshotting.rows_to_gather([half, FULL]) == []
