from __future__ import annotations

import pytest

from datasync import errors
from datasync.engine import applying, pgoutput
from datasync.identifiers import TableName, quote
from datasync.sources import typemaps
from datasync.targets import duckfile


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("users", TableName("public", "users")),
        ("Sales.Orders", TableName("sales", "orders")),
        ('"Sales Dept"."Order Items"', TableName("Sales Dept", "Order Items")),
        ('"we""ird".t', TableName('we"ird', "t")),
        ('public."a.b"', TableName("public", "a.b")),
    ],
)
def test_parse_table_names(text: str, expected: TableName) -> None:
    assert TableName.parse(text) == expected


@pytest.mark.parametrize("text", ['"open', "a.b.c", "a.", ".a", 'a"b'])
def test_bad_table_names(text: str) -> None:
    with pytest.raises(errors.DataSyncError):
        TableName.parse(text)


def test_quote_and_display() -> None:
    assert quote('x"; DROP TABLE y; --') == '"x""; DROP TABLE y; --"'
    assert str(TableName("Sales Dept", "Order Items")) == '"Sales Dept"."Order Items"'
    assert TableName("public", "t").sql == '"public"."t"'


def test_numeric_mapping() -> None:
    typmod = ((12 << 16) | 2) + 4
    assert typemaps.map_type("numeric", typmod, "N").duck_type == "DECIMAL(12,2)"
    assert typemaps.map_type("numeric", -1, "N").duck_type == "VARCHAR"
    assert typemaps.map_type("numeric", ((60 << 16) | 2) + 4, "N").duck_type == "VARCHAR"
    assert typemaps.map_type("int4", -1, "A").duck_type == "VARCHAR"  # arrays keep their text form
    assert typemaps.map_type("jsonb", -1, "U").duck_type == "JSON"
    assert typemaps.map_type("inet", -1, "I").duck_type == "VARCHAR"


def _col(name: str, attnum: int) -> duckfile.TargetColumn:
    return duckfile.TargetColumn(name, 23, -1, "INTEGER", "int4", attnum)


def _rel(*names: str) -> list[pgoutput.RelationColumn]:
    return [pgoutput.RelationColumn(n, 23, -1, False) for n in names]


def test_match_columns_rename_drop_add() -> None:
    old = [_col("id", 1), _col("a", 2), _col("b", 3), _col("c", 4)]
    pairs, dropped = applying.match_columns(old, _rel("id", "x", "c", "new"), lambda n: n != 3)
    assert [(o.name if o else None, n.name) for o, n in pairs] == [("id", "id"), ("a", "x"), ("c", "c"), (None, "new")]
    assert [d.name for d in dropped] == ["b"]
    # at the tail: a live attnum is a rename, a dead one an addition
    pairs, dropped = applying.match_columns(old, _rel("id", "a", "b", "c2"), lambda n: True)
    assert [(o.name if o else None, n.name) for o, n in pairs][-1] == ("c", "c2")
    pairs, dropped = applying.match_columns(old, _rel("id", "a", "b", "c2"), lambda n: n != 4)
    assert [(o.name if o else None, n.name) for o, n in pairs][-1] == (None, "c2")
    assert [d.name for d in dropped] == ["c"]
