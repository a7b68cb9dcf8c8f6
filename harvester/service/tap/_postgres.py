"""A throwaway PostgreSQL cluster with pg_sphere, for ``harvester serve --tap`` and tests.

``initdb`` refuses to run as root, so as root the cluster belongs to the
``postgres`` user (the Debian package creates it); otherwise to the caller. It
lives in a temporary folder: data directory, log, and its own Unix socket (no TCP
listener, so it never takes a port), with ``fsync=off`` since it holds nothing
that outlives it. :meth:`PostgresCluster.start` runs ``initdb`` (about 0.5 s) and
the postmaster as a child process; :meth:`~PostgresCluster.stop` shuts it down
fast and removes the folder. The postmaster is told to stop when the thread that
started it dies (``PR_SET_PDEATHSIG``), so a killed server leaves no database
running.

Where the binaries are: ``$HARVESTER_PG_BINDIR``, else the ``initdb`` on ``PATH``,
else Debian's ``/usr/lib/postgresql/<version>/bin`` (newest first); a candidate is
used only if its share directory has ``pg_sphere``. :func:`find_postgres` says
what is missing when none fits, and is what the TAP tests skip on.

Dependency rule: the standard library only (psycopg is imported by the caller).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import HarvesterError

__all__ = ["PgInstall", "PostgresCluster", "TapUnavailable", "find_postgres", "redact_dsn"]

_DEBIAN = Path("/usr/lib/postgresql")
_PR_SET_PDEATHSIG = 1


class TapUnavailable(HarvesterError):
    """TAP cannot run here; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class PgInstall:
    """A PostgreSQL installation with pg_sphere."""

    bindir: Path
    sharedir: Path
    version: str

    def tool(self, name: str) -> str:
        return str(self.bindir / name)


def _candidates() -> list[Path]:
    found: list[Path] = []
    env = os.environ.get("HARVESTER_PG_BINDIR")
    if env:
        found.append(Path(env))
    initdb = shutil.which("initdb")
    if initdb:
        found.append(Path(initdb).resolve().parent)
    if _DEBIAN.is_dir():
        versions = sorted(
            (p for p in _DEBIAN.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name)
        )
        found += [p / "bin" for p in versions]
    unique: list[Path] = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique


def find_postgres() -> PgInstall:
    """The newest usable PostgreSQL installation with pg_sphere.

    Raises
    ------
    TapUnavailable
        Naming what was looked at and what is missing.
    """
    seen: list[str] = []
    for bindir in _candidates():
        if not (bindir / "initdb").is_file() or not (bindir / "postgres").is_file():
            seen.append(f"{bindir}: no initdb/postgres")
            continue
        try:
            out = subprocess.run(
                [str(bindir / "pg_config"), "--sharedir", "--version"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.split("\n")
            sharedir, version = Path(out[0].strip()), out[1].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            # Debian's layout without a per-version pg_config.
            sharedir = Path("/usr/share/postgresql") / bindir.parent.name
            version = f"PostgreSQL {bindir.parent.name}"
        if not (sharedir / "extension" / "pg_sphere.control").is_file():
            seen.append(f"{bindir}: no pg_sphere in {sharedir}/extension")
            continue
        return PgInstall(bindir, sharedir, version)
    where = "; ".join(seen) or "no initdb on PATH or under /usr/lib/postgresql"
    raise TapUnavailable(
        f"TAP needs PostgreSQL with pg_sphere ({where}). On Debian: "
        "apt-get install postgresql-15 postgresql-15-pgsphere (make test does this as root), "
        "or give --tap-dsn for an existing database"
    )


def _run_as() -> pwd.struct_passwd | None:
    """The user the cluster runs as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise TapUnavailable(
            "initdb refuses to run as root and there is no 'postgres' user to run it as; "
            "create one (the postgresql package does), run as another user, or give --tap-dsn"
        ) from None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


class PostgresCluster:
    """One throwaway cluster: ``start()``, then ``dsn(dbname)``, then ``stop()``.

    A context manager too. ``superuser`` is the role ``initdb`` made (``postgres``).
    """

    superuser = "postgres"

    def __init__(self, install: PgInstall | None = None, parent: str | None = None) -> None:
        self.install = install
        self.parent = parent
        self.folder: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._databases = 0

    @property
    def socket_dir(self) -> Path:
        if self.folder is None:
            raise RuntimeError("the cluster is not started")
        return self.folder

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        """A libpq connection string to a database of this cluster (Unix socket)."""
        return f"host={self.socket_dir} port=5432 dbname={dbname} user={user or self.superuser}"

    def start(self, timeout: float = 60.0) -> None:
        """``initdb`` and start the postmaster; returns once it accepts connections.

        Raises
        ------
        TapUnavailable
            If PostgreSQL is missing or does not start (with its log's tail).
        """
        install = self.install or find_postgres()
        self.install = install
        owner = _run_as()
        self.folder = Path(tempfile.mkdtemp(prefix="harvester-pg-", dir=self.parent))
        data = self.folder / "data"
        log = self.folder / "postgres.log"
        kw: dict[str, object] = {}
        if owner is not None:
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            kw = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        try:
            subprocess.run(
                [
                    install.tool("initdb"),
                    "-D",
                    str(data),
                    "-A",
                    "trust",
                    "-U",
                    self.superuser,
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                capture_output=True,
                check=True,
                timeout=timeout,
                cwd=self.folder,
                **kw,  # type: ignore[call-overload]
            )
        except subprocess.CalledProcessError as exc:
            self._remove()
            raise TapUnavailable(f"initdb failed: {exc.stderr.decode(errors='replace')}") from exc
        with open(log, "wb") as out:
            if owner is not None:
                os.chown(log, owner.pw_uid, owner.pw_gid)
            self._proc = subprocess.Popen(  # type: ignore[call-overload]
                [
                    install.tool("postgres"),
                    "-D",
                    str(data),
                    "-k",
                    str(self.folder),
                    "-p",
                    "5432",
                    "-c",
                    "listen_addresses=",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=50",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                preexec_fn=_die_with_parent,
                **kw,
            )
        self._wait_ready(timeout, log)

    def _wait_ready(self, timeout: float, log: Path) -> None:
        assert self.install is not None and self._proc is not None
        deadline = time.monotonic() + timeout
        socket = self.socket_dir / ".s.PGSQL.5432"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                self.stop()
                raise TapUnavailable(f"PostgreSQL did not start:\n{tail}")
            if socket.exists():
                ready = subprocess.run(
                    [self.install.tool("pg_isready"), "-q", "-h", str(self.folder), "-p", "5432"],
                    capture_output=True,
                    timeout=30,
                )
                if ready.returncode == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise TapUnavailable(f"PostgreSQL did not accept connections within {timeout} s")

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT), then remove the folder. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._remove()

    def _remove(self) -> None:
        folder, self.folder = self.folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def new_database(self, prefix: str = "tap") -> str:
        """Create an empty database with a fresh name; returns its DSN."""
        import psycopg

        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_DSN_PASSWORD = re.compile(r"(password\s*=\s*)\S+|(://[^:/@]+:)[^@]+@", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """A DSN fit for a log line (password removed)."""
    return _DSN_PASSWORD.sub(
        lambda m: (m.group(1) or m.group(2)) + "***" + ("@" if m.group(2) else ""), dsn
    )
