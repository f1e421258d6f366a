"""A throwaway PostgreSQL cluster that tests may stop, restart and crash.

``tests/throwaway_pg.py`` starts a cluster and hides its server; the fault matrix needs
the server in its hands (``pg_ctl restart -m fast``, ``-m immediate``, ``stop``,
``start``), so :class:`Cluster` drives ``pg_ctl`` itself, reusing that module's
helpers: the newest installed ``pg_ctl``, a free port, and (as root) a ``runuser``
wrapper so initdb and the server run as the ``postgres`` OS user.

Never used on the shared server of ``SONIQ_TEST_DATABASE_URL``: it is always a
cluster of its own, on a free port, removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from tests.throwaway_pg import (
    PG_OS_USER,
    SUPERUSER,
    _traversable_by,
    _write_wrapper,
    find_pg_ctl,
    free_port,
)


class Cluster:
    """One cluster: ``url`` is its superuser URL; the methods run ``pg_ctl``."""

    def __init__(self, top: Path, pg_ctl: str, port: int) -> None:
        self.top = top
        self.pg_ctl = pg_ctl
        self.port = port
        self.data = top / "cluster" / "data"
        self.log = top / "cluster" / "server.log"
        self.sockets = top / "cluster" / "s"
        self.url = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"

    def _ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [self.pg_ctl, *args],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def initdb(self) -> None:
        self._ctl("initdb", "-D", str(self.data), "-o", f"--auth=trust -U {SUPERUSER} -E UTF8")

    def start(self) -> None:
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.sockets} -c fsync=off "
            "-c max_connections=200"
        )
        self._ctl(
            "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", options
        )
        self.wait_ready()

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-w", "-t", "60", "-D", str(self.data), "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m MODE``: ``fast`` rolls back open transactions and
        checkpoints; ``immediate`` kills the server (crash recovery on start)."""
        self._ctl("restart", "-w", "-t", "60", "-D", str(self.data), "-m", mode)
        self.wait_ready()

    def running(self) -> bool:
        result = subprocess.run(
            [self.pg_ctl, "status", "-D", str(self.data)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        return result.returncode == 0

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=3, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


@contextlib.contextmanager
def cluster(base: Path) -> Iterator[Cluster]:
    """A fresh, running cluster on a free port of 127.0.0.1; stopped and removed after."""
    pg_ctl = find_pg_ctl()
    parent = Path(base).resolve()
    owner = None
    if os.geteuid() == 0:
        owner = pwd.getpwnam(PG_OS_USER)
        if not _traversable_by(parent, owner):
            parent = Path(tempfile.gettempdir()).resolve()
    if len(str(parent)) > 50:
        parent = Path(tempfile.gettempdir()).resolve()
    top = Path(tempfile.mkdtemp(prefix="pgf-", dir=parent))
    try:
        (top / "cluster").mkdir(mode=0o700)
        (top / "cluster" / "s").mkdir(mode=0o700)
        if owner is not None:
            top.chmod(0o711)
            for path in (top / "cluster", top / "cluster" / "s"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            wrapper = top / "pg_ctl"
            _write_wrapper(wrapper, pg_ctl)
            pg_ctl = str(wrapper)
        made = Cluster(top, pg_ctl, free_port())
        made.initdb()
        for attempt in range(3):
            try:
                made.start()
                break
            except subprocess.CalledProcessError as exc:
                if attempt == 2:
                    raise RuntimeError(
                        f"throwaway cluster did not start\n{made.log_tail()}"
                    ) from exc
                made.port = free_port()
                made.url = f"postgresql://{SUPERUSER}@127.0.0.1:{made.port}/postgres"
        try:
            yield made
        finally:
            with contextlib.suppress(Exception):
                if made.running():
                    made.stop("immediate")
    finally:
        shutil.rmtree(top, ignore_errors=True)
