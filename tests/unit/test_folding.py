"""The batch fold of ordinary changes: C and the Python reference agree, and both stop where they must."""

from __future__ import annotations

import gc
import importlib
import struct
from typing import Any

import pyarrow as pa
import pytest

from datasync.engine import applying
from datasync.engine import pgoutput as po
from tests.unit import test_pgoutput

_speedups: Any = importlib.import_module("datasync.engine._speedups")  # built: test_pgoutput fails otherwise
_tuple = test_pgoutput._tuple
FOLDS = [pytest.param(applying._py_fold_changes, id="python"), pytest.param(_speedups.fold_changes, id="c")]


def ins(relid: int, *vals: object) -> bytes:
    return b"I" + struct.pack("!I", relid) + b"N" + _tuple(*vals)


def upd(relid: int, *vals: object, old: tuple[bytes, tuple[object, ...]] | None = None) -> bytes:
    head = b"U" + struct.pack("!I", relid)
    if old is not None:
        head += old[0] + _tuple(*old[1])
    return head + b"N" + _tuple(*vals)


def dele(relid: int, *vals: object, marker: bytes = b"K") -> bytes:
    return b"D" + struct.pack("!I", relid) + marker + _tuple(*vals)


BEGIN = b"B" + struct.pack("!QqI", 100, 1, 7)


def rows(pending: dict[Any, Any]) -> dict[Any, tuple[int, Any]]:
    """The folded rows as (op, values list): the fold keeps messages, the applier may hold lists."""
    return {k: (e[applying.OP], applying.entry_values(e)) for k, e in pending.items()}


@pytest.mark.parametrize("fold", FOLDS)
def test_folds_runs_of_changes_as_the_applier_does(fold: Any) -> None:
    pending: dict[Any, Any] = {}
    composite: dict[Any, Any] = {}
    tables = {5: (pending, (0,)), 6: (composite, (1, 0))}
    msgs = [
        ins(5, "1", "a"), ins(5, "2", "b"), upd(5, "1", "a2"), dele(5, "2", None),
        upd(5, "3", "c", old=(b"O", ("3", "old"))),  # REPLICA IDENTITY FULL, same key
        ins(6, "x", "y", "z"), dele(6, "x", "y", None),
        ins(6, "p", "q", None),
        BEGIN,
    ]
    assert fold(msgs, 0, tables, 1000) == (8, 8)
    assert rows(pending) == {"1": (0, ["1", "a2"]), "2": (1, None), "3": (0, ["3", "c"])}
    assert rows(composite) == {("y", "x"): (1, None), ("q", "p"): (0, ["p", "q", None])}
    assert pending["1"][applying.VALUES] is msgs[2]  # the message itself, not a copy of its values
    assert fold(msgs, 8, tables, 1000) == (8, 0)  # not a change: left to the loop


def test_c_fold_keeps_its_entries_out_of_the_cyclic_collector() -> None:
    """A batch holds ~100k folded entries; tracked, every collection of the loop visited them all."""
    pending: dict[Any, Any] = {}
    composite: dict[Any, Any] = {}
    tables = {5: (pending, (0,)), 6: (composite, (1, 0))}
    assert _speedups.fold_changes([ins(5, "1", "a"), ins(6, "x", "y")], 0, tables, 1000) == (2, 2)
    ((key, entry),) = composite.items()
    assert not gc.is_tracked(pending["1"]) and not gc.is_tracked(entry) and not gc.is_tracked(key)


@pytest.mark.parametrize("fold", FOLDS)
@pytest.mark.parametrize(
    "leftover",
    [
        pytest.param(ins(9, "1", "a"), id="other-relid"),
        pytest.param(upd(5, "1", po.UNCHANGED), id="unchanged-toast"),
        pytest.param(upd(5, "2", "b", old=(b"K", ("1", None))), id="key-change"),
        pytest.param(b"R" + struct.pack("!I", 5), id="relation"),
    ],
)
def test_stops_before_what_it_leaves_to_the_applier(fold: Any, leftover: bytes) -> None:
    pending: dict[Any, Any] = {}
    msgs = [ins(5, "7", "x"), leftover, ins(5, "8", "y")]
    assert fold(msgs, 0, {5: (pending, (0,))}, 1000) == (1, 1)
    assert rows(pending) == {"7": (0, ["7", "x"])}
    assert fold(msgs, 1, {5: (pending, (0,))}, 1000) == (1, 0)
    assert fold(msgs, 2, {5: (pending, (0,))}, 1000) == (3, 1)


@pytest.mark.parametrize("fold", FOLDS)
def test_stops_after_a_pending_dict_fills(fold: Any) -> None:
    pending: dict[Any, Any] = {}
    msgs = [ins(5, str(i), "v") for i in range(10)]
    assert fold(msgs, 0, {5: (pending, (0,))}, 4) == (4, 4)
    assert fold(msgs, 4, {5: (pending, (0,))}, 4) == (5, 1)  # still full: one change at a time
    pending.clear()
    assert fold(msgs, 5, {5: (pending, (0,))}, 100) == (10, 5)


def test_c_fold_matches_the_reference_on_a_mixed_stream() -> None:
    msgs = []
    for i in range(300):
        k = str(i % 37)
        msgs += [ins(5, k, f"v{i}"), upd(5, k, None if i % 5 else "é"), dele(5, str((i * 7) % 37), None)]
    results = []
    for fold in (applying._py_fold_changes, _speedups.fold_changes):
        pending: dict[Any, Any] = {}
        steps: list[object] = []
        at = 0
        while at < len(msgs):
            at, n = fold(msgs, at, {5: (pending, (0,))}, 20)
            steps.append((at, n))
            pending_copy = dict(pending)
            pending.clear()
            steps.append(tuple(sorted(pending_copy.items())))
        results.append(steps)
    assert results[0] == results[1]


def test_malformed_change_raises() -> None:
    with pytest.raises(po.DecodeError):
        _speedups.fold_changes([b"I" + struct.pack("!I", 5) + b"N" + b"\x00\x02t\x00\x00"], 0, {5: ({}, (0,))}, 10)


def test_staging_reads_messages_and_lists_alike() -> None:
    pending: dict[Any, Any] = {}
    msgs = [ins(5, "1", "é"), ins(5, "2", None), dele(5, "3", None)]
    applying._py_fold_changes(msgs, 0, {5: (pending, (0,))}, 100)
    entries = [*pending.values(), (0, ["4", "x"], None), (0, None, None)]
    columns = [
        pa.Array.from_buffers(pa.large_string(), len(entries), [pa.py_buffer(b) for b in triple]).to_pylist()
        for triple in _speedups.stage_values(entries, 2)
    ]
    assert columns == [["1", "2", None, "4", None], ["é", None, None, "x", None]]
    with pytest.raises(po.DecodeError):
        _speedups.stage_values([(0, ins(5, "1", "a", "extra"), None, 6)], 2)


@pytest.mark.parametrize("fold", FOLDS)
def test_wide_keys_of_keyless_tables(fold: Any) -> None:
    """REPLICA IDENTITY FULL without a key: every column is the key (more than fit the C fast buffers)."""
    pending: dict[Any, Any] = {}
    width = 12
    row = [str(i) for i in range(width)]
    changed = [*row[:-1], "new"]
    msgs = [ins(5, *row), upd(5, *changed, old=(b"O", tuple(row))), dele(5, *changed, marker=b"O")]
    spec = {5: (pending, tuple(range(width)))}
    assert fold(msgs, 0, spec, 100) == (1, 1)  # an update of a keyless row changes its key: the applier's
    assert rows(pending) == {tuple(row): (0, row)}
    assert fold(msgs, 2, spec, 100) == (3, 1)
    assert rows(pending) == {tuple(row): (0, row), tuple(changed): (1, None)}
