"""The pgoutput decoder, from hand-made bytes (every message type) and edge cases."""

from __future__ import annotations

import struct

import pytest

from datasync.engine import pgoutput as po


def _tuple(*vals: object) -> bytes:
    out = struct.pack("!h", len(vals))
    for v in vals:
        if v is None:
            out += b"n"
        elif v is po.UNCHANGED:
            out += b"u"
        elif isinstance(v, bytes):
            out += b"b" + struct.pack("!i", len(v)) + v
        else:
            data = str(v).encode()
            out += b"t" + struct.pack("!i", len(data)) + data
    return out


def test_begin_commit_origin() -> None:
    assert po.decode(b"B" + struct.pack("!QqI", 0x16B3748, 123, 42)) == po.Begin(0x16B3748, 123, 42)
    assert po.decode(b"C" + struct.pack("!BQQq", 0, 10, 20, 30)) == po.Commit(0, 10, 20, 30)
    assert po.decode(b"O" + struct.pack("!Q", 99) + b"origin\0") == po.Origin(99, "origin")


def test_relation_and_type() -> None:
    body = struct.pack("!I", 16384) + b"public\0" + b"T\xc3\xa4ble\0" + b"d" + struct.pack("!h", 2)
    body += b"\x01" + b"id\0" + struct.pack("!Ii", 23, -1)
    body += b"\x00" + b"amount\0" + struct.pack("!Ii", 1700, 786438)
    rel = po.decode(b"R" + body)
    assert isinstance(rel, po.Relation)
    assert (rel.relid, rel.namespace, rel.name, rel.replica_identity) == (16384, "public", "Täble", "d")
    assert rel.columns == (po.RelationColumn("id", 23, -1, True), po.RelationColumn("amount", 1700, 786438, False))
    assert po.decode(b"Y" + struct.pack("!I", 777) + b"public\0mood\0") == po.Type(777, "public", "mood")


def test_insert_update_delete_with_nulls_unchanged_and_binary() -> None:
    ins = po.decode(b"I" + struct.pack("!I", 5) + b"N" + _tuple("1", None, "héllo", b"\x00\x01"))
    assert ins == po.Insert(5, ["1", None, "héllo", b"\x00\x01"])
    upd = po.decode(b"U" + struct.pack("!I", 5) + b"N" + _tuple("1", po.UNCHANGED))
    assert isinstance(upd, po.Update) and upd.old is None and upd.new == ["1", po.UNCHANGED]
    key_change = po.decode(b"U" + struct.pack("!I", 5) + b"K" + _tuple("1", None) + b"N" + _tuple("2", "x"))
    assert key_change == po.Update(5, ["2", "x"], ["1", None], True)
    full = po.decode(b"U" + struct.pack("!I", 5) + b"O" + _tuple("1", "a") + b"N" + _tuple("1", "b"))
    assert isinstance(full, po.Update) and full.old == ["1", "a"] and not full.old_is_key_only
    assert po.decode(b"D" + struct.pack("!I", 5) + b"K" + _tuple("1", None)) == po.Delete(5, ["1", None], True)
    assert po.decode(b"D" + struct.pack("!I", 5) + b"O" + _tuple("1", "a")) == po.Delete(5, ["1", "a"], False)


def test_truncate_and_message() -> None:
    tr = po.decode(b"T" + struct.pack("!iB", 2, 3) + struct.pack("!II", 10, 11))
    assert tr == po.Truncate((10, 11), cascade=True, restart_identity=True)
    msg = po.decode(b"M" + b"\x01" + struct.pack("!Q", 7) + b"datasync\0" + struct.pack("!i", 3) + b"abc")
    assert msg == po.LogicalMessage(True, 7, "datasync", b"abc")


def test_streaming_messages_carry_xid() -> None:
    assert po.decode(b"S" + struct.pack("!IB", 900, 1)) == po.StreamStart(900, True)
    assert po.decode(b"E") == po.StreamStop()
    ins = po.decode(b"I" + struct.pack("!II", 900, 5) + b"N" + _tuple("1"), in_stream=True)
    assert ins == po.Insert(5, ["1"], xid=900)
    assert po.decode(b"c" + struct.pack("!IBQQq", 900, 0, 1, 2, 3)) == po.StreamCommit(900, 0, 1, 2, 3)
    assert po.decode(b"A" + struct.pack("!II", 900, 901)) == po.StreamAbort(900, 901)
    v4 = po.decode(b"A" + struct.pack("!IIQq", 900, 901, 55, 66), proto_version=4)
    assert v4 == po.StreamAbort(900, 901, 55, 66)


@pytest.mark.parametrize(
    "data",
    [b"", b"Z", b"B\x00", b"I" + struct.pack("!I", 1) + b"X", b"I" + struct.pack("!I", 1) + b"N" + b"\x00\x01q"],
)
def test_malformed_messages_raise(data: bytes) -> None:
    with pytest.raises(po.DecodeError):
        po.decode(data)


def test_lsn_text_round_trip() -> None:
    for lsn in (0, 1, 0x16B3748, 0xFFFFFFFF, 0x1_0000_0000, 0xABCDEF01_23456789):
        assert po.parse_lsn(po.format_lsn(lsn)) == lsn
    assert po.format_lsn(0x16B3748) == "0/16B3748"


CHANGES = [
    b"I" + struct.pack("!I", 5) + b"N" + _tuple("1", None, "héllo", b"\x00\x01"),
    b"U" + struct.pack("!I", 5) + b"N" + _tuple("1", po.UNCHANGED),
    b"U" + struct.pack("!I", 5) + b"K" + _tuple("1", None) + b"N" + _tuple("2", "x"),
    b"U" + struct.pack("!I", 5) + b"O" + _tuple("1", "a") + b"N" + _tuple("1", "b"),
    b"D" + struct.pack("!I", 4_000_000_000) + b"K" + _tuple("1", None),
    b"D" + struct.pack("!I", 5) + b"O" + _tuple("", "a" * 70_000),
    b"B" + struct.pack("!QqI", 1, 2, 3),
]


def test_c_fast_path_is_built() -> None:
    assert po.SPEEDUPS, "datasync.engine._speedups was not compiled (is a C compiler installed?)"


@pytest.mark.parametrize("data", CHANGES)
def test_c_fast_path_equals_python(data: bytes) -> None:
    assert po.decode_change(data) == po._py_decode_change(data)


@pytest.mark.parametrize(
    "data",
    [b"I" + struct.pack("!I", 1) + b"X", b"I" + struct.pack("!I", 1) + b"N\x00\x01q",
     b"U" + struct.pack("!I", 1) + b"K" + _tuple("1"), b"D" + struct.pack("!I", 1) + b"N" + _tuple("1"),
     b"I" + struct.pack("!I", 1) + b"N\x00\x01t\x00\x00\x00\x09ab", b"I\x00"],
)
def test_c_fast_path_rejects_malformed(data: bytes) -> None:
    with pytest.raises(po.DecodeError):
        po.decode_change(data)
    with pytest.raises(po.DecodeError):
        po._py_decode_change(data)
