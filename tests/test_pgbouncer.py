"""Soniq behind a real PgBouncer (Debian's ``pgbouncer``; .ci/run installs it),
started on a free port in front of the test server: in transaction pooling mode,
enqueue on Soniq's pool and in a caller's transaction, and a worker with
``--no-listen``; in session pooling mode, a worker woken by LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import psycopg
import pytest

from soniq import JobStatus, Soniq
from tests.conftest import Process, listening_sessions, wait_until
from tests.test_group_commit import (
    alone_calls,
    sync_line_waiting,
    sync_stuck_in_flight,
    table_locked,
)
from tests.throwaway_pg import free_port

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").is_file() else None
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PGBOUNCER is None, reason="no pgbouncer binary (apt-get install pgbouncer)"),
]


class Bouncer:
    """A PgBouncer process in front of the server of ``database_url``."""

    def __init__(self, database_url: str, mode: str) -> None:
        info = psycopg.conninfo.conninfo_to_dict(database_url)
        user = str(info.get("user") or os.environ.get("USER") or "postgres")
        self.port = free_port()
        self.url = f"postgresql://{user}@127.0.0.1:{self.port}/{info['dbname']}"
        self.dir = Path(tempfile.mkdtemp(prefix="soniq-pgbouncer-"))
        (self.dir / "users.txt").write_text(f'"{user}" ""\n')
        upstream_host = info.get("host") or "127.0.0.1"
        upstream_port = info.get("port") or 5432
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={upstream_host} port={upstream_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.dir / 'users.txt'}\n"
            # Transaction pooling: few server connections for many clients, so that
            # statements of one client land on different servers, as in production.
            # Session pooling: a server per client (a worker holds several).
            f"pool_mode = {mode}\ndefault_pool_size = {3 if mode == 'transaction' else 30}\n"
            "max_client_conn = 500\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\npidfile = {self.dir / 'pgbouncer.pid'}\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        command = [PGBOUNCER or "pgbouncer", str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            shutil.chown(self.dir, "postgres")
            for path in self.dir.iterdir():
                shutil.chown(path, "postgres")
            command[1:1] = ["-u", "postgres"]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_until(self._answers, 15, f"pgbouncer on port {self.port}")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            log = self.dir / "pgbouncer.log"
            output = self.proc.stdout.read().decode() if self.proc.stdout else ""
            raise AssertionError(
                f"pgbouncer exited {self.proc.returncode}: {output}"
                f"{log.read_text() if log.exists() else ''}"
            )
        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)  # "safe shutdown"
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def transaction_bouncer(database_url: str) -> Iterator[Bouncer]:
    bouncer = Bouncer(database_url, "transaction")
    yield bouncer
    bouncer.stop()


@pytest.fixture
def session_bouncer(database_url: str) -> Iterator[Bouncer]:
    bouncer = Bouncer(database_url, "session")
    yield bouncer
    bouncer.stop()


@pytest.fixture(params=["asyncpg", "psycopg"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _direct(database_url: str, schema: str) -> Soniq:
    """A Soniq straight on the server, to check what the bounced one wrote."""
    return Soniq(database_url, schema=schema)


def test_transaction_pooling_enqueues_on_soniqs_pool(
    transaction_bouncer: Bouncer, database_url: str, schema: str, driver: str
) -> None:
    """Migrate, enqueue (one by one, merged, many), read, from many tasks and
    threads: the same statements again and again, over 3 server connections."""
    eq = Soniq(transaction_bouncer.url, schema=schema, driver=driver, prepared_statements=False)

    async def enqueue_async() -> list[int]:
        await eq.ensure_initialized()
        ids = await asyncio.gather(*(eq.enqueue("pgb.add", n=n) for n in range(200)))
        ids += await eq.enqueue_many("pgb.add", [{"n": n} for n in range(50)])
        for job_id in ids[:30]:
            job = await eq.get_job(job_id)
            assert job is not None and job.status is JobStatus.QUEUED
        await eq.close()
        return ids

    ids = asyncio.run(enqueue_async())
    ids += [eq.sync.enqueue("pgb.add", n=n) for n in range(30)]
    assert all(eq.sync.get_job(i) is not None for i in ids[-30:])
    assert len(eq.sync.list_jobs(limit=1000)) == len(set(ids)) == 280
    eq.sync.close()


def test_transaction_pooling_merges_the_enqueues_of_threads(
    transaction_bouncer: Bouncer, database_url: str, schema: str
) -> None:
    """``eq.sync``'s merged statement goes through libpq, not a cursor: with
    ``prepared_statements=False`` it is an unnamed statement, which PgBouncer may send
    to any server connection, again and again."""
    _direct(database_url, schema).sync.ensure_initialized()
    eq = Soniq(transaction_bouncer.url, schema=schema, prepared_statements=False)
    alone = alone_calls(eq.sync.backend)
    enqueue = eq.sync.enqueue
    ids = []
    try:
        with ThreadPoolExecutor(12) as pool:
            for _ in range(3):
                with table_locked(database_url, schema):
                    calls = sync_stuck_in_flight(eq, pool, lambda n: enqueue("pgb.add", n=n))
                    calls += [pool.submit(enqueue, "pgb.add", n=n) for n in range(2, 12)]
                    sync_line_waiting(eq, 10)
                ids += [call.result(30) for call in calls]
        line = eq.sync.backend.insert_line()  # type: ignore[attr-defined]
        assert sum(count for size, count in line.batches.items() if size > 1) >= 3
        assert len(alone) == 6  # the two stuck calls of each round: no merged one failed
        assert len(eq.sync.list_jobs(limit=100)) == len(set(ids)) == 36
    finally:
        eq.sync.close()


def test_transaction_pooling_enqueues_in_a_callers_transaction(
    transaction_bouncer: Bouncer, database_url: str, schema: str
) -> None:
    """The caller's transaction holds one server connection until it ends: the job
    exists if and only if it commits (psycopg and asyncpg connections, configured
    for PgBouncer as their docs say)."""
    direct = _direct(database_url, schema)
    direct.sync.ensure_initialized()
    eq = Soniq(transaction_bouncer.url, schema=schema, prepared_statements=False)

    async def in_transactions() -> tuple[list[int], list[int]]:
        kept, dropped = [], []
        conn = await psycopg.AsyncConnection.connect(
            transaction_bouncer.url, prepare_threshold=None
        )
        async with conn:
            for n in range(8):
                async with conn.transaction(force_rollback=n % 2 == 1):
                    job_id = await eq.enqueue("pgb.add", connection=conn, n=n)
                (dropped if n % 2 else kept).append(job_id)
        apg = await asyncpg.connect(transaction_bouncer.url, statement_cache_size=0)
        try:
            for n in range(8):
                try:
                    async with apg.transaction():
                        job_id = await eq.enqueue("pgb.add", connection=apg, n=n)
                        if n % 2:
                            raise LookupError("roll back")
                    kept.append(job_id)
                except LookupError:
                    dropped.append(job_id)
        finally:
            await apg.close()
        await eq.close()
        return kept, dropped

    kept, dropped = asyncio.run(in_transactions())
    with psycopg.connect(transaction_bouncer.url, prepare_threshold=None) as conn:
        for n in range(3):
            with conn.transaction():
                kept.append(eq.sync.enqueue("pgb.add_sync", connection=conn, n=n))
    assert all(direct.sync.get_job(i) is not None for i in kept)
    assert all(direct.sync.get_job(i) is None for i in dropped)
    eq.sync.close()
    direct.sync.close()


def _worker_env(bouncer: Bouncer, schema: str, driver: str) -> dict[str, str]:
    env = os.environ.copy()
    env.update(SONIQ_PGB_URL=bouncer.url, SONIQ_PGB_SCHEMA=schema, SONIQ_PGB_DRIVER=driver)
    return env


def test_transaction_pooling_worker_without_listen(
    transaction_bouncer: Bouncer, database_url: str, schema: str, driver: str
) -> None:
    """A worker (claims, batched outcomes, heartbeats, reconcile, prune) behind
    transaction pooling with --no-listen runs every job, async and sync."""
    direct = _direct(database_url, schema)
    direct.sync.ensure_initialized()
    ids = direct.sync.enqueue_many("pgb.add", [{"n": n} for n in range(300)])
    ids += direct.sync.enqueue_many("pgb.add_sync", [{"n": n} for n in range(100)])
    argv = ["worker", "tests.pgbouncer_app:eq", "--no-listen", "--burst", "--concurrency", "8"]
    worker = Process(
        [*argv, "--heartbeat-interval", "0.2", "--stale-after", "5"],
        _worker_env(transaction_bouncer, schema, driver),
    )
    code, out = worker.finish(120)
    assert code == 0, out
    assert "rror" not in out, out
    done = direct.sync.list_jobs(status="done", limit=1000)
    assert sorted(j.id for j in done) == sorted(ids)
    assert {j.result for j in done} == set(range(1, 301))
    direct.sync.close()


def test_session_pooling_worker_woken_by_notify(
    session_bouncer: Bouncer, database_url: str, schema: str, pg: psycopg.Connection
) -> None:
    """In session pooling mode LISTEN works: a worker polling every 60 s runs a new
    job within seconds, so NOTIFY reached it through PgBouncer."""
    direct = _direct(database_url, schema)
    direct.sync.ensure_initialized()
    argv = ["worker", "tests.pgbouncer_app:eq", "--poll-interval", "60"]
    worker = Process(argv, _worker_env(session_bouncer, schema, "asyncpg"))
    try:
        wait_until(lambda: listening_sessions(pg, schema) == 1, 30, "the worker's LISTEN")
        started = time.monotonic()
        job_id = direct.sync.enqueue("pgb.add", n=41)
        wait_until(
            lambda: direct.sync.get_job(job_id).status is JobStatus.DONE,  # type: ignore[union-attr]
            20,
            "the NOTIFY to wake the worker",
        )
        assert time.monotonic() - started < 20
        assert direct.sync.get_job(job_id).result == 42  # type: ignore[union-attr]
        worker.send_signal(signal.SIGTERM)
        code, out = worker.finish(30)
        assert code == 0, out
    finally:
        worker.kill()
        direct.sync.close()


def test_prepared_statements_false_is_refused_off_postgres(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="prepared_statements=False applies to PostgreSQL"):
        Soniq(f"sqlite:///{tmp_path / 'x.db'}", prepared_statements=False)
    with pytest.raises(Exception, match="prepared_statements must be True or False"):
        Soniq("postgresql://localhost/x", prepared_statements="no")  # type: ignore[arg-type]


def test_operator_commands_behind_transaction_pooling(
    transaction_bouncer: Bouncer, database_url: str, schema: str
) -> None:
    """`soniq stats --watch` repeats one statement: with --no-prepared-statements it
    goes on (psycopg would prepare it from its sixth run, and the next run, on
    another server connection, would not find it). Four at once, so that their
    statements move between PgBouncer's three server connections."""
    direct = _direct(database_url, schema)
    direct.sync.ensure_initialized()
    direct.sync.close()
    argv = ["stats", "--watch", "0.01", "--json", "--no-prepared-statements"]
    argv += ["--database-url", transaction_bouncer.url, "--schema", schema]
    watches = [Process(argv) for _ in range(4)]
    try:
        for watch in watches:
            wait_until(lambda w=watch: w.output.count("\n") >= 100, 60, "100 refreshes")
        for watch in watches:
            watch.send_signal(signal.SIGINT)
            code, out = watch.finish(30)
            assert code == 0 and "Traceback" not in out, out[-2000:]
    finally:
        for watch in watches:
            watch.kill()
