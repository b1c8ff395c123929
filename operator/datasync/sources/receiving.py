"""Receiving pgoutput over the streaming replication protocol.

Measured against the SQL interface (``pg_logical_slot_peek_binary_changes`` +
``pg_replication_slot_advance``): the SQL route decodes every change twice (the
peek, then the advance), cannot decode ahead while we apply, and polls; the
walsender decodes once, pushes continuously from its own process (the second
core) and answers status updates.  psycopg 3 has no COPY BOTH support, so this
module uses psycopg2's replication connection for the stream only.

Flow control is the standby status update: we confirm (flush) an LSN only after
the DuckDB transaction holding it committed.  After any reconnect the walsender
resends from the confirmed point; the applier skips what the target already has.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extras

from datasync import errors
from datasync.sources import connecting


class StreamLost(errors.SourceError):
    """The replication connection broke (server restart, network): reconnect and resume."""


@contextlib.contextmanager
def _guarded() -> Iterator[None]:
    # a dying walsender surfaces as any of several libpq errors ("no COPY in
    # progress", "server closed the connection", ...): all mean the same here
    try:
        yield
    except (psycopg2.DatabaseError, OSError) as exc:
        raise StreamLost(f"replication stream lost: {str(exc).strip() or type(exc).__name__}") from None


class Stream:
    """One START_REPLICATION session on a logical slot."""

    def __init__(self, dsn: str, slot: str, publication: str, proto_version: int = 1) -> None:
        self.conn = connecting.connect_libpq2(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
        self.cur: Any = self.conn.cursor()
        try:
            self.cur.start_replication(
                slot_name=slot,
                decode=False,
                options={"proto_version": str(proto_version), "publication_names": publication},
                status_interval=5,
            )
        except psycopg2.Error as exc:
            self.conn.close()
            text = str(exc).strip()
            if "is active for PID" in text:
                raise errors.SourceError(
                    f"replication slot {slot} is in use by another process",
                    "only one sync may stream a slot; stop the other one (DuckDB also allows one writer per file)",
                ) from None
            raise errors.SourceError(f"could not start streaming from slot {slot}: {text}") from None
        self._last_status_request = 0.0

    def read(self, max_messages: int, timeout: float) -> list[bytes]:
        """Up to ``max_messages`` payloads; waits up to ``timeout`` for the first."""
        with _guarded():
            return self._read(max_messages, timeout)

    def _read(self, max_messages: int, timeout: float) -> list[bytes]:
        out: list[bytes] = []
        read = self.cur.read_message
        while len(out) < max_messages:
            msg = read()
            if msg is None:
                if out or timeout <= 0:
                    break
                select.select([self.cur], [], [], timeout)
                timeout = 0
                continue
            out.append(msg.payload)
        return out

    @property
    def wal_end(self) -> int:
        """The server's sent position, from the latest keepalive or data message."""
        return int(self.cur.wal_end)

    def confirm(self, lsn: int, *, force: bool = False) -> None:
        """Report ``lsn`` as durably applied (the slot may release WAL before it)."""
        with _guarded():
            self.cur.send_feedback(write_lsn=lsn, flush_lsn=lsn, apply_lsn=lsn, force=force)

    def request_status(self, min_interval: float = 0.05) -> None:
        """Ask the walsender for a keepalive (it carries how far it has sent)."""
        now = time.monotonic()
        if now - self._last_status_request >= min_interval:
            self._last_status_request = now
            with _guarded():
                self.cur.send_feedback(reply=True, force=True)

    def close(self) -> None:
        try:
            self.conn.close()
        except psycopg2.Error:
            pass
