"""A pure decoder for PostgreSQL's ``pgoutput`` logical replication messages.

Pure on purpose: bytes in, dataclasses out, no I/O, so every message type can be
tested from hand-made bytes as well as from a live server.  The layout follows
PostgreSQL's "Logical Replication Message Formats" (protocol versions 1-4).  In
streaming mode (v2+, in-progress transactions) data messages carry a leading
xid; the caller says whether a stream is open.

Column values stay in PostgreSQL's text form (``str``), ``None`` for NULL, or the
:data:`UNCHANGED` marker for an unchanged TOASTed value that the server did not
send: the applier must keep what the target holds, never write a placeholder.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Final

PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01 in µs since the Unix epoch


class _Unchanged:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()
Value = str | bytes | None | _Unchanged
Tuple = list[Value]


@dataclasses.dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_ts_us: int
    xid: int


@dataclasses.dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts_us: int


@dataclasses.dataclass(frozen=True)
class Origin:
    lsn: int
    name: str


@dataclasses.dataclass(frozen=True)
class RelationColumn:
    name: str
    type_oid: int
    typmod: int
    is_key: bool


@dataclasses.dataclass(frozen=True)
class Relation:
    relid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[RelationColumn, ...]
    xid: int | None = None


@dataclasses.dataclass(frozen=True)
class Type:
    oid: int
    namespace: str
    name: str
    xid: int | None = None


@dataclasses.dataclass(frozen=True)
class Insert:
    relid: int
    new: Tuple
    xid: int | None = None


@dataclasses.dataclass(frozen=True)
class Update:
    relid: int
    new: Tuple
    old: Tuple | None = None  # present when the key changed ('K') or REPLICA IDENTITY FULL ('O')
    old_is_key_only: bool = True
    xid: int | None = None


@dataclasses.dataclass(frozen=True)
class Delete:
    relid: int
    old: Tuple
    old_is_key_only: bool = True
    xid: int | None = None


@dataclasses.dataclass(frozen=True)
class Truncate:
    relids: tuple[int, ...]
    cascade: bool
    restart_identity: bool
    xid: int | None = None


@dataclasses.dataclass(frozen=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None


@dataclasses.dataclass(frozen=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclasses.dataclass(frozen=True)
class StreamStop:
    pass


@dataclasses.dataclass(frozen=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts_us: int


@dataclasses.dataclass(frozen=True)
class StreamAbort:
    xid: int
    subxid: int
    abort_lsn: int | None = None
    abort_ts_us: int | None = None


Message = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate
    | LogicalMessage | StreamStart | StreamStop | StreamCommit | StreamAbort
)


class DecodeError(ValueError):
    """The bytes are not a pgoutput message we understand."""


class NeedsText(ValueError):
    """A binary COPY value Arrow or DuckDB cannot hold (an interval beyond Arrow's nanoseconds, a
    timestamp past DuckDB's end): read that chunk as text."""


_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I64 = struct.Struct("!q")
_U64 = struct.Struct("!Q")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\0", pos)
    return buf[pos:end].decode("utf-8"), end + 1


def _tuple(buf: bytes, pos: int) -> tuple[Tuple, int]:
    (ncols,) = _I16.unpack_from(buf, pos)
    pos += 2
    values: Tuple = []
    append = values.append
    unpack = _I32.unpack_from
    for _ in range(ncols):
        kind = buf[pos]
        pos += 1
        if kind == 0x74:  # 't'
            (length,) = unpack(buf, pos)
            pos += 4
            if pos + length > len(buf):
                raise DecodeError("truncated value")
            append(buf[pos : pos + length].decode("utf-8"))
            pos += length
        elif kind == 0x6E:  # 'n'
            append(None)
        elif kind == 0x75:  # 'u'
            append(UNCHANGED)
        elif kind == 0x62:  # 'b'
            (length,) = unpack(buf, pos)
            pos += 4
            if pos + length > len(buf):
                raise DecodeError("truncated value")
            append(bytes(buf[pos : pos + length]))
            pos += length
        else:
            raise DecodeError(f"unknown tuple column kind {chr(kind)!r} at offset {pos - 1}")
    return values, pos


def read_tuple(buf: bytes, pos: int) -> tuple[Tuple, int]:
    """The TupleData at ``pos``: (values, position after it)."""
    return _tuple(buf, pos)


def decode(data: bytes, *, in_stream: bool = False, proto_version: int = 1) -> Message:
    """Decode one pgoutput message.

    ``in_stream``: a StreamStart was seen and no StreamStop yet (data messages
    then carry the transaction's xid).
    """
    if not data:
        raise DecodeError("empty message")
    tag = data[0]
    pos = 1
    xid: int | None = None
    try:
        if tag == 0x42:  # 'B'
            final_lsn, ts, bxid = _BEGIN.unpack_from(data, pos)
            return Begin(final_lsn, ts, bxid)
        if tag == 0x43:  # 'C'
            flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(data, pos)
            return Commit(flags, commit_lsn, end_lsn, ts)
        if in_stream and tag in b"RYIUDTM":
            (xid,) = _U32.unpack_from(data, pos)
            pos += 4
        if tag == 0x49:  # 'I'
            (relid,) = _U32.unpack_from(data, pos)
            if data[pos + 4] != 0x4E:
                raise DecodeError("insert without new tuple")
            new, _ = _tuple(data, pos + 5)
            return Insert(relid, new, xid)
        if tag == 0x55:  # 'U'
            (relid,) = _U32.unpack_from(data, pos)
            pos += 4
            old: Tuple | None = None
            key_only = True
            marker = data[pos]
            if marker in (0x4B, 0x4F):  # 'K' / 'O'
                key_only = marker == 0x4B
                old, pos = _tuple(data, pos + 1)
                marker = data[pos]
            if marker != 0x4E:
                raise DecodeError("update without new tuple")
            new, _ = _tuple(data, pos + 1)
            return Update(relid, new, old, key_only, xid)
        if tag == 0x44:  # 'D'
            (relid,) = _U32.unpack_from(data, pos)
            marker = data[pos + 4]
            if marker not in (0x4B, 0x4F):
                raise DecodeError("delete without old tuple")
            old_t, _ = _tuple(data, pos + 5)
            return Delete(relid, old_t, marker == 0x4B, xid)
        if tag == 0x52:  # 'R'
            (relid,) = _U32.unpack_from(data, pos)
            pos += 4
            nspname, pos = _cstring(data, pos)
            relname, pos = _cstring(data, pos)
            ident = chr(data[pos])
            (ncols,) = _I16.unpack_from(data, pos + 1)
            pos += 3
            cols = []
            for _ in range(ncols):
                flags = data[pos]
                name, pos = _cstring(data, pos + 1)
                (typoid,) = _U32.unpack_from(data, pos)
                (typmod,) = _I32.unpack_from(data, pos + 4)
                pos += 8
                cols.append(RelationColumn(name, typoid, typmod, bool(flags & 1)))
            return Relation(relid, nspname, relname, ident, tuple(cols), xid)
        if tag == 0x59:  # 'Y'
            (oid,) = _U32.unpack_from(data, pos)
            nspname, pos = _cstring(data, pos + 4)
            typname, pos = _cstring(data, pos)
            return Type(oid, nspname, typname, xid)
        if tag == 0x54:  # 'T'
            (nrels,) = _I32.unpack_from(data, pos)
            options = data[pos + 4]
            relids = struct.unpack_from(f"!{nrels}I", data, pos + 5)
            return Truncate(tuple(relids), bool(options & 1), bool(options & 2), xid)
        if tag == 0x4D:  # 'M'
            flags = data[pos]
            (lsn,) = _U64.unpack_from(data, pos + 1)
            prefix, pos = _cstring(data, pos + 9)
            (length,) = _I32.unpack_from(data, pos)
            content = bytes(data[pos + 4 : pos + 4 + length])
            return LogicalMessage(bool(flags & 1), lsn, prefix, content, xid)
        if tag == 0x4F:  # 'O'
            (lsn,) = _U64.unpack_from(data, pos)
            name, _ = _cstring(data, pos + 8)
            return Origin(lsn, name)
        if tag == 0x53:  # 'S'
            (sxid,) = _U32.unpack_from(data, pos)
            return StreamStart(sxid, data[pos + 4] == 1)
        if tag == 0x45:  # 'E'
            return StreamStop()
        if tag == 0x63:  # 'c'
            (sxid,) = _U32.unpack_from(data, pos)
            flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(data, pos + 4)
            return StreamCommit(sxid, flags, commit_lsn, end_lsn, ts)
        if tag == 0x41:  # 'A'
            sxid, subxid = struct.unpack_from("!II", data, pos)
            if proto_version >= 4 and len(data) >= pos + 24:
                abort_lsn, abort_ts = struct.unpack_from("!Qq", data, pos + 8)
                return StreamAbort(sxid, subxid, abort_lsn, abort_ts)
            return StreamAbort(sxid, subxid)
    except (struct.error, IndexError, ValueError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"truncated or malformed {chr(tag)!r} message: {exc}") from None
    raise DecodeError(f"unsupported pgoutput message type {chr(tag)!r}")


Change = tuple[int, int, "Tuple | None", "Tuple | None", bool, bool]


def _py_decode_change(data: bytes) -> Change | None:
    """(tag, relid, new, old, old_is_key_only, new_has_unchanged) for Insert/Update/Delete, else None.

    The hot path of CDC: no dataclass per change.  A C version
    (``_speedups.decode_change``) replaces it when it was built.
    """
    tag = data[0] if data else 0
    if tag not in (0x49, 0x55, 0x44):
        return None
    msg = decode(data)
    if isinstance(msg, Insert):
        return (tag, msg.relid, msg.new, None, True, UNCHANGED in msg.new)
    if isinstance(msg, Update):
        return (tag, msg.relid, msg.new, msg.old, msg.old_is_key_only, UNCHANGED in msg.new)
    assert isinstance(msg, Delete)
    return (tag, msg.relid, None, msg.old, msg.old_is_key_only, False)


try:
    from datasync.engine import _speedups  # type: ignore[attr-defined]

    _speedups.configure(UNCHANGED, DecodeError, NeedsText)
    decode_change = _speedups.decode_change
    SPEEDUPS = True
except ImportError:  # pragma: no cover - exercised where no C compiler was available
    decode_change = _py_decode_change
    SPEEDUPS = False


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)
